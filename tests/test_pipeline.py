"""The background data pipeline: order, errors, the saved sampler position, and demonstrations
packed against the slots' current examples."""

import numpy as np
import pytest
import torch

from trm.data.dataset import ArcSplit, EpochSampler
from trm.data.pipeline import Prefetcher, TrainFeed


def test_prefetcher_hands_out_every_item_in_order_and_stops():
    with Prefetcher(iter(range(50)), lambda i: i * i, depth=3) as items:
        assert list(items) == [i * i for i in range(50)]


def test_prefetcher_raises_the_threads_error_where_the_item_is_taken():
    def make(i):
        if i == 3:
            raise ValueError("task 3 is damaged")
        return i

    with Prefetcher(iter(range(10)), make) as items:
        assert [next(items) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="task 3 is damaged"):
            next(items)


def test_closing_stops_a_thread_blocked_on_a_full_queue():
    items = Prefetcher(iter(range(10**9)), lambda i: i, depth=2)
    assert next(items) == 0
    items.close()
    assert not items._thread.is_alive()


def test_the_feed_saves_the_position_of_the_last_batch_handed_out(tiny_dataset):
    """Batches are drawn ahead, but a checkpoint must resume after the last one trained on."""
    split = ArcSplit(tiny_dataset[0], "train")
    feed = TrainFeed(split, EpochSampler(split, 4, seed=0), slice(0, 4), None, torch.device("cpu"), depth=4)
    reference = EpochSampler(split, 4, seed=0)
    for _ in range(3):
        batch = feed.next()
        expected = reference.next_indices()
        assert torch.equal(batch["inputs"], split.batch(expected)["inputs"])
        assert feed.state_dict() == reference.state_dict()
    feed.close()


def test_the_feed_packs_the_demonstrations_of_the_examples_the_slots_hold(tiny_dataset):
    """Halted slots take the new batch's example, the others keep theirs: the packed pool and
    index are those of that mix."""
    split = ArcSplit(tiny_dataset[0], "train")
    feed = TrainFeed(split, EpochSampler(split, 4, seed=0), slice(0, 4), "sequence", torch.device("cpu"))
    reference = EpochSampler(split, 4, seed=0)
    first = feed.next()
    assert torch.equal(first["demo_rows"], torch.from_numpy(split.demo_rows(reference.next_indices())))
    halted = torch.tensor([True, False, True, False])
    second = feed.next(halted, first["demo_rows"])
    new_rows = split.demo_rows(reference.next_indices())
    held = np.where(halted.numpy()[:, None], new_rows, first["demo_rows"].numpy())
    expected = split.pack(held, "sequence")
    assert torch.equal(second["demos"].index, expected.index) and torch.equal(second["demos"].mask, expected.mask)
    assert all(torch.equal(a, b) for a, b in zip(second["demos"].blocks, expected.blocks))
    assert (held != new_rows).any()  # the kept examples matter here
    feed.close()
