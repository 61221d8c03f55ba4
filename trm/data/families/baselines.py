"""Programs that read only a task's demonstrations: reference points for a model's accuracy on the
family benchmark. (Copying the input solves nothing: every generated pair changes its input.)

- ``empty``: the test input's shape, every cell background (where a program moves or erases every
  coloured cell: a shift that carries them all off the grid);
- ``colour_map``: each colour of the test input becomes the colour it becomes, cell for cell, in the
  demonstrations whose output has their input's shape; a colour that no demonstration shows stays
  itself. No answer where the demonstrations send one colour to two (no map explains them). This
  is what a model that learned to look colours up in the demonstrations can reach: a held-out
  task it does not solve holds a colour whose fate no demonstration shows, or is no colour map.

``python -m trm.data.families --baselines`` prints their share of each part's test outputs.
"""

from __future__ import annotations

import numpy as np

from trm.data.families import family_of
from trm.data.tasks import ArcTask

Grid = np.ndarray


def empty(task: ArcTask, test_input: Grid) -> Grid | None:
    return np.zeros_like(test_input)


def colour_map(task: ArcTask, test_input: Grid) -> Grid | None:
    table = np.arange(10)  # colour -> colour; unseen colours stay
    seen = np.zeros(10, dtype=bool)
    for pair in task.demos:
        if pair.input.shape != pair.output.shape:
            continue
        for a, b in {(int(a), int(b)) for a, b in zip(pair.input.flat, pair.output.flat)}:
            if seen[a] and table[a] != b:
                return None
            table[a], seen[a] = b, True
    return table[test_input].astype(test_input.dtype)


BASELINES = {"empty": empty, "colour_map": colour_map}


def solved_share(tasks: list[ArcTask]) -> dict[str, dict[str, tuple[int, int]]]:
    """{family: {baseline: (test outputs it gets exactly right, test outputs with an answer)}} over ``tasks``."""
    table: dict[str, dict[str, list[int]]] = {}
    for task in tasks:
        family = family_of(task.name)[0]
        for name, program in BASELINES.items():
            counts = table.setdefault(family, {}).setdefault(name, [0, 0])
            for test in (t for t in task.tests if t.output is not None):
                answer = program(task, test.input)
                counts[0] += int(answer is not None and answer.shape == test.output.shape and np.array_equal(answer, test.output))
                counts[1] += 1
    return {family: {name: (c[0], c[1]) for name, c in by.items()} for family, by in table.items()}
