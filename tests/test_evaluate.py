import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trm.data.dataset import ArcSplit
from trm.evaluate import Prediction, evaluate_split, grid_key, pass_at_k, select_examples
from trm.model.trm import TinyRecursiveModel

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

    def condition(self, batch):
        return None

    predict = TinyRecursiveModel.predict  # the evaluation loop under test

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
                       autocast=contextlib.nullcontext, demos=None, vote=False, ks=[1], prefix="train")  # fmt: skip
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

    predict = TinyRecursiveModel.predict

    def __init__(self, split, right: np.ndarray, q: float = 1.0, stray: bool = False):
        super().__init__()
        self.right = {split.labels[i].tobytes() for i in right}
        self.q, self.stray = q, stray

    def initial_carry(self, batch):
        return None

    def condition(self, batch):
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
                          autocast=contextlib.nullcontext, demos=None, vote=True, ks=[1, 2], prefix="test")  # fmt: skip


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

    from helpers import run_forked_ranks

    right = np.concatenate([examples_of(hand_split, "a"), examples_of(hand_split, "b")[:2]])
    one = evaluate(Oracle(hand_split, right), hand_split)
    assert one["ARC/pass@1"] == pytest.approx(2 / 3) and one["eval/test/exact_accuracy"] == pytest.approx(8 / 12)
    run_forked_ranks(_evaluate_as_rank, 2, str(tmp_path / "store"), hand_split, right, str(tmp_path), timeout=120)
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == pytest.approx(one)


def test_wrong_contexts_are_a_derangement_across_tasks(hand_split):
    from trm.evaluate import wrong_contexts

    every = np.arange(hand_split.num_examples)
    own = hand_split.example_task(every)
    mappings = set()
    for seed in range(8):
        donors = wrong_contexts(hand_split, every, seed)
        np.testing.assert_array_equal(donors, wrong_contexts(hand_split, every, seed))  # deterministic
        theirs = hand_split.example_task(donors)
        assert (theirs != own).all()  # nobody keeps its own task's context
        # A permutation of tasks: every task gives its context to exactly one other task.
        task_map = {int(a): int(b) for a, b in zip(own, theirs)}
        assert len(task_map) == 3 and sorted(task_map.values()) == sorted(task_map)
        assert all((theirs[own == a] == b).all() for a, b in task_map.items())
        # Donor examples spread over the donor task's examples.
        for task in task_map:
            assert len(set(donors[own == task])) == min((own == task).sum(), (own == task_map[task]).sum())
        mappings.add(tuple(sorted(task_map.items())))
    assert len(mappings) == 2  # both derangements of three tasks are drawn
    # Donors come from the examples evaluated; one task alone has no other to take from.
    some = np.concatenate([examples_of(hand_split, "b"), examples_of(hand_split, "c")])
    assert set(wrong_contexts(hand_split, some, 0)) <= set(some)
    assert wrong_contexts(hand_split, examples_of(hand_split, "a"), 0) is None


def test_a_batch_takes_the_context_of_other_examples_or_of_the_empty_task(hand_split):
    idx = np.array([0, 6, 9])
    donors = np.array([9, -1, 0])
    own, swapped = hand_split.batch(idx, "padded"), hand_split.batch(idx, "padded", donors)
    other = hand_split.batch(np.array([9, 9, 0]), "padded")
    for key in ("inputs", "labels", "task_ids"):
        assert torch.equal(swapped[key], own[key])
    for key in ("puzzle_identifiers", "demo_inputs", "demo_labels", "demo_mask"):
        assert torch.equal(swapped[key][[0, 2]], other[key][[0, 2]])
    assert swapped["puzzle_identifiers"][1] == hand_split.meta["blank_identifier_id"] == 0
    assert not swapped["demo_mask"][1].any() and (swapped["demo_inputs"][1] == 0).all()


