"""Test-time adaptation on each task's own demonstrations (``eval.adapt``), three kinds.

``target=context``: before predicting, the context each example gets (from
the encoder, or the puzzle embedding's row; for a task never trained on, the blank row) is refined
by gradient steps on the *demonstration objective*, the model's weights frozen:

    objective(c) = mean over the example's demonstration pairs (x_j, y_j) of the per-token
                   stablemax cross-entropy of y_j given x_j and context c

with the model run as in evaluation for ``act_steps`` ACT steps (all ``halt_max_steps`` by default),
the gradient through the last. One context per example, fitted to all its demonstrations; of the
contexts along the way, the one with the lowest objective is kept (never worse than the start).
The puzzle embedding only ever fills the first context position, so only that one moves for it.

``target=latent`` (LPN's latent search, leave-one-out): the conditioner's *latent*, its
representation of each demonstration pair (``encode_dense``), is refined instead, on the objective
that predicts each demonstration from the context of the task's other pairs
(:meth:`trm.model.trm.TinyRecursiveModel.latent_objective`, the objective of the latent steps a
model may be trained with, which run first): a conditioner whose context holds the demonstrations'
cells would fit the all-demonstrations objective by copying them.

``target=encoder`` / ``target=all`` (test-time training): the demo encoder's weights (or every
weight) are fine-tuned per task on the *leave-one-out* objective: each demonstration's output
predicted from its input with the context the encoder computes from the task's *other*
demonstrations, averaged over the pairs, optionally over augmented copies of the demonstrations
(a random dihedral transform and colour permutation each, as in training). Each task gets its own
copy of the weights: ``tasks_per_batch`` tasks are fitted at once by ``torch.func.vmap`` over
stacked weights (Adam is elementwise, so one optimiser over the stack updates each task's copy from
its own gradient alone). The weights with the lowest objective along the way predict the task's
examples; the model's own weights are never written (functional calls), so nothing needs
restoring.

Shapes: B examples, D demonstration slots, L = grid_size^2 cells, context (B, P, hidden); per-task
tensors carry a leading T (tasks), A (copies) or E (the task's evaluated examples).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from trm.config import AdaptConfig
from trm.errors import InputError
from trm.data.dataset import ArcSplit
from trm.data.grids import NUM_DIHEDRAL, augment, decode_grid, encode_grid, random_colour_permutation
from trm.model.conditioning import Conditioning
from trm.model.layers import at_least_float32


def demonstration_objective(model, conditioning: Conditioning, demos: dict[str, torch.Tensor],
                            act_steps: int) -> torch.Tensor:  # fmt: skip
    """(B,) objective of each example's context ``conditioning`` (B rows): demos holds the canvases
    demo_inputs, demo_labels (B, D, L) and demo_mask (B, D). Differentiable in the context through
    the last ACT step; an example without demonstrations gets 0."""
    B, D, L = demos["demo_inputs"].shape
    present = demos["demo_mask"].flatten().nonzero().squeeze(-1)  # evaluation only: a sync is fine
    owner = present // D
    per_pair = model.pair_losses(demos["demo_inputs"].flatten(0, 1)[present], demos["demo_labels"].flatten(0, 1)[present],
                                 conditioning.rows(owner), act_steps)  # fmt: skip
    total = torch.zeros(B, dtype=per_pair.dtype, device=per_pair.device).index_add(0, owner, per_pair)
    return total / demos["demo_mask"].sum(-1).clamp_min(1)


def _optimiser(cfg: AdaptConfig, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
    return (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)(tensors, lr=cfg.lr)


def descend(start: dict[str, torch.Tensor], objective_of, cfg: AdaptConfig, autocast,
            grad_mask: dict[str, torch.Tensor] | None = None):  # fmt: skip
    """``cfg.steps`` optimiser steps on ``objective_of(tensors)`` -> (N,), one objective per row of
    the tensors ``start`` (name -> (N, ...): a context per example, or a weight copy per task; they
    are updated in place, so the caller hands over its own copies). Each row keeps the values of
    its lowest objective along the way, so it never ends worse than it started. ``grad_mask``
    (name -> broadcastable 0/1) keeps parts of a tensor still. Returns (the kept tensors, the
    objectives before, after). Gradients are taken for these tensors alone: no weight of a model
    used by the objective gets a .grad."""
    tensors = {name: t.detach().requires_grad_(True) for name, t in start.items()}
    optimiser = _optimiser(cfg, list(tensors.values()))
    best, best_objective = {name: t.detach().clone() for name, t in tensors.items()}, None
    with torch.enable_grad():
        for step in range(cfg.steps + 1):
            with autocast():
                objective = objective_of(tensors)
            if best_objective is None:
                before = best_objective = objective.detach()
            better = objective.detach() < best_objective
            for name, t in tensors.items():
                best[name] = torch.where(better.view(-1, *[1] * (t.ndim - 1)), t.detach(), best[name])
            best_objective = torch.where(better, objective.detach(), best_objective)
            if step == cfg.steps:
                break
            # A tensor the objective does not use (e.g. a pooling the encoder does not call) gets 0.
            grads = torch.autograd.grad(objective.sum(), list(tensors.values()), materialize_grads=True)
            for (name, t), g in zip(tensors.items(), grads):
                t.grad = g * grad_mask[name] if grad_mask and name in grad_mask else g
            optimiser.step()
    return best, before, best_objective


def adapt_context(model, conditioning: Conditioning, demos: dict[str, torch.Tensor], cfg: AdaptConfig,
                  autocast) -> tuple[Conditioning, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The context refined by :func:`descend` on :func:`demonstration_objective`. Returns the new
    conditioning and the objectives (B,) before and after. No weight of the model changes."""
    start = conditioning.context.detach().float().clone()
    act_steps = cfg.act_steps or model.arch.halt_max_steps
    movable = torch.ones_like(start[0, :, :1])  # (P, 1): the positions the conditioner fills
    if model.conditioner.context_positions is not None:
        movable[model.conditioner.context_positions :] = 0
    objective = lambda t: demonstration_objective(model, conditioning.with_context(t["context"]), demos, act_steps)  # noqa: E731
    best, before, after = descend({"context": start}, objective, cfg, autocast, {"context": movable})
    return replace(conditioning, context=best["context"].to(conditioning.context.dtype)), before, after


