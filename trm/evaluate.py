"""Evaluation: every example runs all ``halt_max_steps``; token and exact accuracy per set; on the
test set, ARC voting over augmentations and pass@k.

Voting: each prediction is cropped to its grid as the published TRM's evaluator crops it (the
largest top-left all-colour rectangle, :func:`trm.data.grids.decode_grid`), the augmentation is
undone, and equal grids of the same (task, test input) pool their votes; candidates rank by count,
ties by mean sigmoid(q_halt). pass@k of a test input: its answer is among the top k. A task scores
the fraction of its test inputs passed; pass@k averages the tasks *evaluated* (not a fixed total).
Votes live for one call.

Conditioning reliance (:func:`evaluate_split` with ``reliance``): the same examples again with
another task's context and with the empty task's. With ``eval.adapt`` enabled, every pass first
adapts to the demonstrations (:mod:`trm.adapt`): each example's context is refined, or, for the
weight targets, the examples go by task (whole tasks per rank), each task predicted with its own
fine-tuned weights. :func:`evaluate_model`
runs a whole evaluation: the training examples, and each evaluation source of the test split on its
own; :func:`predict_examples` gives the vote records alone (``python -m trm.predict``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trm.adapt import adapt_context, adapt_latent, finetune, predict_per_task, task_batches
from trm.config import AdaptConfig, EvalConfig
from trm.data.dataset import ArcSplit
from trm.data.pipeline import Prefetcher, to_device
from trm.data.families import task_family
from trm.data.grids import decode_grid, inverse_augment


def grid_key(grid: np.ndarray) -> bytes:
    """A grid (uint8, h x w) as a vote key: shape bytes + cells."""
    return bytes(grid.shape) + grid.tobytes()


def grid_from_key(key: bytes) -> np.ndarray:
    """The grid of a vote key (:func:`grid_key`)."""
    return np.frombuffer(key[2:], np.uint8).reshape(key[0], key[1])


def select_examples(split: ArcSplit, augmentations: int | None, groups: int | None = None) -> np.ndarray:
    """Examples of the first ``augmentations`` puzzles (the original first) of ``groups`` groups
    spread evenly over the split (every group when None); all versions when ``augmentations`` is None."""
    chosen = np.arange(split.num_groups)
    if groups is not None and groups < split.num_groups:
        chosen = np.unique(np.linspace(0, split.num_groups - 1, groups).round().astype(np.int64))
    first = split.group_indices[chosen]
    last = split.group_indices[chosen + 1]
    if augmentations is not None:
        last = np.minimum(first + augmentations, last)
    keep = np.zeros(len(split.puzzle_identifiers), bool)
    for a, b in zip(first, last):
        keep[a:b] = True
    return np.flatnonzero(keep[split.example_puzzle])


@dataclass
class Prediction:
    """One evaluated example, reduced to what voting needs."""

    task: int
    pair: int
    grid: bytes  # predicted grid after undoing the augmentation (possibly the empty grid)
    answer: bytes  # the true grid, likewise
    q_halt_prob: float
    group: int = 0  # the breakdown group of its example (evaluate_split's ``groups``)


def _vote_records(split: ArcSplit, idx: np.ndarray, preds: np.ndarray, q_halt: np.ndarray,
                  groups: np.ndarray) -> list[Prediction]:  # fmt: skip
    size, out = split.grid_size, []
    labels = split.labels[idx]
    for i, example in enumerate(idx):
        puzzle = split.example_puzzle[example]
        t, colours = int(split.puzzle_dihedral[puzzle]), split.puzzle_colours[puzzle]
        out.append(Prediction(
            task=int(split.puzzle_task[puzzle]),
            pair=int(split.example_pair[example]),
            grid=grid_key(inverse_augment(decode_grid(preds[i], size), t, colours)),
            answer=grid_key(inverse_augment(decode_grid(labels[i], size), t, colours)),
            q_halt_prob=float(1 / (1 + np.exp(-np.float64(q_halt[i])))),
            group=int(groups[i]),
        ))  # fmt: skip
    return out


def ranked_grids(predictions: list[Prediction]) -> dict[tuple[int, int], list[bytes]]:
    """(task, test pair) -> its predicted grids, best first: by votes, ties by mean sigmoid(q_halt)."""
    votes: dict[tuple[int, int], dict[bytes, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for p in predictions:
        v = votes[(p.task, p.pair)][p.grid]
        v[0] += 1
        v[1] += p.q_halt_prob
    return {key: [g for g, _ in sorted(grids.items(), key=lambda kv: (-kv[1][0], -kv[1][1] / kv[1][0]))]
            for key, grids in votes.items()}  # fmt: skip


def pass_at_k(predictions: list[Prediction], ks: list[int], prefix: str = "ARC") -> dict[str, float]:
    """<prefix>/pass@k over the tasks present in ``predictions``."""
    answers = {(p.task, p.pair): p.answer for p in predictions}
    per_task: dict[int, list[np.ndarray]] = defaultdict(list)
    for (task, pair), ranked in ranked_grids(predictions).items():
        rank = next((r for r, g in enumerate(ranked) if g == answers[(task, pair)]), None)
        per_task[task].append(np.array([rank is not None and rank < k for k in ks], float))
    if not per_task:
        return {f"{prefix}/pass@{k}": 0.0 for k in ks}
    scores = np.mean([np.mean(pairs, axis=0) for pairs in per_task.values()], axis=0)
    return {f"{prefix}/pass@{k}": float(s) for k, s in zip(ks, scores)}


def wrong_contexts(split: ArcSplit, indices: np.ndarray, seed: int) -> np.ndarray | None:
    """For each example of ``indices``, an example of another task of ``indices`` whose context
    (puzzle id, demonstrations) it is evaluated with; None when fewer than two tasks are evaluated.

    The tasks, in a random order drawn from ``seed``, each take the context of the next one
    (the last that of the first): a cyclic shift, so no task keeps its own (a derangement). The
    k-th example of a task takes the (k mod n)-th of the n examples of its donor task, so augmented
    versions and pairs spread over the donor's examples.
    """
    tasks = split.example_task(indices)
    unique, task_of = np.unique(tasks, return_inverse=True)
    n = len(unique)
    if n < 2:
        return None
    order = np.random.default_rng([seed, 7]).permutation(n)
    donor_task = np.empty(n, np.int64)
    donor_task[order] = np.roll(order, -1)
    by_task = np.argsort(task_of, kind="stable")  # positions grouped by task, in order
    counts = np.bincount(task_of, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_task = np.empty(len(indices), np.int64)
    rank_in_task[by_task] = np.arange(len(indices)) - starts[task_of[by_task]]
    donors = donor_task[task_of]
    return np.asarray(indices)[by_task[starts[donors] + rank_in_task % counts[donors]]]


def _run_examples(model, split: ArcSplit, indices: np.ndarray, context_from: np.ndarray | None, groups: np.ndarray,
                  num_groups: int, local_batch_size: int, device, autocast, demos: str | None,
                  keep_records: bool, adapt: AdaptConfig = AdaptConfig()) -> tuple[torch.Tensor, list[Prediction]]:  # fmt: skip
    """Sums (token accuracy, exact, exact at halt, count, adaptation objective before, after,
    adaptation ms) over ``indices`` on this rank, one row per group of ``groups`` (num_groups, 7),
    and the vote records when ``keep_records``. With ``adapt``, each batch's contexts are first
    refined on its demonstrations (target=context: :func:`trm.adapt.adapt_context`), or the
    examples go by task, each task predicted with weights fine-tuned on its demonstrations
    (encoder / all: :func:`trm.adapt.finetune`). Batches are assembled a few ahead in a
    background thread."""
    adapting = adapt.enabled
    fine_tuning = adapting and adapt.of_weights

    def example_batch(start: int) -> tuple[np.ndarray, np.ndarray, dict]:
        positions = np.arange(start, min(start + local_batch_size, len(indices)))
        # Pad to a fixed batch shape (compiled kernels see one shape); padded rows are dropped. Not
        # when adapting: adapting them would cost as much as real rows.
        size = len(positions) if adapting else local_batch_size
        padded = np.concatenate([positions, np.full(size - len(positions), positions[-1])])
        ctx = None if context_from is None else context_from[padded]
        batch = split.batch(indices[padded], demos, ctx)
        if adapting and "demo_mask" not in batch:  # the demonstrations as the core reads grids, for the objective
            batch.update(split.canvases(split.demo_rows(indices[padded] if ctx is None else ctx)))
        return positions, np.arange(len(positions)), batch

    if fine_tuning:
        source, make = task_batches(split, indices, context_from, adapt), lambda b: b
    else:
        source, make = iter(range(0, len(indices), local_batch_size)), example_batch
    sums = torch.zeros(num_groups, 7, dtype=torch.float64, device=device)
    records: list[Prediction] = []
    with Prefetcher(source, make) as batches:
        for positions, rows, batch in batches:  # rows: where the batch holds the examples at ``positions``
            batch = to_device(batch, device)
            objectives = torch.zeros(2, len(batch["inputs"]), dtype=torch.float64, device=device)
            began = time.perf_counter()
            if fine_tuning:
                weights, *before_after = finetune(model, batch, adapt, autocast)
                before_after = [o.repeat_interleave(len(batch["inputs"]) // len(o)) for o in before_after]  # per row
            elif adapt.target == "latent":
                conditioning, *before_after = adapt_latent(model, batch, adapt, autocast)
            else:
                with autocast():
                    conditioning = model.condition(batch)
                if adapting:
                    conditioning, *before_after = adapt_context(model, conditioning, batch, adapt, autocast)
            adapt_ms = 0.0
            if adapting:
                objectives = torch.stack(before_after).double()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                adapt_ms = 1000 * (time.perf_counter() - began)
            if fine_tuning:
                preds, at_halt, q_halt = predict_per_task(model, weights, batch, autocast)
            else:
                with autocast():
                    preds, at_halt, q_halt = model.predict(batch, conditioning)
            n, rows = len(rows), torch.as_tensor(rows, device=device)
            preds, at_halt, labels = preds[rows], at_halt[rows], batch["labels"][rows]
            mask = labels != -100
            correct = (mask & (preds == labels)).sum(-1)
            counts = mask.sum(-1)
            exact_at_halt = (mask & (at_halt == labels)).sum(-1) == counts
            per_example = torch.stack([correct / counts.clamp_min(1), correct == counts, exact_at_halt,
                                       torch.ones_like(correct), *objectives[:, rows]], dim=1).double()  # fmt: skip
            adapt_ms_each = torch.full((n, 1), adapt_ms / n, dtype=torch.float64, device=device)
            sums.index_add_(0, torch.as_tensor(groups[positions], device=device), torch.cat([per_example, adapt_ms_each], 1))
            if keep_records:
                records += _vote_records(split, indices[positions], preds.to(torch.uint8).cpu().numpy(),
                                         q_halt[rows].float().cpu().numpy(), groups[positions])  # fmt: skip
    return sums, records


@torch.no_grad()
def predict_examples(model, split: ArcSplit, indices: np.ndarray, local_batch_size: int, device: torch.device,
                     autocast, demos: str | None, adapt: AdaptConfig = AdaptConfig()) -> list[Prediction]:  # fmt: skip
    """The vote records of ``indices`` in this process (no ranks), with ``adapt``'s test-time
    adaptation: what :func:`ranked_grids` turns into predictions."""
    was_training = model.training
    model.eval()
    _, records = _run_examples(model, split, np.asarray(indices), None, np.zeros(len(indices), np.int64), 1,
                               local_batch_size, device, autocast, demos, keep_records=True, adapt=adapt)  # fmt: skip
    model.train(was_training)
    return records


@torch.no_grad()
def evaluate_split(model, split: ArcSplit, indices: np.ndarray, local_batch_size: int, device: torch.device,
                   autocast, demos: str | None, vote: bool, ks: list[int], prefix: str, reliance: bool = False,
                   seed: int = 0, arc_prefix: str = "ARC", groups: dict[str, np.ndarray] | None = None,
                   adapt: AdaptConfig = AdaptConfig()) -> dict[str, float]:  # fmt: skip
    """Evaluate ``indices`` of ``split``, sharded across ranks; returns metrics on every rank.

    eval/<prefix>/accuracy: mean token accuracy and eval/<prefix>/exact_accuracy: fraction of examples
    entirely right, both after all halt_max_steps; eval/<prefix>/exact_accuracy_at_halt: the same
    for the prediction of the first step whose q_halt > 0 (the last step if none), as ACT would
    stop; eval/<prefix>/examples; and with ``vote``: <arc_prefix>/pass@k (on the full-step
    predictions) and eval/<prefix>/tasks.

    With ``reliance``, two more passes over the same examples measure how much the model relies on
    its task context: every example evaluated with the context of another task
    (:func:`wrong_contexts`; ..._wrong_context) and with the empty task's (blank puzzle id, no
    demonstrations; ..._null_context), giving eval/<prefix>/{accuracy,exact_accuracy}_{wrong,null}_context,
    eval/<prefix>/context_reliance (exact accuracy minus its wrong-context value) and
    eval/<prefix>/token_context_reliance (likewise for token accuracy).

    ``groups`` (name -> boolean mask over ``indices``, e.g. the task families) also breaks the
    right-context figures down: eval/<prefix>/<name>/{accuracy,exact_accuracy,examples} and, with
    ``vote``, <arc_prefix>/<name>/pass@k. It costs no extra pass.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = np.asarray(indices)
    names = list(groups or {})
    group_of = np.zeros(len(indices), np.int64)  # row 0: everything; row g + 1: group g
    for g, name in enumerate(names):
        group_of[groups[name]] = g + 1
    passes: dict[str, np.ndarray | None] = {"": None}
    if reliance:
        wrong = wrong_contexts(split, indices, seed)
        if wrong is not None:
            passes["_wrong_context"] = wrong
        passes["_null_context"] = np.full(len(indices), -1)
    task_of = split.example_task(indices)
    tasks = np.unique(task_of)
    num_tasks = len(tasks)
    mine = np.array_split(np.arange(len(indices)), world)[rank]  # this rank's positions
    if adapt.of_weights:  # whole tasks: each fine-tuned by one rank
        mine = np.flatnonzero(np.isin(task_of, np.array_split(tasks, world)[rank]))
    was_training = model.training
    model.eval()
    sums, records = [], []
    for suffix, context_from in passes.items():
        part, recs = _run_examples(model, split, indices[mine], None if context_from is None else context_from[mine],
                                   group_of[mine], len(names) + 1, local_batch_size, device, autocast, demos,
                                   keep_records=vote and not suffix, adapt=adapt)  # fmt: skip
        sums.append(part)
        records += recs
    model.train(was_training)
    sums = torch.stack(sums)  # (passes, groups + 1, 7)
    if world > 1:
        dist.all_reduce(sums)
        if vote:
            gathered: list[list[Prediction]] = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
    per_group = sums.tolist()
    metrics = {}
    for suffix, rows in zip(passes, per_group):
        token_acc, exact, exact_at_halt, count, before, after, adapt_ms = np.sum(rows, axis=0)
        metrics[f"eval/{prefix}/accuracy{suffix}"] = token_acc / max(count, 1)
        metrics[f"eval/{prefix}/exact_accuracy{suffix}"] = exact / max(count, 1)
        if not suffix:
            metrics[f"eval/{prefix}/exact_accuracy_at_halt"] = exact_at_halt / max(count, 1)
            metrics[f"eval/{prefix}/examples"] = count
            if adapt.enabled:
                metrics[f"eval/{prefix}/adapt_objective_before"] = before / max(count, 1)
                metrics[f"eval/{prefix}/adapt_objective_after"] = after / max(count, 1)
                metrics[f"eval/{prefix}/adapt_ms_per_example"] = adapt_ms / max(count, 1)
                metrics[f"eval/{prefix}/adapt_ms_per_task"] = adapt_ms / max(num_tasks, 1)
    if "_wrong_context" in passes:
        right, wrong = (f"eval/{prefix}/exact_accuracy", f"eval/{prefix}/exact_accuracy_wrong_context")
        metrics[f"eval/{prefix}/context_reliance"] = metrics[right] - metrics[wrong]
        metrics[f"eval/{prefix}/token_context_reliance"] = (
            metrics[f"eval/{prefix}/accuracy"] - metrics[f"eval/{prefix}/accuracy_wrong_context"])
    if vote:
        metrics.update(pass_at_k(records, ks, arc_prefix))
        metrics[f"eval/{prefix}/tasks"] = float(len({r.task for r in records}))
    for g, name in enumerate(names, start=1):
        token_acc, exact, _, count = per_group[0][g][:4]
        metrics[f"eval/{prefix}/{name}/accuracy"] = token_acc / max(count, 1)
        metrics[f"eval/{prefix}/{name}/exact_accuracy"] = exact / max(count, 1)
        metrics[f"eval/{prefix}/{name}/examples"] = count
        if vote:
            metrics.update(pass_at_k([r for r in records if r.group == g], ks, f"{arc_prefix}/{name}"))
    return metrics


