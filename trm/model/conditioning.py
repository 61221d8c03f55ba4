"""The one seam between a task's representation and the recursive core.

A *conditioner* turns a batch into context tokens that the core prepends to the grid:

    context: (B, puzzle_emb_len, hidden), in the units of the core's scaled token embeddings

plus auxiliary losses (already weighted, summed over the batch, added to the training loss and
logged as ``train/<name>`` per sample) and metrics ((sum, count) pairs, logged as sum / count). The core never knows where the context came from.

Implementations register with :func:`register_conditioner`; this module holds the learned puzzle
embedding of the original TRM, the package ``encoders`` the demonstration encoders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch
import torch.nn.functional as F
from torch import nn

from trm.registry import Registry


@dataclass
class Conditioning:
    context: torch.Tensor  # (B, puzzle_emb_len, hidden)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> weighted sum over batch
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (sum, count)


class Conditioner(nn.Module):
    """Base class. ``demos`` says what the batch must carry of the demonstrations: None (nothing),
    ``"padded"`` (demo_inputs, demo_labels, demo_mask on the canvas), or a pair layout
    (``"sequence"``, ``"overlay"``: ``demos``, the pairs packed for that layout)."""

    demos: str | None = None
    context_positions: int | None = None  # positions of the context it fills (None: all)

    def forward(self, batch: dict[str, torch.Tensor]) -> Conditioning:
        raise NotImplementedError


CONDITIONERS = Registry("conditioner")
register_conditioner = CONDITIONERS.register


class PuzzleEmbedding(Conditioner):
    """The original TRM's learned per-puzzle vector.

    The table (num_puzzle_identifiers, hidden) starts at zero and is not a Parameter: it is updated
    sparsely by :class:`trm.optim.SparseSignSGD` from the rows looked up in the step. Each puzzle's
    vector fills the first context position; the other ``puzzle_emb_len - 1`` stay zero. Like the
    token embeddings it is scaled by sqrt(hidden).
    """

    context_positions = 1

    def __init__(self, num_puzzle_identifiers: int, hidden_size: int, puzzle_emb_len: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_puzzle_identifiers, hidden_size))
        self.emb_len, self.scale = puzzle_emb_len, math.sqrt(hidden_size)
        self.looked_up: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, rows with grad)

    def forward(self, batch: dict[str, torch.Tensor]) -> Conditioning:
        ids = batch["puzzle_identifiers"]
        rows = self.weight[ids]
        if self.training and torch.is_grad_enabled():
            rows = rows.detach().requires_grad_(True)
            self.looked_up = (ids, rows)
        B, H = rows.shape
        context = F.pad(rows, (0, (self.emb_len - 1) * H)).view(B, self.emb_len, H)
        return Conditioning(context * self.scale)


@register_conditioner("puzzle_embedding")
def _puzzle_embedding(arch, metadata: dict) -> Conditioner:
    return PuzzleEmbedding(metadata["num_puzzle_identifiers"], arch.hidden_size, arch.puzzle_emb_len)
