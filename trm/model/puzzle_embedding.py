"""The original TRM's conditioner: a learned vector per puzzle, updated sparsely by sign-SGD."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trm.model.conditioning import Conditioner, Conditioning, register_conditioner


@register_conditioner("puzzle_embedding")
class PuzzleEmbedding(Conditioner):
    """The table (num_puzzle_identifiers, hidden) starts at zero and is not a Parameter: it is
    updated sparsely by :class:`SparseSignSGD` from the rows looked up in the step. Each puzzle's
    vector fills the first context position; the other ``puzzle_emb_len - 1`` stay zero. Like the
    token embeddings it is scaled by sqrt(hidden). Trained by ``pretrain.py``.
    """

    reads_demonstrations = False
    context_positions = 1

    def __init__(self, num_puzzle_identifiers: int, hidden_size: int, puzzle_emb_len: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_puzzle_identifiers, hidden_size))
        self.emb_len, self.scale = puzzle_emb_len, math.sqrt(hidden_size)
        self.looked_up: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, rows with grad)

    @classmethod
    def build(cls, arch, metadata: dict) -> PuzzleEmbedding:
        return cls(metadata["num_puzzle_identifiers"], arch.hidden_size, arch.puzzle_emb_len)

    def forward(self, batch: dict[str, torch.Tensor]) -> Conditioning:
        ids = batch["puzzle_identifiers"]
        rows = self.weight[ids]
        if self.training and torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)
            self.looked_up = (ids, rows)
        B, H = rows.shape
        context = F.pad(rows, (0, (self.emb_len - 1) * H)).view(B, self.emb_len, H)
        return Conditioning(context * self.scale)

    def sparse_optimizer(self, lr: float, weight_decay: float) -> SparseSignSGD:
        return SparseSignSGD(self, lr, weight_decay)


class SparseSignSGD:
    """Sign-SGD with decoupled weight decay on the rows of a :class:`PuzzleEmbedding` looked up in
    the step: p <- p * (1 - lr * wd) - lr * sign(g), where g sums the gradients of equal ids over
    the whole global batch (all ranks). ``lr`` starts at ``base_lr``; the loop sets it per step."""

    name = "puzzle_emb_lr"

    def __init__(self, embedding: PuzzleEmbedding, lr: float, weight_decay: float):
        self.embedding, self.base_lr, self.lr, self.weight_decay = embedding, lr, lr, weight_decay

    def gathered_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ids (N,), per-row gradients (N, dim)) of the global batch, or None before a lookup."""
        if self.embedding.looked_up is None or self.embedding.looked_up[1].grad is None:
            return None
        ids, rows = self.embedding.looked_up
        grad = rows.grad
        if dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            all_ids = [torch.empty_like(ids) for _ in range(world)]
            all_grads = [torch.empty_like(grad) for _ in range(world)]
            dist.all_gather(all_ids, ids.contiguous())
            dist.all_gather(all_grads, grad.contiguous())
            ids, grad = torch.cat(all_ids), torch.cat(all_grads)
        return ids, grad

    @torch.no_grad()
    def step(self, gathered: tuple[torch.Tensor, torch.Tensor] | None = None, ok: torch.Tensor | None = None):
        """One update of the rows in ``gathered``; none where ``ok`` (0-dim bool) is False."""
        gathered = gathered or self.gathered_grad()
        if gathered is None:
            return
        ids, grad = gathered
        # Sum the gradients of equal ids with an (N, N) equality matrix: no data-dependent shapes,
        # so no host-device synchronisation. Duplicate ids then write identical rows.
        same = (ids[:, None] == ids[None, :]).to(grad.dtype)
        summed = same @ grad
        table = self.embedding.weight
        old = table[ids]
        rows = old * (1 - self.lr * self.weight_decay) - self.lr * torch.sign(summed)
        if ok is not None:
            rows = torch.where(ok, rows, old)
        table.index_copy_(0, ids.long(), rows.to(table.dtype))
        self.embedding.looked_up = None
