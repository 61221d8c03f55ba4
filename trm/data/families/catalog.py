"""The task families. Each is a small parameterised program; its docstring says what it does,
which parameter combinations are held out for evaluation, and which augmentations it allows.

Held-out combinations are chosen so that training sees every parameter value, only not together:
a held-out colour pair (a, b) leaves a and b each in other training pairs, a held-out shift (1, 2)
leaves dy = 1 and dx = 2 in other shifts. An augmentation that would move a training instance onto
a held-out combination (a colour permutation for colour pairs, a dihedral transform for
directions) is switched off for that family.
"""

from __future__ import annotations


import numpy as np

from trm.data.families.base import (
    Family,
    Grid,
    components,
    enclosed,
    random_shape,
    register_family,
    scatter,
)
from trm.data.grids import dihedral

COLOURS = range(1, 10)
DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # down, up, right, left as (dy, dx)
DIRECTION_NAMES = ("down", "up", "right", "left")


@register_family("recolour")
class Recolour(Family):
    """Every cell of colour a becomes colour b (a != b, both 1-9). Held out: b = a + 4 (mod 9),
    9 of the 72 pairs. Colour permutations off (they would reach the held-out pairs)."""

    augment_colours = False

    def space(self):
        return [(a, b) for a in COLOURS for b in COLOURS if a != b]

    def heldout(self, params):
        a, b = params
        return (b - a) % 9 == 4

    def sample_input(self, rng, min_side, max_side):
        return scatter(rng, min_side, max_side)

    def apply(self, grid, params):
        a, b = params
        is_a = grid == a
        return np.where(is_a, b, grid).astype(np.uint8) if is_a.any() else None


@register_family("swap")
class Swap(Family):
    """Colours a and b trade places (a < b, both 1-9). Held out: a + b = 0 (mod 5), 8 of the 36
    pairs. Colour permutations off."""

    augment_colours = False

    def space(self):
        return [(a, b) for a in COLOURS for b in COLOURS if a < b]

    def heldout(self, params):
        return sum(params) % 5 == 0

    def sample_input(self, rng, min_side, max_side):
        return scatter(rng, min_side, max_side)

    def apply(self, grid, params):
        a, b = params
        is_a, is_b = grid == a, grid == b
        if not (is_a.any() or is_b.any()):
            return None
        return np.where(is_a, b, np.where(is_b, a, grid)).astype(np.uint8)


@register_family("dihedral")
class Dihedral(Family):
    """One of the 7 non-identity dihedral transforms of the grid (numbered as in
    trm.data.grids.dihedral). No held-out combination; every augmentation allowed."""

    def space(self):
        return [(t,) for t in range(1, 8)]

    def sample_input(self, rng, min_side, max_side):
        return scatter(rng, min_side, max_side, density=(0.4, 0.8))

    def apply(self, grid, params):
        return np.ascontiguousarray(dihedral(grid, params[0]))


