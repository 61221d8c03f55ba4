"""Exponential moving average of the trainable weights, used for evaluation and saved in checkpoints."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from trm.optim import undo_where_skipped_


class EMA:
    """shadow <- rate * shadow + (1 - rate) * param after every optimiser step."""

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, ok: torch.Tensor | None = None) -> None:
        """One averaging step; none where ``ok`` (0-dim bool, a skipped step) is False."""
        before = [s.clone() for s in self.shadow] if ok is not None else None
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.rate)
        undo_where_skipped_(ok, self.shadow, before)

    @contextmanager
    def applied(self):
        """Swap the averaged weights into the model for the duration of the block."""
        backup = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, backup)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The averaged weights into the model, for good."""
        torch._foreach_copy_(self.params, self.shadow)

    def state_dict(self) -> dict:
        return {"rate": self.rate, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(t.shape) for t in state["shadow"]]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise ValueError(f"{len(shapes)} averaged tensors of shapes {shapes[:3]}... for {len(self.params)} weights")
        with torch.no_grad():
            torch._foreach_copy_(self.shadow, state["shadow"])
