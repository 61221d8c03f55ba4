"""The conditioners that read every demonstration cell (in_context, token_set): gradients through
real ACT steps, few or no demonstrations, padding and empty slots inert, packed = padded, the
context's length following the batch, positions aligned with the query's cells, the recursion
state kept across a change of context length."""

import functools

import numpy as np
import pytest
import torch

import encoders  # noqa: F401
from encoders.config import EncoderArchConfig
from trm.config import TrainConfig, plan_run
from trm.data.demos import pack_demos
from trm.train import Optimisers, build_model, train_step

from test_encoders import ROWS, demo_pool, make_batch

META = {"vocab_size": 12, "grid_size": 4, "seq_len": 16, "num_puzzle_identifiers": 10, "max_demos": 5}
B, D = 4, 5
CASES = [(c, layout) for c in ("in_context", "token_set") for layout in ("sequence", "overlay")]
# What is read off the canvases besides the cells (the colour map with its logit path: both its outputs).
PRIORS = [{}, {"offset_prior": True}, {"colour_map": True, "colour_map_logits": 10.0}]


def make_cfg(conditioner, layout, **arch):
    arch = EncoderArchConfig(hidden_size=32, num_heads=4, L_layers=1, H_cycles=2, L_cycles=1, puzzle_emb_len=3,
                             halt_max_steps=4, halt_exploration_prob=0.0, conditioner=conditioner,
                             encoder_pair_layout=layout, token_set_layers=1, **arch)  # fmt: skip
    return TrainConfig(arch=arch, global_batch_size=B, lr_warmup_steps=0, weight_decay=0.0, lr=1e-3)


_make_cfg = make_cfg


def make_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg, META)


def canvases(rows=ROWS):
    """The demonstration pool's rows ``rows`` (B, D) on the canvas, and packed with every example's
    cells (several length buckets), around make_batch()'s queries."""
    inputs, labels = demo_pool()
    batch = make_batch()
    padded = {**batch, "demo_inputs": torch.tensor(np.where(rows[..., None] >= 0, inputs[rows], 0)).int(),
              "demo_labels": torch.tensor(np.where(rows[..., None] >= 0, labels[rows], 0)).int(),
              "demo_mask": torch.tensor(rows >= 0)}  # fmt: skip
    return padded, lambda layout: {**batch, "demos": pack_demos(inputs, labels, rows, f"{layout}:cells", buckets=(8, 16))}


def autocast():
    return functools.partial(torch.autocast, "cpu", enabled=False)


@pytest.mark.parametrize("conditioner,layout", CASES)
@pytest.mark.parametrize("valid", [(1, 1, 1, 1), (0, 2, 0, 1), (0, 0, 0, 0)])
def test_few_or_no_demonstrations_give_finite_contexts_and_updates(conditioner, layout, valid):
    cfg = make_cfg(conditioner, layout, encoder_packing=False)
    model = make_model(cfg)
    batch = make_batch(valid=valid)
    cond = model.conditioner(batch)
    assert torch.isfinite(cond.context).all()
    opt, plan = Optimisers(cfg, model), plan_run(cfg, examples_per_epoch=100, world_size=1)
    _, metrics, _, _ = train_step(model, model.initial_carry(batch), batch, opt, cfg, 1, plan, autocast())
    assert all(torch.isfinite(v).all() for pair in metrics.values() for v in pair), metrics
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("conditioner,layout", CASES)
@pytest.mark.parametrize("priors", PRIORS)
def test_every_weight_trains_on_continuing_act_steps(conditioner, layout, priors):
    """As for the pooled encoders: the second step's samples continue from the first, so a cached
    or detached context would leave the conditioner without gradient there (the offset prior's
    features and mix and the colour map's included)."""
    cfg = make_cfg(conditioner, layout, encoder_packing=False, **priors)
    model = make_model(cfg)
    opt, plan = Optimisers(cfg, model), plan_run(cfg, examples_per_epoch=100, world_size=1)
    batch = make_batch()
    carry, _, _, _ = train_step(model, model.initial_carry(batch), batch, opt, cfg, 1, plan, autocast())
    grads = {}
    for name, p in model.conditioner.named_parameters():
        p.register_hook(functools.partial(grads.__setitem__, name))
    carry, metrics, _, _ = train_step(model, carry, make_batch(seed=1), opt, cfg, 2, plan, autocast())
    assert (carry.steps == 2).all()
    without = [n for n, _ in model.conditioner.named_parameters() if n not in grads or not grads[n].abs().sum() > 0]
    assert not without, f"weights without gradient: {without}"
    assert metrics["grad/encoder_norm"][0] > 0
    if priors.get("colour_map_logits"):  # the logit path's weight, logged as it stood in the step
        total, count = metrics["train/colour_logit_weight"]
        torch.testing.assert_close(total / count, model.conditioner.colour_map.log_logit_weight.detach().exp(),
                                   rtol=1e-2, atol=0)


@pytest.mark.parametrize("conditioner,layout", CASES)
@pytest.mark.parametrize("variant", [{}, {"relative_2d": True}, {"offset_prior": True}, {"offset_prior": True, "relative_2d": True},
                                     {"colour_map": True, "colour_map_logits": 10.0}])
