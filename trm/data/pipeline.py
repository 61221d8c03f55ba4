"""Batches off the training loop's critical path.

:class:`Prefetcher` assembles batches in a background thread, a few ahead (numpy gathers from the
memory-mapped split release the interpreter lock, so the thread overlaps the model's step even on a
2-core machine). :class:`TrainFeed` is the training stream of one rank on top of it: the epoch
sampler's global batches, this rank's rows, pinned for the copy on CUDA, the sampler position of
the last batch handed out (what a checkpoint saves), and, for packed demonstrations, the pool of
the pairs the slots hold at the next step.

Why the feed packs at the last moment: an ACT slot keeps its example until it halts, so the
demonstrations of a step are those of the new batch for halted slots and the slot's own for the
others. The device decides halting in its forward pass; the feed copies the halted flags and the
slots' pool rows to the host there (:meth:`TrainFeed.watch`, no waiting), and before the next step
waits for that copy only, which has long arrived while the device runs the backward pass and the
optimisers: the device queue never runs dry, and the device step itself never synchronises.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from trm.data.dataset import ArcSplit, EpochSampler

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """``make(item)`` for each item of ``items``, computed by a background thread up to ``depth``
    ahead and handed out in order. An exception in the thread is raised by :meth:`__next__`."""

    def __init__(self, items: Iterator, make: Callable, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items, make), daemon=True, name="batches")
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, items: Iterator, make: Callable) -> None:
        try:
            for item in items:
                if not self._put(make(item)):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failed(e))

    def __iter__(self):
        return self

    def __next__(self):
        value = self._queue.get()
        if value is _END:
            self._queue.put(_END)
            raise StopIteration
        if isinstance(value, _Failed):
            raise value.error
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors (and packed demonstrations) onto ``device``; on CUDA from pinned memory without
    blocking the host."""
    if device.type != "cuda":
        return batch
    return {k: v.to(device) if not isinstance(v, torch.Tensor) else v.pin_memory().to(device, non_blocking=True)
            for k, v in batch.items()}  # fmt: skip


class _HostCopy:
    """Host copies of device tensors, started without waiting; :meth:`get` waits for them alone."""

    def __init__(self, *tensors: torch.Tensor):
        self.event = None
        if tensors[0].device.type == "cuda":
            pinned = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
            tensors = tuple(p.copy_(t, non_blocking=True) for p, t in zip(pinned, tensors))
            self.event = torch.cuda.Event()
            self.event.record()
        self.tensors = tensors

    def get(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return [t.numpy() for t in self.tensors]


class TrainFeed:
    """The training batches of one rank.

    ``demos``: what the conditioner reads (:attr:`trm.model.conditioning.Conditioner.demos`): None,
    ``"padded"``, or a pair layout, for which :meth:`next` adds ``demos`` packed for the slots.
    """

    def __init__(self, split: ArcSplit, sampler: EpochSampler, rows: slice, demos: str | None,
                 device: torch.device, depth: int = 4):  # fmt: skip
        self.split, self.device = split, device
        self.layout = demos if demos not in (None, "padded") else None
        self.position = sampler.state_dict()
        self._slots: _HostCopy | None = None

        def draws():
            while True:
                yield sampler.next_indices()[rows], sampler.state_dict()

        def make(item):
            idx, position = item
            batch = split.batch(idx, "rows" if self.layout else demos)
            if device.type == "cuda":
                batch = {k: v.pin_memory() for k, v in batch.items()}
            return batch, position

        self._batches = Prefetcher(draws(), make, depth)

    def watch(self, halted: torch.Tensor, demo_rows: torch.Tensor | None) -> None:
        """After the forward pass: the slots' halted flags (B,) and pool rows (B, D), copied to the
        host while the step goes on."""
        if self.layout and demo_rows is not None:
            self._slots = _HostCopy(halted, demo_rows)

    def next(self, halted: torch.Tensor | None = None, demo_rows: torch.Tensor | None = None) -> dict:
        """The next batch on the device. With packed demonstrations, ``halted`` and ``demo_rows``
        are the slots' current ones (None before the first step): without a pending
        :meth:`watch`, they are read here (once, after a resume)."""
        batch, self.position = next(self._batches)
        if self.layout:
            rows = batch["demo_rows"].numpy()
            if halted is not None and demo_rows is not None:
                slots = self._slots or _HostCopy(halted, demo_rows)
                was_halted, current = slots.get()
                rows = np.where(was_halted[:, None], rows, current)
            self._slots = None
            batch["demos"] = self.split.pack(rows, self.layout)
        return to_device(batch, self.device)

    def state_dict(self) -> dict:
        """The sampler's position after the last batch handed out (batches prefetched beyond it are
        drawn again after a resume)."""
        return dict(self.position)

    def close(self) -> None:
        self._batches.close()
