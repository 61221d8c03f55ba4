import numpy as np
import pytest

from trm.data.grids import (
    EOS_ID,
    PAD_ID,
    augment,
    decode_grid,
    dihedral,
    encode_grid,
    inverse_augment,
    random_colour_permutation,
)


@pytest.mark.parametrize("t", range(8))
def test_augmentation_round_trip_every_dihedral_transform(t):
    rng = np.random.default_rng(t)
    for _ in range(5):
        grid = rng.integers(0, 10, size=tuple(rng.integers(1, 8, size=2)), dtype=np.uint8)
        colours = random_colour_permutation(rng)
        assert colours[0] == 0 and sorted(colours) == list(range(10))
        out = augment(grid, t, colours)
        np.testing.assert_array_equal(inverse_augment(out, t, colours), grid)


def test_dihedral_transforms_are_the_eight_distinct_symmetries():
    grid = np.arange(6, dtype=np.uint8).reshape(2, 3)
    images = {dihedral(grid, t).tobytes() + bytes(dihedral(grid, t).shape) for t in range(8)}
    assert len(images) == 8
    # Known values: quarter turn counter-clockwise, and the anti-diagonal transpose.
    np.testing.assert_array_equal(dihedral(grid, 1), [[2, 5], [1, 4], [0, 3]])
    np.testing.assert_array_equal(dihedral(grid, 7), [[5, 2], [4, 1], [3, 0]])


def test_grid_tokens_round_trip_and_eos_framing():
    grid = np.array([[1, 2, 3], [4, 5, 0]], dtype=np.uint8)
    tokens = encode_grid(grid, 5)
    canvas = tokens.reshape(5, 5)
    np.testing.assert_array_equal(canvas[:2, :3], grid + 2)
    assert (canvas[2, :3] == EOS_ID).all() and (canvas[:2, 3] == EOS_ID).all()
    assert canvas[2, 3] == PAD_ID and (canvas[3:] == PAD_ID).all()
    np.testing.assert_array_equal(decode_grid(tokens, 5), grid)


def test_translated_grid_and_full_canvas():
    grid = np.full((3, 3), 7, dtype=np.uint8)
    canvas = encode_grid(grid, 5, row=2, col=1).reshape(5, 5)
    assert (canvas[2:5, 1:4] == 9).all() and (canvas[2:5, 4] == EOS_ID).all() and (canvas[:2] == PAD_ID).all()
    full = np.ones((4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_grid(encode_grid(full, 4), 4), full)  # no room for EOS


def test_decode_rejects_invalid_predictions():
    assert decode_grid(np.zeros(16, dtype=np.uint8), 4) is None  # nothing at the top-left
    tokens = encode_grid(np.ones((2, 2), dtype=np.uint8), 4).reshape(4, 4).copy()
    tokens[1, 1] = EOS_ID  # a hole inside the crop
    assert decode_grid(tokens.reshape(-1), 4) is None
