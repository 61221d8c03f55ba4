"""LPN-style encoders: a deeper pre-norm grid transformer (4 layers) whose pooled output (CLS
pooling in the plan's E2/E3) represents each demonstration pair.

``lpn_standard``: a set transformer (self-attention across the valid pairs, no positions), then
the masked mean over pairs, then a linear map to the context tokens.

``lpn_variational``: each pair gives a Gaussian (mu, logvar); training samples
z = mu + exp(logvar / 2) * eps, evaluation takes mu; the masked mean of z over pairs maps to the
context. KL(q || N(0, I)) per pair, averaged over a sample's valid pairs, is added to the loss
with weight ``kl_weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from encoders.base import DemoEncoder
from encoders.pooling import masked_mean
from encoders.registry import register_encoder
from trm.model.conditioning import Conditioning
from trm.model.layers import Block, at_least_float32, linear

LOGVAR_RANGE = (-10.0, 10.0)  # exp stays within float range and the KL finite


def _any_key(mask: torch.Tensor) -> torch.Tensor:
    """Key mask for attention across pairs: a sample with no pair gets all keys (zero vectors),
    so its softmax stays finite; its output is dropped by the masked mean anyway."""
    return mask | ~mask.any(dim=1, keepdim=True)


@register_encoder("lpn_standard")
class LPNStandardEncoder(DemoEncoder):
    default_layers = 4

    def __init__(self, arch, metadata):
        super().__init__(arch, metadata)
        self.set_blocks = nn.ModuleList(
            Block(self.dim, self.heads, arch.expansion, post_norm=False, eps=arch.rms_norm_eps)
            for _ in range(arch.encoder_set_layers)
        )

    def aggregate(self, pairs, mask) -> Conditioning:
        x, keys = pairs, _any_key(mask)
        for block in self.set_blocks:
            x = block(x, key_mask=keys)
        return Conditioning(self.context_from(masked_mean(x, mask, dim=1)))


@register_encoder("lpn_variational")
class LPNVariationalEncoder(DemoEncoder):
    default_layers = 4

    def __init__(self, arch, metadata):
        super().__init__(arch, metadata)
        self.mu, self.logvar = linear(self.dim, self.dim, bias=True), linear(self.dim, self.dim, bias=True)

    def aggregate(self, pairs, mask) -> Conditioning:
        mu = at_least_float32(self.mu(pairs))
        logvar = at_least_float32(self.logvar(pairs)).clamp(*LOGVAR_RANGE)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        kl_per_pair = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)  # (B, D)
        kl = masked_mean(kl_per_pair.unsqueeze(-1), mask, dim=1).squeeze(-1)  # (B,)
        n = torch.full((), float(kl.shape[0]), device=kl.device)
        return Conditioning(
            self.context_from(masked_mean(z.to(pairs.dtype), mask, dim=1)),
            aux_losses={"kl_loss": self.arch.kl_weight * kl.sum()},
            metrics={"train/kl": (kl.sum().detach(), n)},
        )
