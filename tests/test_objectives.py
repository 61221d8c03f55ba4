"""The demonstration conditioners' own objectives: the contrastive objective against collapse and
the LPN-style latent steps, against plain formulas; and the test-time latent search that continues
them."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from encoders.objectives import contrastive_loss, halves
from trm.adapt import adapt_latent
from trm.config import AdaptConfig
from trm.model.conditioning import Conditioning

import test_cells
import test_encoders
from test_encoders import B, D, make_batch


def test_halves_split_each_samples_present_demonstrations_in_slot_order():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    first, second, valid = halves(mask)
    assert first.int().tolist() == [[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert second.int().tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert valid.tolist() == [True, True, False, False]


def reference_contrastive(za, zb, tasks, valid, t):
    """InfoNCE written out per sample: candidates are the valid samples of another task, and itself."""
    za, zb = F.normalize(za, dim=-1), F.normalize(zb, dim=-1)
    total, count = 0.0, 0
    for i in range(len(za)):
        if not valid[i]:
            continue
        js = [j for j in range(len(za)) if j == i or (valid[j] and tasks[j] != tasks[i])]
        a = torch.stack([za[i] @ zb[j] / t for j in js])
        b = torch.stack([zb[i] @ za[j] / t for j in js])
        own = js.index(i)
        total += 0.5 * (-(a[own] - torch.logsumexp(a, 0)) - (b[own] - torch.logsumexp(b, 0)))
        count += 1
    return total, count


def test_contrastive_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    tasks = torch.tensor([0, 1, 1, 2, 3, 0])  # two pairs of samples of one task: never each other's negatives
    valid = torch.tensor([True, True, True, False, True, True])
    loss, count = contrastive_loss(za, zb, tasks, valid, temperature=0.5)
    expected, n = reference_contrastive(za, zb, tasks, valid, 0.5)
    assert count.item() == n == 5
    torch.testing.assert_close(loss.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_a_collapsed_context_scores_the_log_of_its_candidates_and_a_separating_one_near_zero():
    tasks, valid = torch.arange(4), torch.ones(4, dtype=torch.bool)
    same = torch.ones(4, 3)
    loss, count = contrastive_loss(same, same, tasks, valid, temperature=0.1)
    assert loss.item() / count.item() == pytest.approx(math.log(4), rel=1e-5)
    apart = torch.eye(4)
    loss, _ = contrastive_loss(apart, apart, tasks, valid, temperature=0.05)
    assert loss.item() / 4 < 1e-6


@pytest.mark.parametrize("make", [lambda: test_encoders.make_cfg("standard", "mean", contrastive_weight=0.5),
                                  lambda: test_cells.make_cfg("in_context", "overlay", contrastive_weight=0.5,
                                                              encoder_packing=False)])  # fmt: skip
def test_the_contrastive_objective_is_a_weighted_auxiliary_loss_in_training_only(make):
    cfg = make()
    model = test_cells.make_model(cfg) if cfg.arch.conditioner == "in_context" else test_encoders.make_model(cfg)
    batch = make_batch(valid=(3, 1, 5, 2))
    cond = model.conditioner(batch)
    loss, count = cond.metrics["train/contrastive"]
    assert count.item() == 3  # the sample with one demonstration has no two halves
    torch.testing.assert_close(cond.aux_losses["contrastive_loss"], 0.5 * loss)
    cond.aux_losses["contrastive_loss"].backward()
    assert sum(p.grad.abs().sum() for p in model.conditioner.parameters() if p.grad is not None) > 0
    model.eval()
    assert "contrastive_loss" not in model.conditioner(batch).aux_losses


def latent_model(first_order=False, **arch):
    cfg = test_encoders.make_cfg("standard", "mean", latent_steps=1, latent_lr=0.5, latent_first_order=first_order, **arch)
    return test_encoders.make_model(cfg).double()


def reference_objective(model, latent, batch, act_steps=1):
    """The leave-one-out objective with one pair at a time: for each sample and each present pair j,
    the loss of y_j given x_j and the context of the sample's other pairs; their mean per sample."""
    per_sample = []
    for b in range(B):
        present = [j for j in range(D) if batch["demo_mask"][b, j]]
        losses = []
        for j in present:
            others = batch["demo_mask"][b : b + 1].clone()
            others[0, j] = False
            cond = model.conditioner.context_of_pairs(latent[b : b + 1], others)
            losses.append(model.pair_losses(batch["demo_inputs"][b, j : j + 1], batch["demo_labels"][b, j : j + 1], cond, act_steps)[0])
        per_sample.append(torch.stack(losses).mean() if losses else latent.new_zeros(()))
    return torch.stack(per_sample)


def test_the_latent_objective_is_leave_one_out_and_a_latent_step_is_its_gradient_step():
    model = latent_model().train()
    batch = make_batch(valid=(3, 1, 5, 2))
    latent = model.conditioner.encode_dense(batch["demo_inputs"], batch["demo_labels"]).detach().requires_grad_(True)
    got = model.latent_objective(latent, batch, act_steps=1)
    expected = reference_objective(model, latent, batch)
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(expected.sum(), latent)
    stepped = model.latent_descent(latent.detach(), batch, model.conditioner.latent_steps)
    torch.testing.assert_close(stepped, latent.detach() - 0.5 * grad)
    # A sample whose only pair is left out has the empty context: its pair still counts.
    assert got[1] > 0


@pytest.mark.parametrize("first_order", [False, True])
def test_training_takes_the_latent_steps_and_their_gradient_reaches_the_encoder(first_order):
    model = latent_model(first_order)
    batch = make_batch()
    plain = model.conditioner(batch)
    stepped = model.condition(batch)
    assert plain.latent is not None and not torch.allclose(stepped.context, plain.context)
    stepped.context.square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.conditioner.named_parameters() if p.grad is not None}
    assert got and all(torch.isfinite(g).all() for g in got.values())
    model.zero_grad()
    # First order: the step is a constant shift of the latent, so the encoder's gradient is that of
    # the context of (its latent + a constant); through the steps it differs.
    latent = model.conditioner(batch).latent
    shift = (stepped.latent - plain.latent).detach()
    model.conditioner.context_of_pairs(latent + shift, batch["demo_mask"]).context.square().sum().backward()
    constant = {n: p.grad.clone() for n, p in model.conditioner.named_parameters() if p.grad is not None}
    same = all(torch.allclose(got[n], constant[n], rtol=1e-6, atol=1e-9) for n in constant if n in got)
    assert same == first_order


def test_evaluation_takes_the_same_steps_and_latent_search_continues_from_them():
    model = latent_model().eval()
    batch = make_batch()
    autocast = functools.partial(torch.autocast, "cpu", enabled=False)
    with torch.no_grad():
        evaluated = model.condition(batch)
        again = model.condition(batch)
        plain = model.conditioner(batch)
    torch.testing.assert_close(evaluated.context, again.context)
    assert not torch.allclose(evaluated.context, plain.context)
    start, before, after = adapt_latent(model, batch, AdaptConfig(target="latent", steps=0, act_steps=1), autocast)
    torch.testing.assert_close(start.context, evaluated.context)  # zero search steps: the evaluated context
    searched, before, after = adapt_latent(model, batch, AdaptConfig(target="latent", steps=5, lr=0.5, act_steps=1), autocast)
    assert (after <= before).all() and (after < before).any()
    torch.testing.assert_close(before, model.latent_objective(evaluated.latent, batch, 1))
    assert isinstance(searched, Conditioning) and searched.context.shape == evaluated.context.shape
