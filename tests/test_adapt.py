"""Test-time adaptation of the context (eval.adapt, trm/adapt.py)."""

import contextlib

import numpy as np
import pytest
import torch

from trm.adapt import (_leave_one_out_objective, _per_task, adapt_context, augmented_copies, check_target,
                       demonstration_objective, finetune)
from trm.model.trm import leave_one_out
from trm.config import AdaptConfig
from trm.data.dataset import ArcSplit
from trm.data.grids import PAD_ID, decode_grid
from trm.evaluate import evaluate_split
from trm.losses import stablemax_cross_entropy
from trm.model.conditioning import Conditioning

from helpers import run_forked_ranks

SMALL = dict(hidden_size=32, num_heads=2, L_layers=1, H_cycles=1, L_cycles=1, puzzle_emb_len=2, halt_max_steps=2)


def make_model(conditioner, meta, **arch):
    from encoders.config import EncoderArchConfig
    from trm.config import ArchConfig, TrainConfig
    from trm.train import build_model

    if conditioner == "puzzle_embedding":
        cfg = TrainConfig(arch=ArchConfig(**SMALL))
    else:
        cfg = TrainConfig(arch=EncoderArchConfig(**SMALL, encoder_num_layers=1, **arch,
                                                 **({} if conditioner == "standard" else {"conditioner": conditioner})))
    torch.manual_seed(0)
    return build_model(cfg, meta).eval()


@pytest.fixture(scope="module")
def split(tiny_dataset):
    return ArcSplit(tiny_dataset[0], "test")


def canvases(split, idx):
    return split.batch(idx, "padded")


