"""Test-time adaptation of the context (eval.adapt, trm/adapt.py)."""

import contextlib

import numpy as np
import pytest
import torch

from trm.adapt import adapt_context, demonstration_objective
from trm.config import AdaptConfig
from trm.data.dataset import ArcSplit
from trm.data.grids import PAD_ID
from trm.evaluate import evaluate_split
from trm.losses import stablemax_cross_entropy
from trm.model.conditioning import Conditioning

from helpers import run_forked_ranks

SMALL = dict(hidden_size=32, num_heads=2, L_layers=1, H_cycles=1, L_cycles=1, puzzle_emb_len=2, halt_max_steps=2)


def make_model(conditioner, meta):
    from encoders.config import EncoderArchConfig, EncoderTrainConfig
    from trm.config import ArchConfig, TrainConfig
    from trm.train import build_model

    if conditioner == "puzzle_embedding":
        cfg = TrainConfig(arch=ArchConfig(**SMALL))
    else:
        cfg = EncoderTrainConfig(arch=EncoderArchConfig(**SMALL, encoder_num_layers=1))
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
        got = demonstration_objective(model, context, batch, act_steps=2)
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
    torch.testing.assert_close(before, demonstration_objective(model, conditioning.context.float(), batch, 2))
    torch.testing.assert_close(after, demonstration_objective(model, adapted.context.float(), batch, 2))
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
        assert (demonstration_objective(model, climbed[0], batch, 2) > before).all()


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


def _adapted_metrics_as_rank(rank: int, world: int, store: str, split, out: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(adapted_metrics(split), f)
    finally:
        dist.destroy_process_group()


def adapted_metrics(split):
    model = make_model("standard", split.meta)
    return evaluate_split(model, split, np.arange(split.num_examples), local_batch_size=2, device=torch.device("cpu"),
                          autocast=contextlib.nullcontext, demos="sequence", vote=True, ks=[1, 2], prefix="test",
                          adapt=AdaptConfig(target="context", steps=2, lr=0.05))  # fmt: skip


@pytest.mark.slow
def test_adaptation_under_two_ranks_gives_the_metrics_of_one(split, tmp_path):
    """Each rank adapts its own examples; gathered votes and summed objectives equal one process's."""
    import json

    torch.set_num_threads(1)
    one = adapted_metrics(split)
    run_forked_ranks(_adapted_metrics_as_rank, 2, str(tmp_path / "store"), split, str(tmp_path))
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        timing = "eval/test/adapt_ms_per_example"
        assert {k: v for k, v in got.items() if k != timing} == pytest.approx({k: v for k, v in one.items() if k != timing})
