import pytest
import torch

from trm.config import ArchConfig
from trm.model.conditioning import Conditioning
from trm.model.puzzle_embedding import PuzzleEmbedding
from trm.model.layers import swiglu_width
from trm.model.trm import TinyRecursiveModel

ARCH = dict(hidden_size=32, num_heads=4, L_layers=2, H_cycles=2, L_cycles=2, puzzle_emb_len=2, halt_max_steps=4)


def make(**overrides):
    arch = ArchConfig(**{**ARCH, **overrides})
    torch.manual_seed(0)
    return TinyRecursiveModel(arch, PuzzleEmbedding(10, arch.hidden_size, arch.puzzle_emb_len), 12, 9)


def batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 12, (B, 9), generator=g, dtype=torch.int32)
    labels = torch.randint(0, 12, (B, 9), generator=g)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": (torch.arange(B, dtype=torch.int32) % 9) + 1}


def test_swiglu_width_rounds_as_published():
    assert swiglu_width(512, 4) == 1536 and swiglu_width(128, 4) == 512


def test_shapes_and_q_head_initialisation():
    model = make()
    b = batch()
    carry, out = model(model.initial_carry(b), b)
    assert out.logits.shape == (3, 9, 12) and out.q_halt.shape == (3,)
    assert carry.z_H.shape == (3, 2 + 9, 32) and not carry.z_H.requires_grad
    torch.testing.assert_close(out.q_halt, torch.full((3,), -5.0))  # weight 0, bias -5


def test_halting_rules_in_training_and_evaluation():
    model = make(halt_exploration_prob=0.0)
    b = batch()
    model.train()
    carry = model.initial_carry(b)
    for step in range(1, 5):
        carry, _ = model(carry, b)
        assert (carry.steps == step).all()
        assert carry.halted.all() == (step == 4)  # q_halt = -5 < 0: only the step limit halts
    # q_halt > 0 halts after one step in training, never early in evaluation.
    with torch.no_grad():
        model.core.q_head.bias.copy_(torch.tensor([5.0, 0.0]))
    carry, _ = model(model.initial_carry(b), b)
    assert carry.halted.all()
    model.eval()
    carry = model.initial_carry(b)
    for step in range(1, 5):
        carry, _ = model(carry, b)
        assert carry.halted.all() == (step == 4)


def test_exploration_sets_a_minimum_number_of_steps():
    model = make(halt_exploration_prob=1.0, halt_max_steps=6)
    with torch.no_grad():
        model.core.q_head.bias.copy_(torch.tensor([5.0, 0.0]))  # would halt at once
    b = batch(B=64)
    carry = model.initial_carry(b)
    carry, _ = model(carry, b)
    assert not carry.halted.any()  # every minimum is at least 2
    halted_at = torch.zeros(64, dtype=torch.int32)
    for step in range(2, 7):
        carry, _ = model(carry, b)
        newly = carry.halted & (halted_at == 0)
        halted_at[newly] = step
        b = {k: v for k, v in b.items()}  # same data; halted slots restart
    assert (halted_at >= 2).all() and len(set(halted_at.tolist())) > 2  # minimums drawn from U[2, 6]


def test_halted_slots_take_the_new_example_and_reset_their_state():
    model = make(halt_exploration_prob=0.0, halt_max_steps=2)
    b1, b2 = batch(seed=1), batch(seed=2)
    carry, _ = model(model.initial_carry(b1), b1)
    assert torch.equal(carry.data["inputs"], b1["inputs"])
    carry2, _ = model(carry, b2)  # not halted: keeps b1
    assert torch.equal(carry2.data["inputs"], b1["inputs"]) and carry2.halted.all()
    carry3, _ = model(carry2, b2)  # halted: takes b2, starts again from H_init/L_init
    assert torch.equal(carry3.data["inputs"], b2["inputs"]) and (carry3.steps == 1).all()
    fresh, _ = model(model.initial_carry(b2), b2)
    torch.testing.assert_close(carry3.z_H, fresh.z_H)


@pytest.mark.parametrize("H, L", [(1, 2), (2, 1), (3, 2)])
def test_h_cycles_minus_one_without_gradient_then_one_with(H, L):
    """Each H cycle is L_cycles z_L updates and one z_H update: H - 1 cycles under no_grad, then
    one with gradient, in that order."""
    model = make(H_cycles=H, L_cycles=L)
    net, calls = model.core.net, []

    def recording(z, injection):
        calls.append(torch.is_grad_enabled())
        return net(z, injection)

    model.core.net = recording
    b = batch()
    model(model.initial_carry(b), b)
    assert calls == [False] * ((H - 1) * (L + 1)) + [True] * (L + 1)


def reference_logits(model, b, rows, grad_cycles):
    """The recursion written out from the paper, with gradient through the last ``grad_cycles``
    H cycles; the context is the puzzle vector in the first position, scaled by sqrt(hidden)."""
    core, arch = model.core, model.arch
    B, H, P = rows.shape[0], arch.hidden_size, arch.puzzle_emb_len
    context = torch.cat([rows[:, None] * H**0.5, torch.zeros(B, P - 1, H)], dim=1)
    x = torch.cat([context, core.embed_tokens(b["inputs"]) * H**0.5], dim=1)
    z_H = core.H_init.expand(B, P + b["inputs"].shape[1], H)
    z_L = core.L_init.expand_as(z_H)
    for cycle in range(arch.H_cycles):
        with torch.set_grad_enabled(cycle >= arch.H_cycles - grad_cycles):
            for _ in range(arch.L_cycles):
                z_L = core.net(z_L, z_H + x)
            z_H = core.net(z_H, z_L)
    return core.lm_head(z_H[:, P:])


def test_gradient_reaches_the_puzzle_embedding_rows_through_the_last_cycle():
    model = make(H_cycles=3, L_cycles=2)
    model.conditioner.weight.normal_()
    b = batch()
    _, out = model(model.initial_carry(b), b)
    out.logits.float().square().mean().backward()
    _, rows = model.conditioner.looked_up
    q_head = set(model.core.q_head.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.core.parameters() if p not in q_head)

    def grad_of_rows(grad_cycles):
        r = model.conditioner.weight[b["puzzle_identifiers"]].clone().requires_grad_(True)
        reference_logits(model, b, r, grad_cycles).square().mean().backward()
        return r.grad

    torch.testing.assert_close(rows.grad, grad_of_rows(1))
    assert not torch.allclose(rows.grad, grad_of_rows(3), rtol=1e-3, atol=1e-6)  # the two differ


def test_context_is_what_the_core_sees():
    model = make()
    b = batch()
    ctx = torch.zeros(3, 2, 32)
    _, a = model(model.initial_carry(b), b, Conditioning(ctx))
    _, c = model(model.initial_carry(b), b, Conditioning(ctx + 1.0))
    assert not torch.allclose(a.logits, c.logits)


@pytest.mark.parametrize("mlp_t", [False, True])
def test_bfloat16_forward_on_cpu(mlp_t):
    model = make(mlp_t=mlp_t)
    b = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, out = model(model.initial_carry(b), b)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.q_halt.dtype == torch.float32