@pytest.mark.parametrize("conditioner", ["puzzle_embedding", "standard"])
def test_the_objective_is_the_mean_over_each_examples_own_pairs(split, conditioner):
    """Against a plain loop: each present pair run alone through the model with its example's
    context, its loss averaged over its labelled cells, then over the example's pairs."""
    model = make_model(conditioner, split.meta)
    batch = canvases(split, np.arange(3))
    context = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = demonstration_objective(model, Conditioning(context), batch, act_steps=2)
        for b in range(3):
            losses = []
            for d in np.flatnonzero(batch["demo_mask"][b].numpy()):
                labels = batch["demo_labels"][b, d : d + 1].long()
                labels = labels.masked_fill(labels == PAD_ID, -100)
                pair = {"inputs": batch["demo_inputs"][b, d : d + 1], "labels": labels}
                carry = model.initial_carry(pair)
                for _ in range(2):
                    carry, out = model(carry, pair, Conditioning(context[b : b + 1]))
                losses.append(stablemax_cross_entropy(out.logits, labels).sum() / (labels != -100).sum())
            torch.testing.assert_close(got[b], torch.stack(losses).mean(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("conditioner", ["puzzle_embedding", "standard"])
def test_adaptation_lowers_the_objective_and_changes_no_weight(split, conditioner):
    model = make_model(conditioner, split.meta)
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    batch = split.batch(np.arange(4), model.conditioner.demos or "padded")
    batch.update({k: v for k, v in canvases(split, np.arange(4)).items() if k.startswith("demo_")})
    with torch.no_grad():
        conditioning = model.conditioner(batch)
    cfg = AdaptConfig(target="context", steps=5, lr=0.05)
    adapted, before, after = adapt_context(model, conditioning, batch, cfg, contextlib.nullcontext)
    assert (after <= before).all() and (after < before).any()
    torch.testing.assert_close(before, demonstration_objective(model, Conditioning(conditioning.context.float()), batch, 2))
    torch.testing.assert_close(after, demonstration_objective(model, Conditioning(adapted.context.float()), batch, 2))
    assert all(torch.equal(v, before_weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    moved = (adapted.context != conditioning.context).any(-1)  # (B, P)
    if conditioner == "puzzle_embedding":  # only the position the embedding fills
        assert moved[:, 0].any() and not moved[:, 1:].any()
    else:
        assert moved.any()


def test_the_kept_context_is_never_worse_than_the_start(split, monkeypatch):
    """With steps that climb the objective instead (gradient ascent planted as the optimiser),
    every example keeps its starting context and objective."""

    climbed = []

    class Ascent:
        def __init__(self, params, lr):
            self.params, self.lr = params, lr
            climbed.extend(params)

        def step(self):
            for p in self.params:
                p.data += self.lr * p.grad.sign()

    monkeypatch.setattr("trm.adapt.torch.optim.Adam", Ascent)
    model = make_model("standard", split.meta)
    batch = split.batch(np.arange(4), "sequence")
    batch.update({k: v for k, v in canvases(split, np.arange(4)).items() if k.startswith("demo_")})
    with torch.no_grad():
        conditioning = model.conditioner(batch)
    cfg = AdaptConfig(target="context", steps=3, lr=0.5)
    adapted, before, after = adapt_context(model, conditioning, batch, cfg, contextlib.nullcontext)
    assert torch.equal(after, before) and torch.equal(adapted.context, conditioning.context)
    with torch.no_grad():  # where the climb ended: worse for every example
        assert (demonstration_objective(model, Conditioning(climbed[0]), batch, 2) > before).all()


@pytest.mark.parametrize("conditioner", ["puzzle_embedding", "standard"])
def test_zero_steps_is_plain_evaluation_bit_for_bit(split, conditioner):
    model = make_model(conditioner, split.meta)
    common = dict(local_batch_size=3, device=torch.device("cpu"), autocast=contextlib.nullcontext,
                  demos=model.conditioner.demos, vote=True, ks=[1, 2], prefix="test", reliance=True)  # fmt: skip
    idx = np.arange(split.num_examples)
    plain = evaluate_split(model, split, idx, **common)
    zero = evaluate_split(model, split, idx, adapt=AdaptConfig(target="context", steps=0), **common)
    assert {k: v for k, v in zero.items() if "adapt" not in k} == plain
    assert zero["eval/test/adapt_objective_after"] == zero["eval/test/adapt_objective_before"] > 0
    adapted = evaluate_split(model, split, idx, adapt=AdaptConfig(target="context", steps=3, lr=0.05), **common)
    assert adapted["eval/test/adapt_objective_after"] < adapted["eval/test/adapt_objective_before"]
    assert adapted["eval/test/adapt_ms_per_example"] > 0


def _adapted_metrics_as_rank(rank: int, world: int, store: str, split, out: str, target: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(adapted_metrics(split, target), f)
    finally:
        dist.destroy_process_group()


def adapted_metrics(split, target="context"):
    model = make_model("standard", split.meta)
    return evaluate_split(model, split, np.arange(split.num_examples), local_batch_size=2, device=torch.device("cpu"),
                          autocast=contextlib.nullcontext, demos="sequence", vote=True, ks=[1, 2], prefix="test",
                          adapt=AdaptConfig(target=target, steps=2, lr=0.05 if target == "context" else 0.01,
                                            augmentations=2, tasks_per_batch=1))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("target", ["context", "encoder"])
def test_adaptation_under_two_ranks_gives_the_metrics_of_one(split, tmp_path, target):
    """Each rank adapts its own examples (its own tasks when fine-tuning); gathered votes and
    summed objectives equal one process's."""
    import json

    torch.set_num_threads(1)
    one = adapted_metrics(split, target)
    run_forked_ranks(_adapted_metrics_as_rank, 2, str(tmp_path / "store"), split, str(tmp_path), target)
    untimed = lambda metrics: {k: v for k, v in metrics.items() if "_ms_" not in k}  # noqa: E731
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert untimed(got) == pytest.approx(untimed(one))


# Fine-tuning of weights per task (target=encoder / all) -------------------------------------------


def fit_batch(split, which, copies=2):
    """The copies of the demonstrations of the first example of each of the split's tasks ``which``."""
    task_of = split.example_task(np.arange(split.num_examples))
    tasks = np.unique(task_of)[which]
    first = [int(np.flatnonzero(task_of == t)[0]) for t in tasks]
    return augmented_copies(split, split.demo_rows(np.asarray(first)), tasks, copies)


def test_leave_one_out_views_by_hand():
    mask = torch.tensor([[True, True, False, True]])
    expected = torch.tensor([[[0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 0, 0]]], dtype=torch.bool)
    assert torch.equal(leave_one_out(mask), expected)


def test_the_leave_one_out_objective_against_a_plain_loop(split):
    """Each present pair of each copy predicted alone, with the context the encoder (its own
    padded forward) computes from that copy's demonstrations without the pair; losses averaged
    over the task's present pairs. A pair that predicted itself would see its own answer."""
    model = make_model("standard", split.meta)
    fit = fit_batch(split, [0], copies=2)
    weights = {n: p.detach()[None] for n, p in model.named_parameters() if n.startswith("conditioner.")}
    with torch.no_grad():
        got = _per_task(lambda m, *a: _leave_one_out_objective(m, *a, 2), model, weights,
                        fit["fit_inputs"], fit["fit_labels"], fit["fit_mask"])  # fmt: skip
        losses = []
        inputs, labels, mask = fit["fit_inputs"][0], fit["fit_labels"][0], fit["fit_mask"][0]
        for a in range(2):
            for j in np.flatnonzero(mask[a].numpy()):
                others = mask[a : a + 1].clone()
                others[0, j] = False
                context = model.conditioner({"demo_inputs": inputs[a : a + 1], "demo_labels": labels[a : a + 1],
                                             "demo_mask": others}).context  # fmt: skip
                target = labels[a, j : j + 1].long().masked_fill(labels[a, j : j + 1] == PAD_ID, -100)
                pair = {"inputs": inputs[a, j : j + 1], "labels": target}
                carry = model.initial_carry(pair)
                for _ in range(2):
                    carry, out = model(carry, pair, Conditioning(context))
                losses.append(stablemax_cross_entropy(out.logits, target).sum() / (target != -100).sum())
    assert mask.sum() >= 4  # two copies of at least two demonstrations
    torch.testing.assert_close(got[0], torch.stack(losses).mean(), rtol=1e-5, atol=1e-7)


def test_augmented_copies_are_the_task_under_one_transform(split):
    """Copy 0 is the demonstrations as given; every other copy is all of them under one dihedral
    transform and one colour permutation (0 fixed), and differs from copy 0."""
    from trm.data.grids import dihedral

    fit = fit_batch(split, [0, 1], copies=3)
    rows = split.demo_rows(np.asarray([0]))
    assert torch.equal(fit["fit_inputs"][0, 0], split.canvases(rows)["demo_inputs"][0])
    size = split.grid_size
    for t in range(2):
        present = np.flatnonzero(fit["fit_mask"][t, 0].numpy())
        original = [decode_grid(fit[k][t, 0, d].numpy(), size) for d in present for k in ("fit_inputs", "fit_labels")]
        for a in (1, 2):
            copy = [decode_grid(fit[k][t, a, d].numpy(), size) for d in present for k in ("fit_inputs", "fit_labels")]
            assert any(not np.array_equal(o, c) for o, c in zip(original, copy))
            assert torch.equal(fit["fit_mask"][t, a], fit["fit_mask"][t, 0])

            def consistent(transform):
                colours = {0: 0}
                for o, c in zip(original, copy):
                    moved = dihedral(o, transform)
                    if moved.shape != c.shape:
                        return False
                    for x, y in zip(moved.ravel(), c.ravel()):
                        if colours.setdefault(int(x), int(y)) != y:
                            return False
                return len(set(colours.values())) == len(colours)  # a permutation

            assert any(consistent(transform) for transform in range(8))


@pytest.mark.parametrize("conditioner, arch", [("standard", {}), ("in_context", {"offset_prior": True, "colour_map": True})])
def test_finetuning_adapts_only_its_target_per_task_and_writes_no_weight(split, conditioner, arch):
    """Also for the in-context core with the offset prior and the colour map, whose bias of
    attention and input embedding depend on the fitted weights (under vmap)."""
    model = make_model(conditioner, split.meta, **arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fit = fit_batch(split, [0, 1])
    for target, names in [("encoder", {n for n, _ in model.named_parameters() if n.startswith("conditioner.")}),
                          ("all", {n for n, _ in model.named_parameters()})]:  # fmt: skip
        cfg = AdaptConfig(target=target, steps=2, lr=0.01, augmentations=2)
        weights, before, after = finetune(model, fit, cfg, contextlib.nullcontext)
        assert set(weights) == names  # the target's weights, and only those, have per-task copies
        assert (after <= before).all() and (after < before).all()
        moved = [n for n, w in weights.items() if not torch.equal(w[0], dict(model.named_parameters())[n])]
        assert moved
        # Each task's copy is its own: task 1 fitted alone gets the same weights.
        alone, _, after_alone = finetune(model, {k: v[1:] for k, v in fit.items()}, cfg, contextlib.nullcontext)
        torch.testing.assert_close(after_alone[0], after[1])
        for n in weights:
            # Float rounding of batched products differs with the batch; a shared update would differ by ~lr.
            torch.testing.assert_close(alone[n][0], weights[n][1], rtol=1e-3, atol=1e-4)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_kept_weights_are_never_worse_than_the_start(split, monkeypatch):
    monkeypatch.setattr("trm.adapt.torch.optim.Adam", _Ascent)
    model = make_model("standard", split.meta)
    weights, before, after = finetune(model, fit_batch(split, [0, 1]), AdaptConfig(target="encoder", steps=3, lr=0.05),
                                      contextlib.nullcontext)  # fmt: skip
    assert torch.equal(after, before)
    assert all(torch.equal(w[0], dict(model.named_parameters())[n]) for n, w in weights.items())


class _Ascent:
    """Gradient ascent in place of the optimiser: every step makes the objective worse."""

    def __init__(self, params, lr):
        self.params, self.lr = params, lr

    def step(self):
        for p in self.params:
            p.data += self.lr * p.grad.sign()


@pytest.mark.parametrize("target", ["encoder", "all"])
def test_zero_steps_of_finetuning_is_plain_evaluation(split, target):
    """The same predictions: the encoder runs on the padded canvases instead of packed pairs, so
    accuracies agree to float rounding (not bit for bit) and votes exactly."""
    model = make_model("standard", split.meta)
    common = dict(local_batch_size=3, device=torch.device("cpu"), autocast=contextlib.nullcontext,
                  demos=model.conditioner.demos, vote=True, ks=[1, 2], prefix="test", reliance=True)  # fmt: skip
    idx = np.arange(split.num_examples)
    plain = evaluate_split(model, split, idx, **common)
    zero = evaluate_split(model, split, idx, adapt=AdaptConfig(target=target, steps=0, tasks_per_batch=1), **common)
    assert {k: v for k, v in zero.items() if "adapt" not in k} == pytest.approx(plain, rel=1e-9, abs=1e-12)
    assert zero["eval/test/adapt_objective_after"] == zero["eval/test/adapt_objective_before"] > 0
    assert zero["eval/test/adapt_ms_per_task"] > 0


def test_weight_targets_need_a_demo_encoder(split):
    from trm.errors import InputError

    check_target(AdaptConfig(target="encoder"), make_model("standard", split.meta))
    with pytest.raises(InputError, match="eval.adapt.target=all"):
        check_target(AdaptConfig(target="all"), make_model("puzzle_embedding", split.meta))