class ContextReader(Oracle):
    """Right exactly when its conditioning (the puzzle id it was given) belongs to the example's
    own task, or, with ``blank_is_right``, when it is the empty task's: a model that reads its
    context and nothing else."""

    def __init__(self, split, blank_is_right=False):
        super().__init__(split, np.arange(0))
        self.task_of_id = dict(zip(split.puzzle_identifiers.tolist(), split.puzzle_task.tolist()))
        self.blank_is_right = blank_is_right

    def condition(self, batch):
        return batch["puzzle_identifiers"]

    def forward(self, carry, batch, conditioning):
        labels = batch["labels"].clamp_min(0)
        ok = torch.tensor([self.task_of_id.get(int(i), -1) for i in conditioning]) == batch["task_ids"]
        ok |= self.blank_is_right & (conditioning == 0)
        logits = torch.nn.functional.one_hot(torch.where(ok[:, None], labels, (labels + 1) % 12), 12).float()
        return carry, SimpleNamespace(logits=logits, q_halt=torch.ones(len(labels)))


def reliance_metrics(model, split, demos=None):
    return evaluate_split(model, split, np.arange(split.num_examples), local_batch_size=5, device=torch.device("cpu"),
                          autocast=contextlib.nullcontext, demos=demos, vote=False, ks=[1], prefix="test",
                          reliance=True)  # fmt: skip


def test_reliance_of_a_model_that_reads_its_context(hand_split):
    m = reliance_metrics(ContextReader(hand_split), hand_split)
    assert m["eval/test/exact_accuracy"] == 1.0 and m["eval/test/accuracy"] == 1.0
    assert m["eval/test/exact_accuracy_wrong_context"] == 0.0 and m["eval/test/exact_accuracy_null_context"] == 0.0
    assert m["eval/test/context_reliance"] == 1.0 and m["eval/test/token_context_reliance"] == 1.0
    # Reliance compares with the wrong context, not the empty one.
    m = reliance_metrics(ContextReader(hand_split, blank_is_right=True), hand_split)
    assert m["eval/test/exact_accuracy_null_context"] == 1.0 and m["eval/test/context_reliance"] == 1.0


@pytest.mark.parametrize("conditioner", ["puzzle_embedding", "standard"])
def test_reliance_is_zero_when_the_core_ignores_its_context(hand_split, conditioner):
    """A real model whose core zeroes its context scores the same with the right, a wrong and the
    empty context; the same model reading its context does not (the test can tell them apart)."""
    from encoders.config import EncoderArchConfig
    from trm.config import ArchConfig, TrainConfig
    from trm.train import build_model

    small = dict(hidden_size=32, num_heads=2, L_layers=1, H_cycles=1, L_cycles=1, puzzle_emb_len=2, halt_max_steps=2)
    if conditioner == "puzzle_embedding":
        cfg = TrainConfig(arch=ArchConfig(**small))
    else:
        cfg = TrainConfig(arch=EncoderArchConfig(**small, encoder_num_layers=1))
    torch.manual_seed(0)
    model = build_model(cfg, hand_split.meta)
    if conditioner == "puzzle_embedding":
        model.conditioner.weight.normal_()  # the table starts at zero: give each puzzle its own vector
    demos = model.conditioner.demos
    reads = reliance_metrics(model, hand_split, demos)
    forward = model.core.forward
    model.core.forward = lambda z_H, z_L, inputs, context, *rest: forward(z_H, z_L, inputs, context * 0, *rest)
    ignores = reliance_metrics(model, hand_split, demos)
    for kind in ("accuracy", "exact_accuracy"):
        right = ignores[f"eval/test/{kind}"]
        assert ignores[f"eval/test/{kind}_wrong_context"] == right == ignores[f"eval/test/{kind}_null_context"]
    assert ignores["eval/test/context_reliance"] == ignores["eval/test/token_context_reliance"] == 0.0
    assert reads["eval/test/accuracy_wrong_context"] != reads["eval/test/accuracy"]
    assert reads["eval/test/accuracy_null_context"] != reads["eval/test/accuracy"]


