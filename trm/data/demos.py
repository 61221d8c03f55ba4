"""Demonstration pairs packed for an encoder: each distinct pair once, cropped to its cells, grouped
by length.

On the canvas a pair is ``2 * grid_size^2`` tokens (input then output) and mostly PAD: an ARC grid
rarely fills 30x30, and the examples of one puzzle share one pool of demonstrations. Packing keeps
only what an encoder computes on:

- each distinct pool row of the batch once (examples of the same puzzle share theirs);
- only its cells that hold something (a colour or the EOS frame), in canvas order, each as a
  *cell triple* ``(colour, second, position)``: ``sequence`` layout, one triple per non-PAD cell of
  the input (second = 0) then of the output (second = 1); ``overlay`` layout, one triple per canvas
  cell where either grid holds something (colour = the input's token, second = the output's);
- pairs grouped into length buckets (:data:`BUCKETS`, x 2 apart), each bucket one padded block
  ``(n, T)``: a handful of dense blocks instead of one block padded to the whole canvas;
- for a conditioner that reads every cell (layouts ``"<layout>:cells"``), each example's cells in
  one row: the tokens of its demonstrations one after the other, no padding between them, the rows
  padded to the batch's longest (:attr:`PackedDemos.cell_index`), so that the context's length
  follows the batch's demonstrations.

The padded form gives the same triples (PAD cells masked), so an encoder computes the same vectors
from either (tests/test_encoders.py checks it, gradients included). Everything here is numpy on
the host: the device step receives ready blocks and an index, with nothing to synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trm.data.grids import PAD_ID

# Bucket lengths (tokens per pair), x 2 apart; a pair goes to the first that holds it, the longest
# pairs to a last bucket of the canvas' full length. Fewer, wider buckets than x 1.5 apart: fewer
# kernel launches for a little more padding, the faster of the two at the CPU preset (BENCHMARKS.md).
BUCKETS = (32, 64, 128, 256, 512, 1024)


def cell_triples(inputs: np.ndarray | torch.Tensor, outputs, layout: str):
    """(N, L) input and output tokens on the canvas -> (N, T, 3) cell triples, T = 2L (sequence) or
    L (overlay); works on numpy arrays and on tensors alike. A triple whose colour and second are
    both PAD is empty (a masked cell; see :func:`cell_mask`)."""
    lib = torch if isinstance(inputs, torch.Tensor) else np
    N, L = inputs.shape
    position = (torch.arange(L, device=inputs.device) if lib is torch else np.arange(L))[None, :] + lib.zeros_like(inputs)
    if layout == "overlay":
        return lib.stack([inputs, outputs, position], -1)
    zeros = lib.zeros_like(inputs)
    stack = lambda *parts: lib.concatenate(parts, 1) if lib is np else torch.cat(parts, 1)  # noqa: E731
    return lib.stack([stack(inputs, outputs), stack(zeros, zeros + 1), stack(position, position)], -1)


def cell_mask(triples, layout: str):
    """(..., 3) triples -> (...,) bool: the cell holds something (the mask of the padded path)."""
    if layout == "overlay":
        return (triples[..., 0] != PAD_ID) | (triples[..., 1] != PAD_ID)
    return triples[..., 0] != PAD_ID


@dataclass
class PackedDemos:
    """The demonstrations of a batch of B examples (D slots each), packed.

    blocks: per length bucket, (n_b, T_b, 3) int64 cell triples (padding triples are all zero,
        i.e. PAD and masked). Concatenated in order, the blocks' rows are the batch's distinct
        pairs, the *pool* (U = sum n_b rows).
    index: (B, D) int64 row of the pool each demonstration slot holds; U where the slot is empty.
    mask: (B, D) bool, True where the slot holds a demonstration.

    cell_index: (B, C) int64, with ``:cells`` layouts: example b's c-th cell token, as a row of the
        blocks' cells flattened in order (sum n_b T_b rows); that count (a padding row) past the
        example's cells. C is the most cells of one example in the batch.
    cell_slot: (B, C) int64: the demonstration slot of each cell token; -1 for padding.
    """

    blocks: list[torch.Tensor]
    index: torch.Tensor
    mask: torch.Tensor
    cell_index: torch.Tensor | None = None
    cell_slot: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return sum(len(b) for b in self.blocks)

    def to(self, device: torch.device) -> PackedDemos:
        """On CUDA: pinned, then copied without blocking the host."""
        if device.type != "cuda":
            return self
        move = lambda t: None if t is None else t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        return PackedDemos([move(b) for b in self.blocks], move(self.index), move(self.mask), move(self.cell_index),
                           move(self.cell_slot))  # fmt: skip


def pack_demos(demo_inputs: np.ndarray, demo_labels: np.ndarray, rows: np.ndarray, layout: str,
               buckets: tuple[int, ...] = BUCKETS) -> PackedDemos:  # fmt: skip
    """Pack the demonstration pool rows ``rows`` (B, D) (-1: no demonstration) of a split's pool
    ``demo_inputs``/``demo_labels`` (pool rows, L) for ``layout``: ``sequence`` or ``overlay``, and
    with ``:cells`` (``overlay:cells``) each example's cells in a row as well."""
    layout, _, cells = layout.partition(":")
    if layout not in ("sequence", "overlay") or cells not in ("", "cells"):
        raise ValueError(f"unknown demonstration layout {layout + (':' + cells if cells else '')!r}")
    rows = np.asarray(rows, np.int64)
    present = rows >= 0
    unique, inverse = np.unique(rows[present], return_inverse=True)
    triples = cell_triples(demo_inputs[unique].astype(np.int64), demo_labels[unique].astype(np.int64), layout)
    filled = cell_mask(triples, layout)  # (U, T)
    lengths = filled.sum(1)
    limits = np.asarray([b for b in buckets if b < triples.shape[1]] + [triples.shape[1]])
    bucket_of = np.searchsorted(limits, lengths)  # first limit >= length
    # Pool order: by bucket, then by row; where each distinct row lands in it.
    order = np.argsort(bucket_of, kind="stable")
    pool_row = np.empty(len(unique), np.int64)
    pool_row[order] = np.arange(len(unique))
    blocks = []
    for b in np.unique(bucket_of):
        members = order[bucket_of[order] == b]
        width = int(limits[b])
        # Filled cells first, in canvas order (a stable sort), then cut to the bucket's length.
        first = np.argsort(~filled[members], axis=1, kind="stable")[:, :width]
        block = np.take_along_axis(triples[members], first[..., None], axis=1)
        block[~np.take_along_axis(filled[members], first, axis=1)] = 0
        blocks.append(torch.from_numpy(block))
    index = np.full(rows.shape, len(unique), np.int64)
    index[present] = pool_row[inverse]
    packed = PackedDemos(blocks, torch.from_numpy(index), torch.from_numpy(present))
    if cells:
        widths = limits[bucket_of[order]]  # the pool's rows in order: their block's length
        starts = np.cumsum(widths) - widths  # where each pool row's cells begin among the flattened blocks
        filled_of_pool_row = np.minimum(lengths[order], widths)
        packed.cell_index, packed.cell_slot = _cell_rows(index, present, starts, filled_of_pool_row, int(widths.sum()))
    return packed


