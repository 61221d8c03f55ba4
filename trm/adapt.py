"""Test-time adaptation of the task context on the task's own demonstrations (``eval.adapt``).

``target=context`` (LPN's latent search): before predicting, the context each example gets (from
the encoder, or the puzzle embedding's row; for a task never trained on, the blank row) is refined
by gradient steps on the *demonstration objective*, the model's weights frozen:

    objective(c) = mean over the example's demonstration pairs (x_j, y_j) of the per-token
                   stablemax cross-entropy of y_j given x_j and context c

with the model run as in evaluation for ``act_steps`` ACT steps (all ``halt_max_steps`` by default),
the gradient through the last. One context per example, fitted to all its demonstrations; of the
contexts along the way, the one with the lowest objective is kept (never worse than the start).
The puzzle embedding only ever fills the first context position, so only that one moves for it.

Shapes: B examples, D demonstration slots, L = grid_size^2 cells, context (B, P, hidden).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from trm.config import AdaptConfig
from trm.data.grids import IGNORE_LABEL_ID, PAD_ID
from trm.losses import stablemax_cross_entropy
from trm.model.conditioning import Conditioning


def demonstration_objective(model, context: torch.Tensor, demos: dict[str, torch.Tensor], act_steps: int) -> torch.Tensor:
    """(B,) objective of each example's context ``context`` (B, P, hidden): demos holds the
    canvases demo_inputs, demo_labels (B, D, L) and demo_mask (B, D); PAD cells of an output are
    not predicted (as PAD labels in training).
    Differentiable in ``context`` through the last ACT step; an example without demonstrations
    gets 0."""
    B, D, L = demos["demo_inputs"].shape
    present = demos["demo_mask"].flatten().nonzero().squeeze(-1)  # evaluation only: a sync is fine
    labels = demos["demo_labels"].flatten(0, 1)[present].long()
    labels = labels.masked_fill(labels == PAD_ID, IGNORE_LABEL_ID)  # as the training labels
    pairs = {"inputs": demos["demo_inputs"].flatten(0, 1)[present], "labels": labels}
    owner = present // D
    cond = Conditioning(context[owner])
    carry = model.initial_carry(pairs)
    with torch.no_grad():
        for _ in range(act_steps - 1):
            carry, _ = model(carry, pairs, cond)
    carry, out = model(carry, pairs, cond)
    per_token = stablemax_cross_entropy(out.logits, pairs["labels"])  # (N, L) float64
    per_pair = per_token.sum(-1) / (pairs["labels"] != IGNORE_LABEL_ID).sum(-1).clamp_min(1)
    total = torch.zeros(B, dtype=per_pair.dtype, device=per_pair.device).index_add(0, owner, per_pair)
    return total / demos["demo_mask"].sum(-1).clamp_min(1)


def adapt_context(model, conditioning: Conditioning, demos: dict[str, torch.Tensor], cfg: AdaptConfig,
                  autocast) -> tuple[Conditioning, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The context refined by ``cfg.steps`` Adam steps on :func:`demonstration_objective`, the
    best seen kept per example. Returns the new conditioning and the objectives (B,) before and
    after. No weight of the model changes (gradients are taken for the context alone)."""
    start = conditioning.context.detach().float()
    act_steps = cfg.act_steps or model.arch.halt_max_steps
    movable = torch.ones_like(start[0, :, :1])  # (P, 1): the positions the conditioner fills
    if model.conditioner.context_positions is not None:
        movable[model.conditioner.context_positions :] = 0
    context = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([context], lr=cfg.lr)
    best, best_objective = start.clone(), None
    with torch.enable_grad():
        for step in range(cfg.steps + 1):
            with autocast():
                objective = demonstration_objective(model, context, demos, act_steps)
            if best_objective is None:
                before = best_objective = objective.detach()
            better = objective.detach() < best_objective
            best = torch.where(better[:, None, None], context.detach(), best)
            best_objective = torch.where(better, objective.detach(), best_objective)
            if step == cfg.steps:
                break
            (grad,) = torch.autograd.grad(objective.sum(), [context])
            context.grad = grad * movable
            optimiser.step()
    return replace(conditioning, context=best.to(conditioning.context.dtype)), before, best_objective
