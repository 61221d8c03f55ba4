"""What every task family shares: the parameterised program, the input distribution, held-out
parameter combinations, and the generation of validated, non-degenerate instances.

A *family* is a program ``apply(grid, params)`` with a finite parameter space. Its inputs are drawn
from one distribution for every parameter setting, so the input grid alone never tells the output:
only the demonstrations do. An *instance* (a task) is a family, a parameter setting, 2 to 5
demonstration pairs and one test pair, each pair a fresh input and the program's output.
"""

from __future__ import annotations

from typing import ClassVar, Hashable

import numpy as np

from trm.registry import Registry

FAMILIES = Registry("task family")


def register_family(name: str):
    """Class decorator: register a :class:`Family` under ``name`` (also its ``name``)."""

    def wrap(cls):
        cls.name = name
        return FAMILIES.register(name)(cls)

    return wrap

Grid = np.ndarray  # (h, w) uint8 colours 0-9
Params = tuple


class DegenerateInstance(ValueError):
    """No valid instance could be drawn for a family and parameter setting."""


class Family:
    """A parameterised grid program. Subclasses set ``name`` (by registering), the parameter space,
    the input distribution and the program; ``heldout`` marks the parameter combinations kept for
    evaluation, ``augment_dihedral`` / ``augment_colours`` whether the builder's augmentations keep
    every training instance out of those combinations (an augmentation that moves the held-out
    parameter, such as a colour permutation for a held-out colour pair, must be off)."""

    name: ClassVar[str] = ""
    augment_dihedral: ClassVar[bool] = True
    augment_colours: ClassVar[bool] = True
    output_scale: ClassVar[int] = 1  # how much larger than the input an output side may be

    def space(self) -> list[Params]:
        raise NotImplementedError

    def heldout(self, params: Params) -> bool:
        """Whether ``params`` is a held-out combination (never in training)."""
        return False

    def sample_input(self, rng: np.random.Generator, min_side: int, max_side: int) -> Grid:
        raise NotImplementedError

    def apply(self, grid: Grid, params: Params) -> Grid | None:
        """The program's output, or None where it does not apply (e.g. the colour it acts on is absent)."""
        raise NotImplementedError

    def describe(self, params: Params) -> str:
        """Parameters in a task name: ``3-5`` for (3, 5)."""
        return "-".join(str(p) for p in params)

    def consistent(self, params: Params, pairs: list[tuple[Grid, Grid]]) -> bool:
        """Whether the program with ``params`` maps every input of ``pairs`` to its output."""
        for x, y in pairs:
            out = self.apply(x, params)
            if out is None or out.shape != y.shape or not np.array_equal(out, y):
                return False
        return True

    def draw_pair(self, rng: np.random.Generator, params: Params, min_side: int, max_side: int,
                  tries: int = 200) -> tuple[Grid, Grid]:  # fmt: skip
        """A fresh input and its output; inputs whose output is missing, too large or equal to the
        input (a degenerate pair) are drawn again."""
        input_side = max(1, max_side // self.output_scale)
        for _ in range(tries):
            x = self.sample_input(rng, min(min_side, input_side), input_side)
            y = self.apply(x, params)
            if y is not None and y.size and max(y.shape) <= max_side and not (y.shape == x.shape and np.array_equal(x, y)):
                return x, y
        raise DegenerateInstance(f"family {self.name}: no non-degenerate pair for parameters {params} in {tries} draws")

    def draw_instance(self, rng: np.random.Generator, params: Params, num_demos: int, min_side: int, max_side: int,
                      exclude: list[tuple["Family", list[Params]]] = (), tries: int = 100) -> list[tuple[Grid, Grid]]:  # fmt: skip
        """``num_demos`` demonstration pairs then one test pair, with distinct inputs. Drawn again
        unless the demonstrations pin the parameters down (no other setting of the family
        reproduces them), the test input alone leaves the answer open (another setting gives
        another valid output), and no program listed in ``exclude`` (held-out families and
        combinations) reproduces the demonstrations."""
        others = [q for q in self.space() if q != params]
        for _ in range(tries):
            pairs = [self.draw_pair(rng, params, min_side, max_side) for _ in range(num_demos + 1)]
            demos, (test_input, test_output) = pairs[:num_demos], pairs[-1]
            if len({_key(x) for x, _ in pairs}) < len(pairs):
                continue
            if any(self.consistent(q, demos) for q in others):
                continue  # the demonstrations do not tell the parameters
            if not any(not self.consistent(q, [(test_input, test_output)]) and self.apply(test_input, q) is not None
                       for q in others):  # fmt: skip
                continue  # the test input alone would tell the answer
            if any(f.consistent(q, demos) for f, qs in exclude for q in qs):
                continue  # also an instance of a held-out program
            return pairs
        raise DegenerateInstance(f"family {self.name}: no instance pinning down {params} in {tries} draws")


def _key(grid: Grid) -> Hashable:
    return bytes(grid.shape) + grid.tobytes()


# ---- input distributions shared by several families -------------------------------------------

def random_shape(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    h, w = rng.integers(min_side, max_side + 1, size=2)
    return int(h), int(w)


def palette(rng: np.random.Generator, low: int = 3, high: int = 4) -> np.ndarray:
    """``low`` to ``high`` distinct colours from 1-9."""
    return rng.choice(9, size=int(rng.integers(low, high + 1)), replace=False).astype(np.uint8) + 1


def scatter(rng: np.random.Generator, min_side: int, max_side: int, density: tuple[float, float] = (0.3, 0.7),
            colours: np.ndarray | None = None) -> Grid:  # fmt: skip
    """A grid of random shape on background 0 whose cells are coloured with a probability drawn
    from ``density``, each from ``colours`` (default: a random palette of 3-4)."""
    h, w = random_shape(rng, min_side, max_side)
    colours = palette(rng) if colours is None else colours
    filled = rng.random((h, w)) < rng.uniform(*density)
    return np.where(filled, rng.choice(colours, size=(h, w)), 0).astype(np.uint8)


def components(grid: Grid) -> tuple[np.ndarray, int]:
    """4-connected components of the non-zero cells: (labels (h, w) int, 0 for background; count)."""
    labels = np.zeros(grid.shape, np.int32)
    count = 0
    h, w = grid.shape
    for r0 in range(h):
        for c0 in range(w):
            if grid[r0, c0] and not labels[r0, c0]:
                count += 1
                labels[r0, c0] = count
                stack = [(r0, c0)]
                while stack:
                    r, c = stack.pop()
                    for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                        if 0 <= rr < h and 0 <= cc < w and grid[rr, cc] and not labels[rr, cc]:
                            labels[rr, cc] = count
                            stack.append((rr, cc))
    return labels, count


def enclosed(grid: Grid) -> np.ndarray:
    """(h, w) bool: background cells that no 4-connected path of background cells joins to the border."""
    h, w = grid.shape
    outside = np.zeros(grid.shape, bool)
    stack = [(r, c) for r in range(h) for c in (0, w - 1)] + [(r, c) for r in (0, h - 1) for c in range(w)]
    while stack:
        r, c = stack.pop()
        if 0 <= r < h and 0 <= c < w and not outside[r, c] and grid[r, c] == 0:
            outside[r, c] = True
            stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return (grid == 0) & ~outside
