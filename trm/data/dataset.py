"""Reading a dataset folder: batches of examples and the epoch sampler of training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trm.data.demos import PackedDemos, pack_demos
from trm.data.grids import IGNORE_LABEL_ID, PAD_ID
from trm.data.tasks import ArcDataError


def _unreadable(path: Path, dataset_dir, why: str) -> ArcDataError:
    return ArcDataError(f"{path}: {why}; the dataset folder {dataset_dir} is damaged: delete it to rebuild")


def _read_json(path: Path, dataset_dir) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise _unreadable(path, dataset_dir, "missing") from None
    except (ValueError, OSError) as e:
        raise _unreadable(path, dataset_dir, f"unreadable ({e})") from None


def _read_array(path: Path, dataset_dir) -> np.ndarray:
    """A memory-mapped array; a missing or truncated file names itself."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise _unreadable(path, dataset_dir, "missing") from None
    except (ValueError, OSError, EOFError) as e:  # a truncated header or body
        raise _unreadable(path, dataset_dir, f"unreadable ({e})") from None


class ArcSplit:
    """One split (``train`` or ``test``) of a dataset folder, memory-mapped."""

    def __init__(self, dataset_dir: str | Path, split: str):
        folder = Path(dataset_dir) / split
        self.name = split
        self.meta = _read_json(folder / "dataset.json", dataset_dir)
        info = _read_json(Path(dataset_dir) / "build.json", dataset_dir)
        self.tasks: list[str] = info["tasks"]
        self.task_sources: list[str] | None = info.get("task_sources")  # the source of each task
        load = lambda n: _read_array(folder / f"{n}.npy", dataset_dir)  # noqa: E731
        self.inputs, self.labels = load("inputs"), load("labels")
        self.demo_inputs, self.demo_labels = load("demo_inputs"), load("demo_labels")
        self.example_demos = load("example_demos")
        self.example_pair = np.asarray(load("example_pair"))
        self.puzzle_identifiers = np.asarray(load("puzzle_identifiers"))
        self.puzzle_indices = np.asarray(load("puzzle_indices"))
        self.group_indices = np.asarray(load("group_indices"))
        self.puzzle_task = np.asarray(load("puzzle_task"))
        self.puzzle_dihedral = np.asarray(load("puzzle_dihedral"))
        self.puzzle_colours = np.asarray(load("puzzle_colours"))
        self.example_puzzle = np.repeat(np.arange(len(self.puzzle_identifiers)), np.diff(self.puzzle_indices))

    @property
    def seq_len(self) -> int:
        return self.meta["seq_len"]

    @property
    def grid_size(self) -> int:
        return self.meta["grid_size"]

    @property
    def num_examples(self) -> int:
        return len(self.example_puzzle)

    @property
    def num_groups(self) -> int:
        return len(self.group_indices) - 1

    @property
    def examples_per_epoch(self) -> int:
        """Examples an epoch draws: one puzzle per group, all puzzles of a group being the same size."""
        first = self.group_indices[:-1]
        return int((self.puzzle_indices[first + 1] - self.puzzle_indices[first]).sum())

    def example_task(self, idx: np.ndarray) -> np.ndarray:
        return self.puzzle_task[self.example_puzzle[idx]]

    def demo_rows(self, idx: np.ndarray) -> np.ndarray:
        """(B, D) int64 rows of the demonstration pool of examples ``idx`` (-1: none; an index of
        -1 is the empty task)."""
        idx = np.asarray(idx)
        return np.where((idx < 0)[:, None], -1, self.example_demos[np.maximum(idx, 0)]).astype(np.int64)

    def canvases(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The pool rows ``rows`` (B, D) on the canvas: demo_inputs, demo_labels (B, D, L) int32
        (all PAD where there is no demonstration) and demo_mask (B, D) bool."""
        mask = rows >= 0
        safe = np.maximum(rows, 0)
        demo_in = np.where(mask[..., None], self.demo_inputs[safe], PAD_ID)
        demo_out = np.where(mask[..., None], self.demo_labels[safe], PAD_ID)
        return {"demo_inputs": torch.from_numpy(demo_in.astype(np.int32)),
                "demo_labels": torch.from_numpy(demo_out.astype(np.int32)), "demo_mask": torch.from_numpy(mask)}  # fmt: skip

    def pack(self, rows: np.ndarray, layout: str) -> PackedDemos:
        """The pool rows ``rows`` (B, D) packed for ``layout`` (:func:`trm.data.demos.pack_demos`)."""
        return pack_demos(self.demo_inputs, self.demo_labels, rows, layout)

    def batch(self, idx: np.ndarray, demos: str | None = None, context_from: np.ndarray | None = None) -> dict:
        """Tensors of examples ``idx`` (B,):

        inputs (B, L) int32 tokens; labels (B, L) int64, PAD cells set to -100 (ignored);
        puzzle_identifiers (B,) int32; task_ids (B,) int32 (the task, shared by its augmentations);
        and the demonstrations as ``demos`` asks:
        - None: none;
        - "padded": demo_inputs, demo_labels (B, D, L) int32 canvases, demo_mask (B, D) bool;
        - "rows": demo_rows (B, D) int64 rows of the pool (-1: none), to be packed later;
        - a pair layout ("sequence", "overlay"): demo_rows and ``demos``, a :class:`PackedDemos`.

        ``context_from`` (B,) swaps what describes the task (the puzzle id and the demonstrations)
        for that of other examples: row i gets example ``context_from[i]``'s, or, where it is -1,
        the empty task's (the blank puzzle id 0 and no demonstration). Inputs, labels and task_ids
        stay the examples' own.
        """
        idx = np.asarray(idx)
        ctx = idx if context_from is None else np.asarray(context_from)
        empty = ctx < 0
        labels = torch.from_numpy(self.labels[idx].astype(np.int64))
        own_ids = self.puzzle_identifiers[self.example_puzzle[np.maximum(ctx, 0)]]
        puzzle_ids = np.where(empty, self.meta["blank_identifier_id"], own_ids)
        batch = {
            "inputs": torch.from_numpy(self.inputs[idx].astype(np.int32)),
            "labels": labels.masked_fill_(labels == PAD_ID, IGNORE_LABEL_ID),
            "puzzle_identifiers": torch.from_numpy(puzzle_ids.astype(np.int32)),
            "task_ids": torch.from_numpy(self.example_task(idx)),
        }
        if demos is None:
            return batch
        rows = self.demo_rows(ctx)
        if demos == "padded":
            return {**batch, **self.canvases(rows)}
        batch["demo_rows"] = torch.from_numpy(rows)
        if demos != "rows":
            batch["demos"] = self.pack(rows, demos)
        return batch


class EpochSampler:
    """The training stream: each epoch shuffles the groups, draws one puzzle (augmented version)
    per group and emits all its examples; epochs follow each other without a gap and are cut into
    global batches. Deterministic for a seed; its position is saved in checkpoints."""

    def __init__(self, split: ArcSplit, global_batch_size: int, seed: int):
        self.split, self.global_batch_size, self.seed = split, global_batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        s = self.split
        groups = rng.permutation(s.num_groups)
        first, last = s.group_indices[groups], s.group_indices[groups + 1]
        puzzles = first + (rng.random(len(groups)) * (last - first)).astype(np.int64)
        starts, lengths = s.puzzle_indices[puzzles], np.diff(s.puzzle_indices)[puzzles]
        # Concatenated ranges [start, start + length) without a Python loop.
        run_offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(starts, lengths) + np.arange(lengths.sum()) - run_offsets

    def next_indices(self) -> np.ndarray:
        """The next global batch, (global_batch_size,) example indices."""
        parts, need = [], self.global_batch_size
        while need:
            take = self._order[self.offset : self.offset + need]
            parts.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return np.concatenate(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._epoch_order(self.epoch)
