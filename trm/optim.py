"""The dense optimiser (AdamATan2) and the learning-rate schedule. A conditioner brings its own
sparse optimiser where it has one (:meth:`trm.model.conditioning.Conditioner.sparse_optimizer`)."""

from __future__ import annotations

import math

import torch


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