def test_packed_cells_give_the_padded_step_and_gradients(conditioner, layout, variant):
    """The same demonstrations on the canvas (every slot, PAD cells masked) and packed (each
    example's cells in a row, in several buckets, rows padded to the longest): the core's logits
    and halting, and every weight's gradient, agree in float64; also with relative 2-D attention
    (in the core and the per-pair transformer), whose offsets come from the cells' positions, and
    with the offset prior and the colour map, read off the canvases rebuilt from the cells."""
    padded, packed = canvases()
    model = make_model(make_cfg(conditioner, layout, encoder_packing=False, **variant)).double()
    results = []
    for batch in (padded, packed(layout)):
        carry, out = model(model.initial_carry(batch), batch)
        (out.logits.square().mean() + out.q_halt.square().mean()).backward()
        results.append((out.logits.detach(), out.q_halt.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                                   if p.grad is not None}))  # fmt: skip
        model.zero_grad()
    (l1, q1, g1), (l2, q2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q2, q1, rtol=1e-10, atol=1e-10)
    assert g1.keys() == g2.keys() and any(n.startswith("conditioner.") for n in g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-7, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("conditioner,layout", CASES)
@pytest.mark.parametrize("priors", PRIORS)
def test_padding_and_empty_slots_change_nothing(conditioner, layout, priors):
    """An example's outputs do not depend on its empty slots' content, on another example making
    the batch's context longer (more padding), or on what a PAD cell would embed to."""
    make_cfg = functools.partial(_make_cfg, **priors)
    model = make_model(make_cfg(conditioner, layout)).eval()
    _, packed = canvases()
    batch = packed(layout)
    with torch.no_grad():
        _, reference = model(model.initial_carry(batch), batch)
        # Example 1 alone in a batch with example 2 (no demonstration): a shorter context, less padding.
        alone_rows = ROWS[[1, 2, 1, 2]]
        _, pack_alone = canvases(alone_rows)
        small = pack_alone(layout)
        assert small["demos"].cell_index.shape[1] < batch["demos"].cell_index.shape[1]
        small = {**small, "inputs": batch["inputs"][[1, 2, 1, 2]]}
        _, alone = model(model.initial_carry(small), small)
        torch.testing.assert_close(alone.logits[0], reference.logits[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone.logits[1], reference.logits[2], rtol=1e-5, atol=1e-5)
        # Empty slots filled with arbitrary grids (the canvas path reads every slot).
        padded, _ = canvases()
        padded_model = make_model(make_cfg(conditioner, layout, encoder_packing=False)).eval()
        _, before = padded_model(padded_model.initial_carry(padded), padded)
        noisy = dict(padded)
        g = torch.Generator().manual_seed(9)
        for key in ("demo_inputs", "demo_labels"):
            noise = torch.randint(0, 12, padded[key].shape, generator=g, dtype=torch.int32)
            noisy[key] = torch.where(~padded["demo_mask"][..., None], noise, padded[key])
        _, after = padded_model(padded_model.initial_carry(noisy), noisy)
        torch.testing.assert_close(after.logits, before.logits)
        # A PAD cell's embedding never reaches anything (grids of one footprint in and out: in the
        # overlay layout a cell empty in one grid alone is content).
        same = make_batch()
        _, before = padded_model(padded_model.initial_carry(same), same)
        padded_model.conditioner.embed.colour.weight[0].normal_()
        if layout == "overlay":
            padded_model.conditioner.embed.output_colour.weight[0].normal_()
        _, repainted = padded_model(padded_model.initial_carry(same), same)
        torch.testing.assert_close(repainted.logits, before.logits)


@pytest.mark.parametrize("layout", ["sequence", "overlay"])
def test_in_context_tokens_sit_at_their_cells_positions_and_follow_the_batch(layout):
    """A summary token at 0, then each present cell at puzzle_emb_len + its canvas position; as
    many tokens as the example with the most cells (so fewer demonstrations: a shorter context)."""
    model = make_model(make_cfg("in_context", layout)).eval()
    inputs, labels = demo_pool()
    _, packed = canvases()
    with torch.no_grad():
        cond = model.conditioner(packed(layout))
    for b, rows in enumerate(ROWS):
        expected = [p for r in rows[rows >= 0] for grid in ((inputs[r], labels[r]) if layout == "sequence" else
                                                              (inputs[r] | labels[r],)) for p in np.flatnonzero(grid)]  # fmt: skip
        got = cond.positions[b][cond.mask[b]].tolist()
        assert got == [0] + [3 + p for p in expected]
    assert cond.context.shape[1] == 1 + max(int(m.sum()) - 1 for m in cond.mask)
    with torch.no_grad():
        fewer = model.conditioner(canvases(np.where(np.arange(5) < 1, ROWS, -1))[1](layout))
    assert fewer.context.shape[1] < cond.context.shape[1]


def test_a_slot_that_keeps_its_example_keeps_its_state_when_the_context_length_changes():
    from trm.model.trm import TinyRecursiveModel

    z = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)  # 3 context + 2 grid positions
    init = torch.tensor([-1.0])
    longer = TinyRecursiveModel.fitted(z, init, 5, 2)
    assert longer[:, :3].tolist() == z[:, :3].tolist() and (longer[:, 3:5] == -1).all() and longer[:, 5:].tolist() == z[:, 3:].tolist()
    shorter = TinyRecursiveModel.fitted(z, init, 1, 2)
    assert shorter.tolist() == torch.cat([z[:, :1], z[:, 3:]], 1).tolist()