def adapt_latent(model, demos: dict[str, torch.Tensor], cfg: AdaptConfig, autocast) -> tuple[Conditioning, torch.Tensor, torch.Tensor]:
    """LPN's latent search: the conditioner's latent (its pair representations of the canvases
    demo_inputs, demo_labels (B, D, L), after the latent steps the model was trained with, where it
    takes them) refined by :func:`descend` on the leave-one-out objective
    (:meth:`TinyRecursiveModel.latent_objective`), weights frozen. Returns the context of the kept
    latent and the objectives (B,) before and after."""
    conditioner, act_steps = model.conditioner, cfg.act_steps or model.arch.halt_max_steps
    with autocast():
        latent = conditioner.encode_dense(demos["demo_inputs"], demos["demo_labels"])
        if conditioner.latent_steps is not None:
            latent = model.latent_descent(latent, demos, conditioner.latent_steps)
    objective = lambda t: model.latent_objective(t["latent"], demos, act_steps)  # noqa: E731
    best, before, after = descend({"latent": at_least_float32(latent.detach())}, objective, cfg, autocast)
    with autocast():
        return conditioner.context_of_pairs(best["latent"].to(latent.dtype), demos["demo_mask"]), before, after


# Fine-tuning of weights per task (target=encoder / all) -------------------------------------------


def check_target(cfg: AdaptConfig, model) -> None:
    """Fail at once (not at the first evaluation) on a target the model cannot adapt."""
    conditioner = model.conditioner
    if (cfg.of_weights or cfg.target == "latent") and not conditioner.can_fine_tune:
        raise InputError(f"eval.adapt.target={cfg.target} runs the leave-one-out objective on the conditioner's "
                         f"dense encoding of the demonstrations, which the {conditioner.name} conditioner does not "
                         "have; eval.adapt.target=context adapts its context")  # fmt: skip
    if cfg.of_weights and conditioner.latent_steps is not None:
        raise InputError(f"eval.adapt.target={cfg.target} is not supported with latent steps (arch.latent_steps > 0): "
                         "their gradients do not run under the per-task vmap; eval.adapt.target=latent continues "
                         "the latent search instead")  # fmt: skip


def augmented_copies(split: ArcSplit, rows: np.ndarray, tasks: np.ndarray, copies: int) -> dict[str, torch.Tensor]:
    """The demonstrations of pool rows ``rows`` (T, D) (-1: none), one task each, in ``copies``
    versions: fit_inputs, fit_labels (T, A, D, L) int32 canvases and fit_mask (T, A, D). Copy 0 is
    as given; copy a > 0 of task t applies the dihedral transform and colour permutation drawn from
    the seed (t, a), to every demonstration alike (an augmented copy is the same task's rule)."""
    canvases = split.canvases(rows)
    inputs = canvases["demo_inputs"].numpy()[:, None].repeat(copies, 1)
    labels = canvases["demo_labels"].numpy()[:, None].repeat(copies, 1)
    S = split.grid_size
    for t, task in enumerate(tasks):
        for a in range(1, copies):
            rng = np.random.default_rng([int(task) + 1, a])
            transform, colours = int(rng.integers(NUM_DIHEDRAL)), random_colour_permutation(rng)
            for d in np.flatnonzero(rows[t] >= 0):
                for grids in (inputs, labels):
                    grids[t, a, d] = encode_grid(augment(decode_grid(grids[t, 0, d], S), transform, colours), S)
    return {"fit_inputs": torch.from_numpy(inputs), "fit_labels": torch.from_numpy(labels),
            "fit_mask": canvases["demo_mask"][:, None].expand(-1, copies, -1).contiguous()}  # fmt: skip


