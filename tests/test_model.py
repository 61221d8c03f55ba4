import pytest
import torch

from trm.config import ArchConfig
from trm.model.conditioning import Conditioning, PuzzleEmbedding
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


def test_gradient_reaches_the_puzzle_embedding_rows_through_the_last_cycle():
    model = make()
    b = batch()
    _, out = model(model.initial_carry(b), b)
    out.logits.float().square().mean().backward()
    _, rows = model.conditioner.looked_up
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    q_head = set(model.core.q_head.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.core.parameters() if p not in q_head)


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
