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

    def recording(z, injection, *rest):
        calls.append(torch.is_grad_enabled())
        return net(z, injection, *rest)

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
    rope = core.rotary.tables(z_H.shape[1])  # positions 0..P+L-1
    for cycle in range(arch.H_cycles):
        with torch.set_grad_enabled(cycle >= arch.H_cycles - grad_cycles):
            for _ in range(arch.L_cycles):
                z_L = core.net(z_L, z_H + x, rope)
            z_H = core.net(z_H, z_L, rope)
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


def test_2d_rotary_positions_make_a_relative_offset_one_rotation_wherever_it_lies():
    """With rope_2d the score of two rotated vectors depends on the cells' (dy, dx) alone: equal for
    (0,0)->(1,2) and (2,1)->(3,3); a column (dx = 0) is one offset, where in one dimension a
    whole row apart (side) and a cell apart differ by the wrap at the edge."""
    from trm.model.layers import Rotary, apply_rotary

    P, side, dim = 2, 4, 16
    rope = Rotary(dim, P + side * side, grid=(P, side))
    q, k = torch.randn(dim), torch.randn(dim)

    def score(a, b):  # cells a, b as (row, col)
        ta, tb = P + a[0] * side + a[1], P + b[0] * side + b[1]
        qa = apply_rotary(q.view(1, 1, 1, dim), rope.cos[ta : ta + 1], rope.sin[ta : ta + 1])
        kb = apply_rotary(k.view(1, 1, 1, dim), rope.cos[tb : tb + 1], rope.sin[tb : tb + 1])
        return float((qa * kb).sum())

    assert score((0, 0), (1, 2)) == pytest.approx(score((2, 1), (3, 3)), abs=1e-5)
    assert score((0, 3), (1, 3)) == pytest.approx(score((2, 0), (3, 0)), abs=1e-5)  # straight down, any column
    one_d = Rotary(dim, P + side * side)
    assert not torch.allclose(rope.cos[P:], one_d.cos[P:])
    torch.testing.assert_close(rope.cos[P + 5], torch.cat([torch.cos(1 * one_d_freqs(dim // 2)), torch.cos(1 * one_d_freqs(dim // 2))] * 2))


def one_d_freqs(dim):
    return 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def test_relative_attention_is_the_formula_with_offset_keys_and_values():
    """score_ij = (q_i . k_j + q_i . rK[o_ij]) / sqrt(d); out_i = sum_j a_ij (v_j + rV[o_ij]),
    written out per pair; masked keys get no weight."""
    from trm.model.layers import Attention

    torch.manual_seed(0)
    B, T, H, heads, N = 2, 5, 8, 2, 4
    attn = Attention(H, heads, offsets=N).double()
    x = torch.randn(B, T, H, dtype=torch.float64)
    offsets = torch.randint(0, N, (B, T, T))
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    got = attn(x, key_mask=mask, offsets=offsets)
    q, k, v = attn.qkv(x).view(B, T, 3, heads, H // heads).permute(2, 0, 3, 1, 4)
    d = H // heads
    out = torch.zeros(B, heads, T, d, dtype=torch.float64)
    for b in range(B):
        for h in range(heads):
            for i in range(T):
                scores = torch.stack([(q[b, h, i] @ k[b, h, j] + q[b, h, i] @ attn.offset_keys[h, offsets[b, i, j]]) / d**0.5
                                      if mask[b, j] else torch.tensor(-torch.inf, dtype=torch.float64) for j in range(T)])  # fmt: skip
                a = torch.softmax(scores, 0)
                out[b, h, i] = sum(a[j] * (v[b, h, j] + attn.offset_values[h, offsets[b, i, j]]) for j in range(T))
    torch.testing.assert_close(got, attn.out(out.transpose(1, 2).reshape(B, T, H)))


def test_cell_offsets_by_hand():
    from trm.model.layers import cell_offsets

    cells = torch.tensor([[-1, 0, 5, 8]])  # on a 3x3 canvas: none, (0,0), (1,2), (2,2)
    o = cell_offsets(cells, 3)
    span = 5
    assert o[0, 1, 2] == (1 + 2) * span + (2 + 2)  # (0,0) -> (1,2): dy 1, dx 2
    assert o[0, 2, 1] == (-1 + 2) * span + (-2 + 2)
    assert o[0, 2, 3] == (1 + 2) * span + (0 + 2)  # (1,2) -> (2,2): straight down
    assert (o[0, 0] == span * span).all() and (o[0, :, 0] == span * span).all()  # no cell
    assert o[0, 1, 1] == 2 * span + 2  # itself: (0, 0)
