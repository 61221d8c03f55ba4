import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trm.data.dataset import ArcSplit
from trm.evaluate import Prediction, evaluate_split, grid_key, pass_at_k, select_examples

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


class _ScriptedModel(torch.nn.Module):
    """Right at step 1 (and confident: q_halt > 0), wrong at every later step."""

    class arch:
        halt_max_steps = 3

    def initial_carry(self, batch):
        return 0

    def conditioner(self, batch):
        return None

    def forward(self, step, batch, conditioning):
        labels = batch["labels"].clamp_min(0)
        target = labels if step == 0 else (labels + 1) % 12
        logits = torch.nn.functional.one_hot(target, 12).float()
        q_halt = torch.full((labels.shape[0],), 1.0 if step == 0 else -1.0)
        return step + 1, SimpleNamespace(logits=logits, q_halt=q_halt)


def test_exact_accuracy_after_all_steps_and_at_the_q_halt_step(tiny_dataset):
    split = ArcSplit(tiny_dataset[0], "train")
    idx = np.arange(split.num_examples)
    m = evaluate_split(_ScriptedModel(), split, idx, local_batch_size=5, device=torch.device("cpu"),
                       autocast=contextlib.nullcontext, with_demos=False, vote=False, ks=[1], prefix="train")  # fmt: skip
    assert m["eval/train/exact_accuracy"] == 0.0  # the last step is wrong
    assert m["eval/train/exact_accuracy_at_halt"] == 1.0  # the halting step was right
    assert m["eval/train/examples"] == split.num_examples  # padded rows of the last batch dropped