def task_batches(split: ArcSplit, indices: np.ndarray, context_from: np.ndarray | None,
                 cfg: AdaptConfig) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:  # fmt: skip
    """The examples ``indices`` grouped by the task their context comes from (``context_from``, as
    in :meth:`ArcSplit.batch`; the empty task is one group), ``cfg.tasks_per_batch`` tasks at a
    time. Yields (positions in ``indices`` of the batch's examples, their rows in the batch, batch):
    the batch has T * E rows (E: the most examples of one of its tasks; a task with fewer repeats
    its last), padded demonstrations, and the copies each task is fitted on
    (:func:`augmented_copies` of the demonstrations of its first example)."""
    ctx = indices if context_from is None else context_from
    task = np.where(ctx < 0, -1, split.example_task(np.maximum(ctx, 0)))
    order = np.argsort(task, kind="stable")
    tasks, first, counts = np.unique(task[order], return_index=True, return_counts=True)
    for c in range(0, len(tasks), cfg.tasks_per_batch):
        chunk = slice(c, c + cfg.tasks_per_batch)
        E = int(counts[chunk].max())
        slots = order[first[chunk][:, None] + np.minimum(np.arange(E), counts[chunk][:, None] - 1)]  # (T, E)
        valid = np.arange(E) < counts[chunk][:, None]
        batch = split.batch(indices[slots.ravel()], "padded", None if context_from is None else context_from[slots.ravel()])
        batch.update(augmented_copies(split, split.demo_rows(ctx[slots[:, 0]]), tasks[chunk], cfg.augmentations))
        yield slots[valid], np.flatnonzero(valid), batch


class _Bound(nn.Module):
    """``fn(model, *args)`` as a module's forward, so that functional_call can swap its weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def _per_task(fn, model, weights: dict[str, torch.Tensor], *args: torch.Tensor):
    """fn(model, *args) for each task t with the weights ``weights[name][t]`` in place of those
    named: one vmapped call over the leading (task) axis of the weights and of ``args``."""
    bound = _Bound(model)
    params = {f"model.{name}": w for name, w in weights.items()}
    call = lambda p, *a: functional_call(bound, p, (fn, *a), strict=False)  # noqa: E731
    with warnings.catch_warnings():  # attention without a batching rule on some devices: looped, correct
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        return vmap(call, randomness="same")(params, *args)


def _leave_one_out_objective(model, inputs, labels, mask, act_steps: int) -> torch.Tensor:
    """One task: () mean over its present pairs (A copies x D slots; inputs, labels (A, D, L),
    mask (A, D)) of each pair's loss given the context of its copy's other pairs."""
    demos = {"demo_inputs": inputs, "demo_labels": labels, "demo_mask": mask}
    per_copy = model.latent_objective(model.conditioner.encode_dense(inputs, labels), demos, act_steps)  # (A,)
    return per_copy.mean()  # every copy holds the same pairs


def _predict(model, inputs, demo_inputs, demo_labels, demo_mask):
    """One task's E examples (inputs (E, L); their demonstrations (E, D, L), demo_mask (E, D)) as
    evaluation predicts them: see :meth:`TinyRecursiveModel.predict`."""
    conditioner = model.conditioner
    pairs = conditioner.encode_dense(demo_inputs, demo_labels)  # (E, D, ...)
    return model.predict({"inputs": inputs}, conditioner.context_of_pairs(pairs, demo_mask))


def finetune(model, fit: dict[str, torch.Tensor], cfg: AdaptConfig, autocast):
    """Each task's copy of the adapted weights (the encoder's for target=encoder, every one for
    all), fitted by ``cfg.steps`` optimiser steps on its leave-one-out objective from the copies
    of its demonstrations ``fit`` (fit_inputs, fit_labels (T, A, D, L), fit_mask (T, A, D)); of the
    copies along the way, the one with the lowest objective is kept. Returns the weights
    (name -> (T, ...)) and the objectives (T,) before and after."""
    T = fit["fit_inputs"].shape[0]
    prefix = "conditioner." if cfg.target == "encoder" else ""  # the conditioner's weights, or every weight
    weights = {name: p.detach()[None].repeat(T, *[1] * p.ndim)
               for name, p in model.named_parameters() if name.startswith(prefix)}  # fmt: skip
    act_steps = cfg.act_steps or model.arch.halt_max_steps
    loo = lambda m, *a: _leave_one_out_objective(m, *a, act_steps)  # noqa: E731
    objective_of = lambda w: _per_task(loo, model, w, fit["fit_inputs"], fit["fit_labels"], fit["fit_mask"])  # noqa: E731
    return descend(weights, objective_of, cfg, autocast)


@torch.no_grad()
def predict_per_task(model, weights: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], autocast):
    """The T * E examples of a batch of :func:`task_batches`, task t's with its weights
    ``weights[name][t]``: predictions, those at halt (T * E, L) and q_halt (T * E,)."""
    T = next(iter(weights.values())).shape[0]
    per_task = lambda t: t.view(T, -1, *t.shape[1:])  # noqa: E731  (T * E, ...) -> (T, E, ...)
    with autocast():
        out = _per_task(_predict, model, weights, *(per_task(batch[k]) for k in
                                                     ("inputs", "demo_inputs", "demo_labels", "demo_mask")))  # fmt: skip
    return tuple(t.flatten(0, 1) for t in out)
