"""``standard``: a per-demonstration grid transformer (2 layers), pooled to one vector per pair;
``puzzle_emb_len`` learned queries then cross-attend over the valid pairs, one query per context
token. Cross-attention without positions is a set operation: demonstration order does not matter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.base import DemoEncoder
from encoders.registry import register_encoder
from trm.model.conditioning import Conditioning
from trm.model.layers import SwiGLU, linear, rms_norm, trunc_normal_


@register_encoder("standard")
class StandardEncoder(DemoEncoder):
    default_layers = 2

    def __init__(self, arch, metadata):
        super().__init__(arch, metadata)
        d, P = self.dim, arch.puzzle_emb_len
        self.queries = nn.Parameter(trunc_normal_(torch.empty(P, d), 1.0))
        self.q, self.kv, self.out = linear(d, d), linear(d, 2 * d), linear(d, d)
        self.mlp = SwiGLU(d, arch.expansion)
        self.to_context = linear(d, arch.hidden_size)  # per query: (B, P, d) -> (B, P, hidden)

    def aggregate(self, pairs, mask) -> Conditioning:
        B, D, d = pairs.shape
        h = self.heads
        q = self.q(rms_norm(self.queries)).view(1, -1, h, d // h).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = self.kv(rms_norm(pairs)).view(B, D, 2, h, d // h).permute(2, 0, 3, 1, 4)
        # A sample without any demonstration attends uniformly over zero vectors (finite output).
        keys = (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        x = self.queries + self.out(attended.transpose(1, 2).reshape(B, -1, d))
        x = x + self.mlp(rms_norm(x))
        return Conditioning(self.scaled(self.to_context(x)))
