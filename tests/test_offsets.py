"""The offset prior (encoders/offsets.py): its correlation against a plain loop, the offset a
shift puts its peak at, canvases rebuilt from cell triples, the bias only between grid cells, and
its configuration's refusals."""

import numpy as np
import pytest
import torch

import encoders  # noqa: F401
from encoders.config import EncoderArchConfig
from encoders.offsets import OffsetPrior, pair_canvases
from trm.data.demos import cell_triples
from trm.data.families.catalog import Translate
from trm.data.grids import encode_grid
from trm.model.config import ArchConfig
from trm.model.trm import RecursiveCore


def test_correlation_matches_a_plain_loop():
    """corr[n, c, o] = sum over output cells p of g(out[p])[c] f(in[p + o])[c] / output cells,
    o = (dy, dx) at index (dy + S - 1)(2S - 1) + (dx + S - 1), cells off the canvas left out."""
    S, C = 3, 2
    torch.manual_seed(0)
    prior = OffsetPrior(vocab_size=5, side=S, channels=C, heads=1).double()
    with torch.no_grad():
        prior.output_features.weight[1:].normal_()  # features unlike the input's
    g = torch.Generator().manual_seed(1)
    inputs, outputs = torch.randint(0, 5, (2, S * S), generator=g), torch.randint(0, 5, (2, S * S), generator=g)
    got = prior.correlate(inputs, outputs)
    f, h = prior.input_features.weight.detach(), prior.output_features.weight.detach()
    span = 2 * S - 1
    for n in range(2):
        cells = int((outputs[n] != 0).sum())
        for dy in range(-S + 1, S):
            for dx in range(-S + 1, S):
                want = torch.zeros(C, dtype=torch.float64)
                for r in range(S):
                    for c in range(S):
                        if 0 <= r + dy < S and 0 <= c + dx < S:
                            want += h[outputs[n, r * S + c]] * f[inputs[n, (r + dy) * S + c + dx]]
                torch.testing.assert_close(got[n, :, (dy + S - 1) * span + dx + S - 1], want / cells)


def test_a_shift_puts_the_peak_at_the_offset_of_the_source_cell():
    """One-hot colour features: corr at o counts the output cells whose colour the input holds at
    p + o. For a shift by (dy, dx) every cell that came from the grid matches at o = (-dy, -dx)."""
    S = 6
    prior = OffsetPrior(vocab_size=12, side=S, channels=12, heads=2)
    with torch.no_grad():
        prior.input_features.weight.copy_(torch.eye(12))
        prior.output_features.weight.copy_(torch.eye(12))
        prior.input_features.weight[0] = prior.output_features.weight[0] = 0
    rng = np.random.default_rng(0)
    grid = rng.integers(1, 10, size=(5, 5)).astype(np.uint8)
    for dy, dx in [(1, 2), (-2, 1), (0, -1)]:
        out = Translate().apply(grid, (dy, dx))
        x, y = torch.tensor(encode_grid(grid, S))[None], torch.tensor(encode_grid(out, S))[None]
        corr = prior.correlate(x, y).sum(1)[0]  # (N,)
        peak = int(corr.argmax())
        assert divmod(peak, 2 * S - 1) == (-dy + S - 1, -dx + S - 1)
        # The exact value: every output cell (colours and the EOS frame) whose source lies on the
        # canvas at p - (dy, dx) with the same token, over the output's non-PAD cells.
        xs, ys = x.view(S, S).numpy(), y.view(S, S).numpy()
        matches = sum(ys[r, c] != 0 and 0 <= r - dy < S and 0 <= c - dx < S and ys[r, c] == xs[r - dy, c - dx]
                      for r in range(S) for c in range(S))  # fmt: skip
        assert corr[peak].item() == pytest.approx(matches / int((ys != 0).sum()))
        bias = prior.bias(prior.correlate(x, y)[None], torch.ones(1, 1, dtype=torch.bool))
        assert bias.shape == (1, 2, (2 * S - 1) ** 2) and int(bias[0, 0].argmax()) == peak  # the mix starts at 1
        assert (bias[0, 1] == 0).all()  # in the first half of the heads