def _cell_rows(index: np.ndarray, present: np.ndarray, starts: np.ndarray, lengths: np.ndarray, padding_row: int):
    """(cell_index, cell_slot) of :class:`PackedDemos`: for each example, the cells of its present
    slots in slot order (pool row u contributes rows starts[u] .. starts[u] + lengths[u] - 1 of the
    flattened blocks), padded with ``padding_row``. Vectorised: no loop over examples or cells."""
    B, D = index.shape
    example, slot = np.nonzero(present)  # row-major: each example's slots in order
    pool = index[example, slot]
    count = lengths[pool]  # cells of each (example, slot) entry
    total = int(count.sum())
    per_example = np.bincount(example, weights=count, minlength=B).astype(np.int64)
    width = int(per_example.max()) if B else 0
    entry = np.repeat(np.arange(len(pool)), count)  # the entry of each cell
    within = np.arange(total) - np.repeat(np.cumsum(count) - count, count)  # the cell's place in its pair
    before_in_example = np.cumsum(count) - count - np.repeat(np.cumsum(per_example) - per_example, np.bincount(example, minlength=B))
    column = before_in_example[entry] + within
    cell_index = np.full((B, width), padding_row, np.int64)
    cell_slot = np.full((B, width), -1, np.int64)
    cell_index[example[entry], column] = starts[pool[entry]] + within
    cell_slot[example[entry], column] = slot[entry]
    return torch.from_numpy(cell_index), torch.from_numpy(cell_slot)
