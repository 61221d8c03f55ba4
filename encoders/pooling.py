"""Pooling of a grid's cells into one vector, chosen by ``arch.encoder_pooling_method``.

Every pooling sees a cell mask (B, T) and ignores masked cells (PAD) entirely.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from encoders.registry import register_pooling
from trm.model.layers import at_least_float32, linear, trunc_normal_


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of x over ``dim`` where mask is True; zero where nothing is valid. mask broadcasts
    against x without its last axis."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


class Pooling(nn.Module):
    """``prepend`` may add tokens before the transformer (CLS); ``forward`` pools its output."""

    def prepend(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, mask

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_pooling("mean")
class MeanPooling(Pooling):
    def __init__(self, dim: int):
        super().__init__()

    def forward(self, h, mask):
        """h: (N, T, d), mask: (N, T) -> (N, d)."""
        return masked_mean(h, mask, dim=1)


@register_pooling("attention")
class AttentionPooling(Pooling):
    """A learned query attends over the cells: softmax(q . k / sqrt(d)) weighted sum of values."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(trunc_normal_(torch.empty(dim), 1.0))
        self.key, self.value = linear(dim, dim), linear(dim, dim)

    def forward(self, h, mask):
        scores = self.key(h) @ self.query.to(h.dtype) / math.sqrt(h.shape[-1])  # (N, T)
        # The lowest finite value, not -inf: a row with no valid cell gets finite uniform weights.
        scores = at_least_float32(scores)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1).to(h.dtype)
        return (weights.unsqueeze(-1) * self.value(h)).sum(1)


@register_pooling("cls")
class ClsPooling(Pooling):
    """A learned CLS token is prepended to the cells; its output is the grid's vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.cls = nn.Parameter(trunc_normal_(torch.empty(dim), 1.0))

    def prepend(self, x, mask):
        cls = self.cls.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1), torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)

    def forward(self, h, mask):
        return h[:, 0]
