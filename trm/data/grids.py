"""Grid <-> token layout and the ARC augmentations (dihedral transforms x colour permutations).

Token layout on a ``size x size`` canvas, flattened row-major to ``size * size`` tokens:
PAD = 0, EOS = 1, colour c -> c + 2 (vocabulary 12). A grid of ``h x w`` placed at ``(r, c)``
gets EOS along the row under it and the column right of it, where those fall inside the canvas.
"""

from __future__ import annotations

import numpy as np

PAD_ID = 0
EOS_ID = 1
COLOUR_OFFSET = 2
VOCAB_SIZE = 12
IGNORE_LABEL_ID = -100

NUM_DIHEDRAL = 8
# Inverse of each dihedral transform: rotations by k quarter turns undo with 4 - k, the four
# reflections are their own inverses.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def dihedral(grid: np.ndarray, t: int) -> np.ndarray:
    """Transform ``t`` of the dihedral group: 0-3 rotate by t quarter turns (counter-clockwise),
    4 flips left-right, 5 flips up-down, 6 transposes, 7 transposes about the anti-diagonal."""
    if t < 4:
        return np.rot90(grid, t)
    if t == 4:
        return np.fliplr(grid)
    if t == 5:
        return np.flipud(grid)
    if t == 6:
        return grid.T
    if t == 7:
        return np.rot90(grid, 2).T
    raise ValueError(f"dihedral transform {t} outside 0-7")


def inverse_dihedral(grid: np.ndarray, t: int) -> np.ndarray:
    return dihedral(grid, DIHEDRAL_INVERSE[t])


def random_colour_permutation(rng: np.random.Generator) -> np.ndarray:
    """(10,) uint8 map of colours: 0 (background) fixed, 1-9 permuted."""
    return np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8)


def augment(grid: np.ndarray, t: int, colours: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(dihedral(colours[grid], t))


def inverse_augment(grid: np.ndarray, t: int, colours: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.argsort(colours).astype(np.uint8)[inverse_dihedral(grid, t)])


def encode_grid(grid: np.ndarray, size: int, row: int = 0, col: int = 0) -> np.ndarray:
    """(h, w) colours -> (size * size,) uint8 tokens with the grid's top-left at (row, col)."""
    h, w = grid.shape
    if row + h > size or col + w > size:
        raise ValueError(f"grid {h}x{w} at ({row}, {col}) does not fit a {size}x{size} canvas")
    canvas = np.full((size, size), PAD_ID, dtype=np.uint8)
    canvas[row : row + h, col : col + w] = grid + COLOUR_OFFSET
    if row + h < size:
        canvas[row + h, col : col + w] = EOS_ID
    if col + w < size:
        canvas[row : row + h, col + w] = EOS_ID
    return canvas.reshape(-1)


def decode_grid(tokens: np.ndarray, size: int) -> np.ndarray:
    """Crop a predicted canvas as the published TRM's evaluator does: the largest top-left
    rectangle whose cells are all colours.

    Rows are scanned from the top; the width shrinks to each row's leading run of colour cells
    (a running minimum), and the crop is the (rows, width) of largest area, the first one on a tie.
    A stray token where the EOS frame should be therefore costs nothing when the grid above it is
    right, and a ragged frame gives the best rectangle inside it. A canvas whose top-left cell is
    not a colour gives an empty (0, 0) grid: a prediction that takes part in voting like any other
    and never matches an answer (answers are at least 1x1).
    """
    canvas = np.asarray(tokens).reshape(size, size)
    is_colour = canvas >= COLOUR_OFFSET
    run = np.where(is_colour.all(axis=1), size, np.argmin(is_colour, axis=1))  # leading colours per row
    width = np.minimum.accumulate(run)
    area = width * np.arange(1, size + 1)
    best = int(np.argmax(area))  # first maximum, as the reference's strict ">" keeps the earlier
    h, w = (best + 1, int(width[best])) if area[best] > 0 else (0, 0)
    return (canvas[:h, :w] - COLOUR_OFFSET).astype(np.uint8)
