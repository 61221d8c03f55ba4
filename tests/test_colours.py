"""The colour map (encoders/colours.py): its counts against a plain loop, its shares counted by
hand, a held-out colour pair arriving in the form of a trained one, the core adding the row of
each input token to its embedding and (the logit path) to its logits, and its configuration's
refusals."""

import pytest
import torch

import encoders  # noqa: F401
from encoders.colours import ColourMap
from encoders.config import EncoderArchConfig
from trm.model.config import ArchConfig
from trm.model.trm import RecursiveCore


def test_counts_match_a_plain_loop():
    """count[a, b] = cells holding a in the input and b in the output, PAD (0) in either not counted."""
    colours = ColourMap(vocab_size=5, hidden_size=3).double()
    g = torch.Generator().manual_seed(0)
    inputs, outputs = torch.randint(0, 5, (2, 3, 7), generator=g), torch.randint(0, 5, (2, 3, 7), generator=g)
    got = colours.count(inputs, outputs)
    assert got.shape == (2, 3, 5, 5)
    for i in range(2):
        for j in range(3):
            want = torch.zeros(5, 5, dtype=torch.float64)
            for a, b in zip(inputs[i, j].tolist(), outputs[i, j].tolist()):
                if a and b:
                    want[a, b] += 1
            torch.testing.assert_close(got[i, j], want)


def test_shares_over_the_present_demonstrations_counted_by_hand():
    """Two present pairs: token 2's cells became 3, 3 and 4 (shares 2/3, 1/3), token 5 stayed 5;
    an absent third pair (2 -> 6) counts for nothing; token 6, shown by no present pair, gets 0."""
    colours = ColourMap(vocab_size=8, hidden_size=8).double()
    with torch.no_grad():
        colours.to_hidden.copy_(torch.eye(8))  # the embedding is then the shares themselves
    pairs = torch.tensor([[[2, 2, 5, 0], [2, 6, 6, 6], [2, 2, 2, 2]]])  # (B=1, D=3, L=4) inputs
    outputs = torch.tensor([[[3, 3, 5, 7], [4, 0, 0, 0], [6, 6, 6, 6]]])
    mask = torch.tensor([[True, True, False]])
    shares = colours.embedding(colours.shares(colours.count(pairs, outputs), mask))[0]
    want = torch.zeros(8, 8, dtype=torch.float64)
    want[2, 3], want[2, 4], want[5, 5] = 2 / 3, 1 / 3, 1.0
    torch.testing.assert_close(shares, want)


def test_a_held_out_colour_pair_arrives_as_a_trained_one():
    """What a query cell receives depends on what its colour became, not on which colour it is: the
    row of colour 2 in a task mapping 2 -> 7 equals the row of colour 4 in a task mapping 4 -> 7."""
    colours = ColourMap(vocab_size=12, hidden_size=16)
    inputs = torch.tensor([[[2, 2, 9, 0]], [[4, 9, 4, 0]]])
    outputs = torch.tensor([[[7, 7, 9, 0]], [[7, 9, 7, 0]]])
    table = colours.embedding(colours.shares(colours.count(inputs, outputs), torch.ones(2, 1, dtype=torch.bool)))
    torch.testing.assert_close(table[0, 2], table[1, 4])
    torch.testing.assert_close(table[0, 2], colours.to_hidden[7])
    torch.testing.assert_close(table[0, 9], table[1, 9])  # the colour kept in both
    assert not torch.allclose(table[0, 2], table[0, 9])


def small_core():
    """A one-layer core (hidden 16, vocab 12, a 3x3 grid) in float64, and a call of it on 2 fixed
    examples with 2 context tokens: ``run(input_embedding, output_bias)`` -> its outputs."""
    arch = ArchConfig(hidden_size=16, num_heads=2, L_layers=1, H_cycles=1, L_cycles=1, puzzle_emb_len=2)
    torch.manual_seed(0)
    core = RecursiveCore(arch, vocab_size=12, seq_len=9).double()
    B, P, L = 2, 2, 9
    inputs = torch.randint(0, 12, (B, L))
    context = torch.randn(B, P, 16, dtype=torch.float64)
    z = torch.randn(B, P + L, 16, dtype=torch.float64)
    return core, inputs, lambda table=None, bias=None: core(z, z, inputs, context, None, None, None, table, bias)


def test_the_core_adds_each_input_tokens_row():
    """A zero table changes nothing; a table acts as that batch row's token embedding plus its rows."""
    core, inputs, call = small_core()
    B = inputs.shape[0]
    run = lambda table: call(table)[2]  # noqa: E731
    torch.testing.assert_close(run(torch.zeros(B, 12, 16, dtype=torch.float64)), run(None))
    table = torch.randn(B, 12, 16, dtype=torch.float64)
    got = run(table)
    weight = core.embed_tokens.weight.detach().clone()
    for b in range(B):
        with torch.no_grad():
            core.embed_tokens.weight.copy_(weight + table[b] / core.embed_scale)
        torch.testing.assert_close(got[b], run(None)[b])
    with torch.no_grad():
        core.embed_tokens.weight.copy_(weight)
    assert not torch.allclose(got, run(None))


def test_logit_rows_are_the_shares_times_the_learned_weight():
    """The logit path's rows: the shares times the weight it starts at (10), learned through its
    logarithm (d/d log w of w x shares = w x shares); without the path, none."""
    colours = ColourMap(vocab_size=6, hidden_size=4, logit_weight=10.0).double()
    inputs, outputs = torch.tensor([[[1, 1, 2, 3]]]), torch.tensor([[[4, 5, 2, 0]]])  # 1 -> 4, 5; 2 stays; 3 -> PAD
    shares = colours.shares(colours.count(inputs, outputs), torch.ones(1, 1, dtype=torch.bool))
    bias = colours.logits(shares)
    want = torch.zeros(1, 6, 6, dtype=torch.float64)
    want[0, 1, 4], want[0, 1, 5], want[0, 2, 2] = 5.0, 5.0, 10.0
    torch.testing.assert_close(bias, want)
    bias.sum().backward()
    torch.testing.assert_close(colours.log_logit_weight.grad, want.sum())
    assert ColourMap(vocab_size=6, hidden_size=4).logits(shares) is None


def test_the_core_adds_each_input_tokens_logit_row():
    """A zero bias changes nothing; otherwise each grid cell's logits gain the row of its input
    token, and nothing else changes (the context, the halting)."""
    _, inputs, call = small_core()
    B, L = inputs.shape
    run = lambda bias: call(bias=bias)  # noqa: E731
    plain = run(None)
    torch.testing.assert_close(run(torch.zeros(B, 12, 12, dtype=torch.float64))[2], plain[2])
    bias = torch.randn(B, 12, 12, dtype=torch.float64)
    got = run(bias)
    for b in range(B):
        for i in range(L):
            torch.testing.assert_close(got[2][b, i], plain[2][b, i] + bias[b, inputs[b, i]])
    torch.testing.assert_close(got[3], plain[3])


def test_colour_map_refuses_a_conditioner_without_cells():
    with pytest.raises(ValueError, match="colour_map is read off every cell of the demonstrations"):
        EncoderArchConfig(colour_map=True, conditioner="demo_encoder")
    with pytest.raises(ValueError, match="colour_map_logits .* needs colour_map=true"):
        EncoderArchConfig(colour_map_logits=10.0, conditioner="in_context")
