import numpy as np
import pytest

from trm.evaluate import Prediction, grid_key, pass_at_k, select_examples
from trm.data.dataset import ArcSplit

A = grid_key(np.array([[1]], np.uint8))
B = grid_key(np.array([[2]], np.uint8))
C = grid_key(np.array([[3]], np.uint8))


def P(task, pair, grid, answer, q=0.5):
    return Prediction(task, pair, grid, answer, q)


def test_pass_at_k_by_hand_and_divided_by_tasks_evaluated():
    preds = [
        # Task 0, one test input: answer A gets 2 votes, B 3 -> A ranks second.
        P(0, 0, B, A), P(0, 0, B, A), P(0, 0, B, A), P(0, 0, A, A), P(0, 0, A, A),
        # Task 1, two test inputs: the first right on top, the second never predicted (invalid grids).
        P(1, 0, C, C), P(1, 1, None, A), P(1, 1, B, A),
        # Task 2: right, alone.
        P(2, 0, A, A),
    ]  # fmt: skip
    m = pass_at_k(preds, [1, 2, 5])
    # pass@1: task0 0, task1 0.5, task2 1 -> 1.5 / 3 evaluated tasks (not a fixed total).
    assert m["ARC/pass@1"] == pytest.approx(1.5 / 3)
    assert m["ARC/pass@2"] == pytest.approx(2.5 / 3)
    assert m["ARC/pass@5"] == pytest.approx(2.5 / 3)


def test_ties_are_broken_by_mean_halting_confidence():
    preds = [P(0, 0, A, A, q=0.9), P(0, 0, B, A, q=0.2), P(0, 0, B, A, q=0.4)]
    assert pass_at_k(preds, [1])["ARC/pass@1"] == 0.0  # B has more votes
    tied = [P(0, 0, A, A, q=0.9), P(0, 0, B, A, q=0.3)]
    assert pass_at_k(tied, [1])["ARC/pass@1"] == 1.0
    tied_low = [P(0, 0, A, A, q=0.1), P(0, 0, B, A, q=0.3)]
    assert pass_at_k(tied_low, [1])["ARC/pass@1"] == 0.0


def test_votes_do_not_leak_between_calls():
    assert pass_at_k([P(0, 0, A, A)], [1])["ARC/pass@1"] == 1.0
    assert pass_at_k([P(0, 0, B, A)], [1])["ARC/pass@1"] == 0.0


def test_select_examples_keeps_the_first_versions_of_every_group(tiny_dataset):
    split = ArcSplit(tiny_dataset[0], "train")
    assert len(select_examples(split, None)) == split.num_examples
    idx = select_examples(split, 1)
    puzzles = set(split.example_puzzle[idx])
    assert puzzles == set(split.group_indices[:-1])