def evaluation_sets(split: ArcSplit) -> dict[str, np.ndarray]:
    """The test split's examples by the source their task came from, named by the source's last
    part (``families/unseen_params`` -> ``unseen_params``); one set, ``test``, when all tasks
    share a source (ARC)."""
    everything = {"test": np.arange(split.num_examples)}
    if not split.task_sources or split.num_examples == 0:
        return everything
    source_of_example = np.asarray(split.task_sources)[split.example_task(np.arange(split.num_examples))]
    sources = list(dict.fromkeys(source_of_example))
    if len(sources) < 2:
        return everything
    names = [Path(s).name or s for s in sources]
    if len(set(names)) < len(names):
        names = [f"set{i}" for i in range(len(sources))]
    return {name: np.flatnonzero(source_of_example == s) for name, s in zip(names, sources)}


def family_groups(split: ArcSplit, indices: np.ndarray) -> dict[str, np.ndarray] | None:
    """For tasks of the family benchmark: family name -> mask over ``indices``; None otherwise."""
    families = [task_family(name) for name in split.tasks]
    if not any(families):
        return None
    of_example = np.asarray([f or "" for f in families])[split.example_task(indices)]
    return {f: of_example == f for f in sorted(set(of_example) - {""})}


def evaluate_model(model, train_split: ArcSplit, test_split: ArcSplit, cfg: EvalConfig, seed: int,
                   local_batch_size: int, device: torch.device, autocast, demos: str | None) -> dict[str, float]:  # fmt: skip
    """Every evaluation of a run: the training examples (eval/train/..., no voting) and each set of
    the test split (eval/test/... and ARC/pass@k for one set; eval/<set>/... and ARC/<set>/pass@k
    for several, ARC/pass@k then averaging all their tasks). Tasks of the family benchmark are also
    broken down by family (eval/<set>/<family>/exact_accuracy, ARC/<set>/<family>/pass@k)."""
    common = dict(local_batch_size=local_batch_size, device=device, autocast=autocast, demos=demos,
                  ks=cfg.pass_ks, reliance=cfg.reliance, seed=seed, adapt=cfg.adapt)  # fmt: skip
    metrics: dict[str, float] = {}
    if cfg.on_train:
        idx = select_examples(train_split, cfg.train_augmentations, cfg.train_groups)
        metrics.update(evaluate_split(model, train_split, idx, vote=False, prefix="train",
                                      groups=family_groups(train_split, idx), **common))  # fmt: skip
    if not test_split.num_examples:
        return metrics
    sets = evaluation_sets(test_split)
    chosen = select_examples(test_split, cfg.test_augmentations)
    for name, examples in sets.items():
        arc = "ARC" if len(sets) == 1 else f"ARC/{name}"
        idx = np.intersect1d(chosen, examples)
        metrics.update(evaluate_split(model, test_split, idx, vote=True, prefix=name, arc_prefix=arc,
                                      groups=family_groups(test_split, idx), **common))  # fmt: skip
    if len(sets) > 1:  # every test task counts once
        tasks = {name: metrics[f"eval/{name}/tasks"] for name in sets}
        for k in cfg.pass_ks:
            metrics[f"ARC/pass@{k}"] = sum(metrics[f"ARC/{n}/pass@{k}"] * t for n, t in tasks.items()) / sum(tasks.values())
    return metrics
