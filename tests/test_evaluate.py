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
EMPTY = grid_key(np.zeros((0, 0), np.uint8))


def P(task, pair, grid, answer, q=0.5):
    return Prediction(task, pair, grid, answer, q)


def test_pass_at_k_by_hand_and_divided_by_tasks_evaluated():
    preds = [
        # Task 0, one test input: answer A gets 2 votes, B 3 -> A ranks second.
        P(0, 0, B, A), P(0, 0, B, A), P(0, 0, B, A), P(0, 0, A, A), P(0, 0, A, A),
        # Task 1, two test inputs: the first right on top, the second never predicted (B, the empty grid).
        P(1, 0, C, C), P(1, 1, EMPTY, A), P(1, 1, B, A),
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


# A hand-made evaluation set, so that every pass@k below is known by hand: task "a" has two test
# inputs, "b" and "c" one each; 3 augmented versions of each (12 test examples). Outputs are at
# least 2x2 and smaller than the 5x5 canvas, so each has a full EOS frame.
def _task(demo, tests):
    pair = lambda i, o: {"input": i, "output": o}  # noqa: E731
    return {"train": [pair(*demo)], "test": [pair(*t) for t in tests]}


HAND_TASKS = {
    "train": {"t": _task(([[1, 2]], [[2, 1]]), [([[3, 4]], [[4, 3]])])},
    "eval": {
        "a": _task(([[1, 2], [3, 4]], [[4, 3], [2, 1]]),
                   [([[1, 2, 3], [4, 5, 6]], [[6, 5, 4], [3, 2, 1]]), ([[7, 8], [9, 1], [2, 3]], [[3, 2], [1, 9], [8, 7]])]),
        "b": _task(([[5, 6], [7, 8]], [[8, 7], [6, 5]]), [([[1, 3], [5, 7]], [[7, 5], [3, 1]])]),
        "c": _task(([[2, 4], [6, 8]], [[8, 6], [4, 2]]), [([[9, 7], [5, 3]], [[3, 5], [7, 9]])]),
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def hand_split(tmp_path_factory):
    import json

    from trm.data.build import BuildOptions, build_dataset

    root = tmp_path_factory.mktemp("hand")
    for folder, tasks in HAND_TASKS.items():
        (root / folder).mkdir()
        for name, task in tasks.items():
            (root / folder / f"{name}.json").write_text(json.dumps(task))
    options = BuildOptions(train_sources=[str(root / "train")], eval_sources=[str(root / "eval")],
                           num_augmentations=3, max_grid_size=5, split="heldout")  # fmt: skip
    build_dataset(options, root / "data", log=lambda *_: None)
    split = ArcSplit(root / "data", "test")
    assert split.num_examples == 12 and split.num_groups == 3
    return split


def examples_of(split, task: str, pair: int | None = None) -> np.ndarray:
    """Indices of the test examples of task ``task`` (its name in the folder), all augmented versions."""
    names = [n.split(":")[1] for n in split.tasks]
    keep = split.example_task(np.arange(split.num_examples)) == names.index(task)
    if pair is not None:
        keep &= split.example_pair == pair
    return np.flatnonzero(keep)


class Oracle(torch.nn.Module):
    """Answers right on the examples ``right`` (the label canvas itself) and wrong elsewhere (every
    token shifted); with ``stray``, the right answers carry a colour in the first cell of the EOS
    row under the grid. q_halt is ``q`` everywhere. Evaluation drives it as it drives the real model."""

    class arch:
        halt_max_steps = 2

    def __init__(self, split, right: np.ndarray, q: float = 1.0, stray: bool = False):
        super().__init__()
        self.right = {split.labels[i].tobytes() for i in right}
        self.q, self.stray = q, stray

    def initial_carry(self, batch):
        return None

    def conditioner(self, batch):
        return None

    def forward(self, carry, batch, conditioning):
        labels = batch["labels"].clamp_min(0)
        ok = torch.tensor([row.to(torch.uint8).numpy().tobytes() in self.right for row in labels])
        answer = labels.clone()
        if self.stray:
            size = int(labels.shape[1] ** 0.5)
            eos_row = (labels.view(-1, size, size)[:, :, 0] == 1).int().argmax(1)  # height of the grid
            answer[torch.arange(len(labels)), eos_row * size] = 7
        preds = torch.where(ok[:, None], answer, (labels + 1) % 12)
        logits = torch.nn.functional.one_hot(preds, 12).float()
        return carry, SimpleNamespace(logits=logits, q_halt=torch.full((len(labels),), self.q))


def evaluate(model, split, indices=None, batch=4):
    indices = np.arange(split.num_examples) if indices is None else indices
    return evaluate_split(model, split, indices, local_batch_size=batch, device=torch.device("cpu"),
                          autocast=contextlib.nullcontext, with_demos=False, vote=True, ks=[1, 2], prefix="test")  # fmt: skip


def test_pass_at_k_through_evaluate_split_averages_the_tasks_evaluated(hand_split):
    right = examples_of(hand_split, "a", pair=0)  # task a: 1 of its 2 test inputs; b, c: none
    m = evaluate(Oracle(hand_split, right), hand_split)
    assert m["eval/test/tasks"] == 3 and m["eval/test/examples"] == 12
    assert m["ARC/pass@1"] == pytest.approx((0.5 + 0 + 0) / 3)  # not / 4 test inputs, not / 4 tasks built
    assert m["eval/test/exact_accuracy"] == pytest.approx(3 / 12)
    # Only some tasks evaluated: the average runs over those.
    some = np.concatenate([examples_of(hand_split, "a"), examples_of(hand_split, "b")])
    assert evaluate(Oracle(hand_split, right), hand_split, some)["ARC/pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert evaluate(Oracle(hand_split, right), hand_split, examples_of(hand_split, "a"))["ARC/pass@1"] == 0.5
    # Voting: two of task b's three versions right outvote the wrong ones, each wrong in its own way.
    right_b = np.concatenate([right, examples_of(hand_split, "b")[:2]])
    assert evaluate(Oracle(hand_split, right_b), hand_split)["ARC/pass@1"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_a_stray_token_in_the_eos_frame_still_earns_the_vote(hand_split):
    every = np.arange(hand_split.num_examples)
    m = evaluate(Oracle(hand_split, every, stray=True), hand_split)
    assert m["eval/test/exact_accuracy"] == 0.0  # one token is wrong in every example
    assert m["ARC/pass@1"] == 1.0  # the crop is the right grid, as in the published evaluator


def test_votes_do_not_leak_from_one_evaluation_into_the_next(hand_split):
    every = np.arange(hand_split.num_examples)
    assert evaluate(Oracle(hand_split, every, q=5.0), hand_split)["ARC/pass@1"] == 1.0
    m = evaluate(Oracle(hand_split, every[:0], q=-5.0), hand_split)
    assert m["ARC/pass@2"] == 0.0 and m["eval/test/exact_accuracy"] == 0.0


def _evaluate_as_rank(rank: int, world: int, store: str, split, right: np.ndarray, out: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        metrics = evaluate(Oracle(split, right), split)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(metrics, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_metrics_of_one(hand_split, tmp_path):
    """Rank 0 holds task a's examples (all right), rank 1 tasks b (2 of 3 versions right) and c
    (none): only gathered votes and summed counts give the one-process figures on every rank."""
    import json
    import multiprocessing

    right = np.concatenate([examples_of(hand_split, "a"), examples_of(hand_split, "b")[:2]])
    one = evaluate(Oracle(hand_split, right), hand_split)
    assert one["ARC/pass@1"] == pytest.approx(2 / 3) and one["eval/test/exact_accuracy"] == pytest.approx(8 / 12)
    context = multiprocessing.get_context("fork")  # the split and the oracle are inherited, not pickled
    ranks = [context.Process(target=_evaluate_as_rank, args=(r, 2, str(tmp_path / "store"), hand_split, right, str(tmp_path)))
             for r in range(2)]  # fmt: skip
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
        assert p.exitcode == 0
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == pytest.approx(one)