def test_each_evaluation_set_of_a_family_benchmark_is_scored_on_its_own(tmp_path):
    """Two test sets (held-out combinations, held-out families): each gets its eval/<set>/ metrics
    and ARC/<set>/pass@k; ARC/pass@k averages all their tasks; eval/train covers train_groups tasks."""
    from trm.config import EvalConfig
    from trm.data.build import BuildOptions, build_dataset
    from trm.data.families import FamilyOptions
    from trm.evaluate import evaluate_model

    families = FamilyOptions(names=["recolour", "translate", "outline"], heldout_families=["outline"], train_tasks=12,
                             eval_tasks=3, max_grid_size=5)  # fmt: skip
    options = BuildOptions(train_sources=["families/train"], eval_sources=["families/unseen_params", "families/unseen_families"],
                           split="heldout", max_grid_size=5, num_augmentations=2, families=families)  # fmt: skip
    build_dataset(options, tmp_path / "data", log=lambda *_: None)
    train, test = ArcSplit(tmp_path / "data", "train"), ArcSplit(tmp_path / "data", "test")
    unseen_params = np.flatnonzero(np.asarray(test.task_sources)[test.example_task(np.arange(test.num_examples))]
                                   == "families/unseen_params")  # fmt: skip
    model = Oracle(test, unseen_params)  # right on every held-out combination, wrong on held-out families
    cfg = EvalConfig(pass_ks=[1, 2], train_groups=5, reliance=False)
    m = evaluate_model(model, train, test, cfg, seed=0, local_batch_size=4, device=torch.device("cpu"),
                       autocast=contextlib.nullcontext, demos=None)  # fmt: skip
    assert m["eval/unseen_params/tasks"] == m["eval/unseen_families/tasks"] == 3
    assert m["ARC/unseen_params/pass@1"] == 1.0 and m["eval/unseen_params/exact_accuracy"] == 1.0
    assert m["ARC/unseen_families/pass@1"] == 0.0 and m["eval/unseen_families/exact_accuracy"] == 0.0
    assert m["ARC/pass@1"] == 0.5 and "eval/test/exact_accuracy" not in m
    assert m["eval/unseen_params/examples"] + m["eval/unseen_families/examples"] == test.num_examples
    # Broken down by family, in the same pass.
    assert m["eval/unseen_params/recolour/exact_accuracy"] == m["eval/unseen_params/translate/exact_accuracy"] == 1.0
    assert m["ARC/unseen_families/outline/pass@1"] == 0.0 and m["ARC/unseen_params/translate/pass@2"] == 1.0
    assert (m["eval/unseen_params/recolour/examples"] + m["eval/unseen_params/translate/examples"]
            == m["eval/unseen_params/examples"])  # fmt: skip
    names = np.asarray(test.tasks)[test.example_task(unseen_params)]
    recolour_only = unseen_params[np.char.find(names.astype(str), ".recolour.") >= 0]
    m = evaluate_model(Oracle(test, recolour_only), train, test, cfg, seed=0, local_batch_size=4,
                       device=torch.device("cpu"), autocast=contextlib.nullcontext, demos=None)  # fmt: skip
    assert m["ARC/unseen_params/recolour/pass@1"] == 1.0 and m["ARC/unseen_params/translate/pass@1"] == 0.0
    assert m["eval/unseen_params/exact_accuracy"] == pytest.approx(len(recolour_only) / len(unseen_params))
    assert train.num_groups == 12
    five = [0, 3, 6, 8, 11]  # 5 of 12 spread evenly: 0, 2.75, 5.5, 8.25, 11 rounded
    expected = sum(train.puzzle_indices[train.group_indices[g + 1]] - train.puzzle_indices[train.group_indices[g]] for g in five)
    assert m["eval/train/examples"] == expected