@register_family("translate")
class Translate(Family):
    """The content moves by (dy, dx), each in -2..2, not both 0; cells pushed out are lost, cells
    uncovered become background. Held out: the four shifts (1, 2), (2, -1), (-1, -2), (-2, 1).
    Dihedral transforms off (they would turn a shift into a held-out one)."""

    augment_dihedral = False
    HELD_OUT = {(1, 2), (2, -1), (-1, -2), (-2, 1)}

    def space(self):
        return [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]

    def heldout(self, params):
        return tuple(params) in self.HELD_OUT

    def sample_input(self, rng, min_side, max_side):
        return scatter(rng, min_side, max_side, density=(0.2, 0.5))

    def apply(self, grid, params):
        dy, dx = params
        h, w = grid.shape
        out = np.zeros_like(grid)
        out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = grid[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
        return out


@register_family("gravity")
class Gravity(Family):
    """Coloured cells fall towards one side (down, up, right, left), keeping their order. No
    held-out combination; every augmentation allowed."""

    def space(self):
        return [(d,) for d in range(4)]

    def describe(self, params):
        return DIRECTION_NAMES[params[0]]

    def sample_input(self, rng, min_side, max_side):
        return scatter(rng, min_side, max_side, density=(0.2, 0.5))

    def apply(self, grid, params):
        dy, dx = DIRECTIONS[params[0]]
        lines = grid.T if dx else grid  # columns fall vertically; rows fall sideways
        out = np.zeros_like(lines)
        towards_end = (dy or dx) > 0
        for j in range(lines.shape[1]):
            cells = lines[:, j][lines[:, j] != 0]
            if len(cells):
                if towards_end:
                    out[-len(cells) :, j] = cells
                else:
                    out[: len(cells), j] = cells
        return out.T.copy() if dx else out


@register_family("lines")
class Lines(Family):
    """From every coloured cell a line of colour c runs in direction d to the edge of the grid
    (over background cells only). Held out: colour 3 + 2 d for direction d (down 3, up 5, right 7,
    left 9), 4 of the 36 combinations. Dihedral transforms and colour permutations off."""

    augment_dihedral = False
    augment_colours = False

    def space(self):
        return [(d, c) for d in range(4) for c in COLOURS]

    def heldout(self, params):
        d, c = params
        return c == 3 + 2 * d

    def describe(self, params):
        return f"{DIRECTION_NAMES[params[0]]}-{params[1]}"

    def sample_input(self, rng, min_side, max_side):
        h, w = random_shape(rng, min_side, max_side)
        grid = np.zeros((h, w), np.uint8)
        seeds = rng.choice(h * w, size=int(rng.integers(1, min(3, h * w) + 1)), replace=False)
        grid.flat[seeds] = rng.integers(1, 10, size=len(seeds))
        return grid

    def apply(self, grid, params):
        d, colour = params
        dy, dx = DIRECTIONS[d]
        out = grid.copy()
        h, w = grid.shape
        for r, c in zip(*np.nonzero(grid)):
            r, c = r + dy, c + dx
            while 0 <= r < h and 0 <= c < w:
                if grid[r, c] == 0:
                    out[r, c] = colour
                r, c = r + dy, c + dx
        return out


@register_family("upscale")
class Upscale(Family):
    """Every cell becomes a k x k block (k = 2 or 3). Inputs are at most a third of the largest
    grid side for every k. No held-out combination; every augmentation allowed."""

    output_scale = 3

    def space(self):
        return [(2,), (3,)]

    def sample_input(self, rng, min_side, max_side):
        return scatter(rng, 1, max_side, density=(0.5, 1.0))

    def apply(self, grid, params):
        k = params[0]
        return np.kron(grid, np.ones((k, k), np.uint8))


def rectangles(rng: np.random.Generator, min_side: int, max_side: int, count: tuple[int, int],
               hollow: bool = False, min_box: int = 1) -> Grid:  # fmt: skip
    """Background 0 with ``count`` rectangles of distinct random colours at random places (a later
    one may cover an earlier); hollow ones are outlines only."""
    h, w = random_shape(rng, max(min_side, min_box + 1), max(max_side, min_box + 1))
    grid = np.zeros((h, w), np.uint8)
    colours = rng.choice(9, size=int(rng.integers(count[0], count[1] + 1)), replace=False) + 1
    for colour in colours:
        bh = int(rng.integers(min_box, max(min_box, h // 2 + 1) + 1))
        bw = int(rng.integers(min_box, max(min_box, w // 2 + 1) + 1))
        bh, bw = min(bh, h), min(bw, w)
        r, c = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        grid[r : r + bh, c : c + bw] = colour
        if hollow and bh > 2 and bw > 2:
            grid[r + 1 : r + bh - 1, c + 1 : c + bw - 1] = 0
    return grid


@register_family("crop")
class Crop(Family):
    """The output is the input cut to the bounding box of colour c. Inputs hold 2-3 rectangles of
    distinct colours. No held-out combination; every augmentation allowed."""

    def space(self):
        return [(c,) for c in COLOURS]

    def sample_input(self, rng, min_side, max_side):
        return rectangles(rng, min_side, max_side, count=(2, 3))

    def apply(self, grid, params):
        rows, cols = np.nonzero(grid == params[0])
        if not len(rows):
            return None
        return grid[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].copy()


@register_family("fill")
class Fill(Family):
    """Background cells enclosed by coloured cells (no 4-connected background path to the border)
    become colour c. Inputs hold 1-2 hollow rectangles. No held-out combination; every
    augmentation allowed."""

    def space(self):
        return [(c,) for c in COLOURS]

    def sample_input(self, rng, min_side, max_side):
        return rectangles(rng, min_side, max_side, count=(1, 2), hollow=True, min_box=3)

    def apply(self, grid, params):
        inside = enclosed(grid)
        return np.where(inside, params[0], grid).astype(np.uint8) if inside.any() else None


@register_family("keep")
class Keep(Family):
    """Only the largest (0) or the smallest (1) object stays (objects: 4-connected coloured cells;
    the extreme must be unique). Inputs hold 2-4 rectangles. No held-out combination; every
    augmentation allowed."""

    def space(self):
        return [(0,), (1,)]

    def describe(self, params):
        return ("largest", "smallest")[params[0]]

    def sample_input(self, rng, min_side, max_side):
        return rectangles(rng, min_side, max_side, count=(2, 4))

    def apply(self, grid, params):
        labels, count = components(grid)
        if count < 2:
            return None
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        extreme = sizes.max() if params[0] == 0 else sizes.min()
        if (sizes == extreme).sum() > 1:
            return None
        keep = labels == int(np.flatnonzero(sizes == extreme)[0]) + 1
        return np.where(keep, grid, 0).astype(np.uint8)


@register_family("outline")
class Outline(Family):
    """The cells along the grid's border become colour c. No held-out combination; every
    augmentation allowed."""

    def space(self):
        return [(c,) for c in COLOURS]

    def sample_input(self, rng, min_side, max_side):
        return scatter(rng, max(min_side, 3), max(max_side, 3))

    def apply(self, grid, params):
        out = grid.copy()
        out[[0, -1], :] = params[0]
        out[:, [0, -1]] = params[0]
        return out


@register_family("mirror")
class Mirror(Family):
    """The grid is joined to its mirror image on one side (right, left, below, above), doubling
    that side. Inputs are at most half the largest grid side. No held-out combination; every
    augmentation allowed."""

    output_scale = 2

    def space(self):
        return [(s,) for s in range(4)]

    def describe(self, params):
        return ("right", "left", "below", "above")[params[0]]

    def sample_input(self, rng, min_side, max_side):
        return scatter(rng, min_side, max_side, density=(0.4, 0.8))

    def apply(self, grid, params):
        side = params[0]
        if side < 2:
            parts = (grid, np.fliplr(grid)) if side == 0 else (np.fliplr(grid), grid)
            return np.hstack(parts)
        parts = (grid, np.flipud(grid)) if side == 2 else (np.flipud(grid), grid)
        return np.vstack(parts)


@register_family("shift_colours")
class ShiftColours(Family):
    """Every colour c (1-9) becomes the colour k steps on, cyclically (c - 1 + k mod 9) + 1, for
    k = 1..8. No held-out combination. Colour permutations off (a permuted cycle is no cycle)."""

    augment_colours = False

    def space(self):
        return [(k,) for k in range(1, 9)]

    def sample_input(self, rng, min_side, max_side):
        return scatter(rng, min_side, max_side)

    def apply(self, grid, params):
        shifted = (grid.astype(np.int16) - 1 + params[0]) % 9 + 1
        return np.where(grid > 0, shifted, 0).astype(np.uint8)


