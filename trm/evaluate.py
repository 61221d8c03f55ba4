"""Evaluation: every example runs all ``halt_max_steps``; token and exact accuracy per set; on the
test set, ARC voting over augmentations and pass@k.

Voting: each prediction is cropped to its grid as the published TRM's evaluator crops it (the
largest top-left all-colour rectangle, :func:`trm.data.grids.decode_grid`), the augmentation is
undone, and equal grids of the same (task, test input) pool their votes; candidates rank by count,
ties by mean sigmoid(q_halt).
pass@k of a test input: its answer is among the top k. A task scores the fraction of its test
inputs passed; pass@k averages the tasks *evaluated* (not a fixed total). Votes live for one call.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from trm.data.dataset import ArcSplit
from trm.data.grids import decode_grid, inverse_augment


def grid_key(grid: np.ndarray) -> bytes:
    return bytes(grid.shape) + grid.tobytes()


def select_examples(split: ArcSplit, augmentations: int | None) -> np.ndarray:
    """Examples of the first ``augmentations`` puzzles of every group (the original first); all
    examples when None."""
    if augmentations is None:
        return np.arange(split.num_examples)
    first = split.group_indices[:-1]
    last = np.minimum(first + augmentations, split.group_indices[1:])
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


def _vote_records(split: ArcSplit, idx: np.ndarray, preds: np.ndarray, q_halt: np.ndarray) -> list[Prediction]:
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
        ))  # fmt: skip
    return out


def pass_at_k(predictions: list[Prediction], ks: list[int]) -> dict[str, float]:
    """ARC/pass@k over the tasks present in ``predictions``."""
    votes: dict[tuple[int, int], dict[bytes, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    answers: dict[tuple[int, int], bytes] = {}
    for p in predictions:
        answers[(p.task, p.pair)] = p.answer
        v = votes[(p.task, p.pair)][p.grid]
        v[0] += 1
        v[1] += p.q_halt_prob
    per_task: dict[int, list[np.ndarray]] = defaultdict(list)
    for (task, pair), answer in answers.items():
        ranked = sorted(votes[(task, pair)].items(), key=lambda kv: (-kv[1][0], -kv[1][1] / kv[1][0]))
        rank = next((r for r, (g, _) in enumerate(ranked) if g == answer), None)
        per_task[task].append(np.array([rank is not None and rank < k for k in ks], float))
    if not per_task:
        return {f"ARC/pass@{k}": 0.0 for k in ks}
    scores = np.mean([np.mean(pairs, axis=0) for pairs in per_task.values()], axis=0)
    return {f"ARC/pass@{k}": float(s) for k, s in zip(ks, scores)}


@torch.no_grad()
def evaluate_split(model, split: ArcSplit, indices: np.ndarray, local_batch_size: int, device: torch.device,
                   autocast, with_demos: bool, vote: bool, ks: list[int], prefix: str) -> dict[str, float]:
    """Evaluate ``indices`` of ``split``, sharded across ranks; returns metrics on every rank.

    eval/<prefix>/accuracy: mean token accuracy and eval/<prefix>/exact_accuracy: fraction of examples
    entirely right, both after all halt_max_steps; eval/<prefix>/exact_accuracy_at_halt: the same
    for the prediction of the first step whose q_halt > 0 (the last step if none), as ACT would
    stop; eval/<prefix>/examples; and with ``vote``: ARC/pass@k (on the full-step predictions).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = np.array_split(indices, world)[rank]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # token accuracy, exact, exact at halt, count
    records: list[Prediction] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(shard), local_batch_size):
        idx = shard[start : start + local_batch_size]
        # Pad to a fixed batch shape (compiled kernels see one shape); padded rows are dropped.
        padded = np.concatenate([idx, np.full(local_batch_size - len(idx), idx[-1])])
        batch = {k: v.to(device, non_blocking=True) for k, v in split.batch(padded, with_demos).items()}
        with autocast():
            carry = model.initial_carry(batch)
            conditioning = model.conditioner(batch)
            # Also keep the prediction of the first step whose q_halt > 0, where ACT would stop.
            halted = torch.zeros(len(padded), dtype=torch.bool, device=device)
            at_halt = None
            for _ in range(model.arch.halt_max_steps):
                carry, out = model(carry, batch, conditioning)
                preds = out.logits.argmax(-1)
                at_halt = preds if at_halt is None else torch.where(halted[:, None], at_halt, preds)
                halted |= out.q_halt > 0
        n = len(idx)
        preds, at_halt, labels = preds[:n], at_halt[:n], batch["labels"][:n]
        mask = labels != -100
        correct = (mask & (preds == labels)).sum(-1)
        counts = mask.sum(-1)
        exact_at_halt = ((mask & (at_halt == labels)).sum(-1) == counts).sum()
        sums += torch.stack([(correct / counts.clamp_min(1)).sum(), (correct == counts).sum(), exact_at_halt,
                             torch.tensor(n, device=device)])  # fmt: skip
        if vote:
            records += _vote_records(split, idx, preds.to(torch.uint8).cpu().numpy(), out.q_halt[:n].float().cpu().numpy())
    model.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
        if vote:
            gathered: list[list[Prediction]] = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
    token_acc, exact, exact_at_halt, count = sums.tolist()
    metrics = {
        f"eval/{prefix}/accuracy": token_acc / max(count, 1),
        f"eval/{prefix}/exact_accuracy": exact / max(count, 1),
        f"eval/{prefix}/exact_accuracy_at_halt": exact_at_halt / max(count, 1),
        f"eval/{prefix}/examples": count,
    }
    if vote:
        metrics.update(pass_at_k(records, ks))
        metrics[f"eval/{prefix}/tasks"] = float(len({r.task for r in records}))
    return metrics
