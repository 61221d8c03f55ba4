"""Optimisers and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from trm.model.conditioning import PuzzleEmbedding


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``base_lr`` to ``base_lr * min_ratio``."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def undo_where_skipped_(ok: torch.Tensor | None, tensors: list[torch.Tensor], before: list[torch.Tensor] | None) -> None:
    """tensors[i] <- before[i] where ``ok`` (0-dim bool, on the device) is False: an update taken
    back without a host-device synchronisation. ``ok`` None: nothing to undo."""
    if ok is not None:
        for t, b in zip(tensors, before):
            t.copy_(torch.where(ok, t, b))


class AdamATan2(torch.optim.Optimizer):
    """Adam with atan2 in place of the division by sqrt(v) + eps (scale-invariant, no epsilon):

        p <- p * (1 - lr * wd)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * atan2(m, sqrt(v / (1 - b2^t)))

    ``step(ok)`` with a 0-dim bool tensor keeps weights and moments unchanged where it is False (a
    skipped step; its step count t still advances, a negligible change to the bias correction).
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.95), weight_decay: float = 0.1):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, ok: torch.Tensor | None = None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            states = [self.state[p] for p in params]
            for s in states:
                s["step"] += 1
            t = states[0]["step"]
            grads = [p.grad for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            touched = params + exp_avgs + exp_avg_sqs
            before = [t.clone() for t in touched] if ok is not None else None
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
            torch._foreach_mul_(exp_avg_sqs, b2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, math.sqrt(1 - b2**t))
            updates = [torch.atan2(m, d) for m, d in zip(exp_avgs, denom)]
            torch._foreach_add_(params, updates, alpha=-lr / (1 - b1**t))
            undo_where_skipped_(ok, touched, before)


class SparseSignSGD:
    """Sign-SGD with decoupled weight decay on the rows of a :class:`PuzzleEmbedding` looked up in
    the step: p <- p * (1 - lr * wd) - lr * sign(g), where g sums the gradients of equal ids over
    the whole global batch (all ranks)."""

    def __init__(self, embedding: PuzzleEmbedding, lr: float, weight_decay: float):
        self.embedding, self.lr, self.weight_decay = embedding, lr, weight_decay

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

    def state_dict(self) -> dict:
        return {}  # stateless: the table itself is saved with the model

    def load_state_dict(self, state: dict) -> None:
        pass