@pytest.mark.parametrize("layout", ["sequence", "overlay"])
def test_canvases_come_back_from_cell_triples_packed_or_not(layout):
    S = 4
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(2, 12, (3, S * S), generator=g) * (torch.rand(3, S * S, generator=g) < 0.7)
    outputs = torch.randint(2, 12, (3, S * S), generator=g) * (torch.rand(3, S * S, generator=g) < 0.7)
    triples = cell_triples(inputs, outputs, layout)
    back = pair_canvases(triples, layout, S)
    assert torch.equal(back[0], inputs) and torch.equal(back[1], outputs)
    # Packed: PAD cells dropped, the rest shuffled, rows padded with all-zero triples.
    kept = [t[(t[:, 0] != 0) | ((t[:, 1] != 0) if layout == "overlay" else False)] for t in triples]
    rows = torch.zeros(3, max(len(k) for k in kept) + 2, 3, dtype=torch.long)
    for i, k in enumerate(kept):
        rows[i, : len(k)] = k[torch.randperm(len(k), generator=g)]
    back = pair_canvases(rows, layout, S)
    assert torch.equal(back[0], inputs) and torch.equal(back[1], outputs)


def test_the_core_adds_the_bias_between_grid_cells_only():
    """A zero bias changes nothing; a bias reaches the grid's attention (the logits move) but not
    the context's: with every grid cell's score to every other grid cell raised alike, the same."""
    arch = ArchConfig(hidden_size=16, num_heads=2, L_layers=1, H_cycles=1, L_cycles=1, puzzle_emb_len=2)
    torch.manual_seed(0)
    core = RecursiveCore(arch, vocab_size=12, seq_len=9).double()
    B, P, L, N = 2, 2, 9, 25
    inputs = torch.randint(0, 12, (B, L))
    context = torch.randn(B, P, 16, dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True]])
    z = torch.randn(B, P + L, 16, dtype=torch.float64)
    run = lambda bias, ctx=context: core(z, z, inputs, ctx, mask, None, bias)[2]  # noqa: E731
    plain = run(None)
    torch.testing.assert_close(run(torch.zeros(B, 2, N, dtype=torch.float64)), plain)
    assert not torch.allclose(run(torch.randn(B, 2, N, dtype=torch.float64)), plain)
    # The score from grid cell i to grid cell j gains the bias at j's offset from i (the input cell
    # p + o that the correlation pairs with output cell p), nothing where a context token is
    # involved, -inf at masked keys.
    bias = torch.randn(B, 2, N, dtype=torch.float64)
    _, scores, _ = core.positions(inputs, P, mask, None, bias)
    assert scores.shape == (B, 2, P + L, P + L)
    for i in range(L):
        for j in range(L):
            (ri, ci), (rj, cj) = divmod(i, 3), divmod(j, 3)
            assert torch.equal(scores[:, :, P + i, P + j], bias[:, :, (rj - ri + 2) * 5 + cj - ci + 2])
    assert (scores[:, :, :, :P][mask[:, None, None, :].expand(-1, 2, P + L, -1)] == 0).all()
    assert (scores[:, :, :, :P][~mask[:, None, None, :].expand(-1, 2, P + L, -1)] == float("-inf")).all()
    assert (scores[:, :, :P, P:] == 0).all()
    # Masked context tokens stay inert under a bias.
    bias = torch.randn(B, 2, N, dtype=torch.float64)
    noisy = torch.where(mask[..., None], context, torch.randn_like(context))
    torch.testing.assert_close(run(bias, noisy), run(bias))


@pytest.mark.parametrize("layout", ["sequence", "overlay"])
def test_the_dense_encoding_gives_the_same_priors(layout):
    """Per-task fine-tuning and the latent steps rebuild the context from encode_dense's pairs: the
    offset bias and the colour map's input embedding and output bias they give are the forward pass's."""
    from test_cells import canvases, make_cfg, make_model

    padded, _ = canvases()
    model = make_model(make_cfg("in_context", layout, encoder_packing=False, offset_prior=True, colour_map=True,
                                colour_map_logits=10.0))
    model = model.double().eval()
    with torch.no_grad():
        direct = model.conditioner(padded)
        pairs = model.conditioner.encode_dense(padded["demo_inputs"], padded["demo_labels"])
        again = model.conditioner.context_of_pairs(pairs, padded["demo_mask"])
    for prior in ("offset_bias", "input_embedding", "output_bias"):
        assert getattr(direct, prior).abs().sum() > 0
        torch.testing.assert_close(getattr(again, prior), getattr(direct, prior))


@pytest.mark.parametrize("arch, message", [
    ({"conditioner": "demo_encoder"}, "offset_prior is read off every cell of the demonstrations"),
    ({"conditioner": "token_set", "mlp_t": True}, "offset_prior biases attention; mlp_t has none"),
])  # fmt: skip
def test_offset_prior_refuses_what_it_cannot_bias(arch, message):
    with pytest.raises(ValueError, match=message):
        EncoderArchConfig(offset_prior=True, **arch)
