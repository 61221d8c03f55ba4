"""Every encoder x every pooling: shapes, gradient flow through real ACT training steps, freezing,
masking of PAD cells and absent demonstrations, order invariance, the KL term."""

import functools

import numpy as np

import pytest
import torch

import encoders  # noqa: F401
from encoders.config import EncoderArchConfig
from encoders.registry import ENCODERS, POOLINGS
from trm.config import TrainConfig, plan_run
from trm.model.trm import TinyRecursiveModel
from trm.train import Optimisers, build_model, total_loss, train_step

META = {"vocab_size": 12, "grid_size": 4, "seq_len": 16, "num_puzzle_identifiers": 10}
B, D = 4, 5
LAYOUTS = ("sequence", "overlay")
CASES = [(e, p, layout) for e in sorted(ENCODERS) for p in sorted(POOLINGS) for layout in LAYOUTS]


def make_cfg(encoder, pooling, **arch):
    arch = EncoderArchConfig(hidden_size=32, num_heads=4, L_layers=1, H_cycles=2, L_cycles=1, puzzle_emb_len=3,
                             halt_max_steps=4, halt_exploration_prob=0.0, encoder_type=encoder,
                             encoder_pooling_method=pooling, encoder_num_layers=1, encoder_set_layers=1, **arch)  # fmt: skip
    return TrainConfig(arch=arch, global_batch_size=B, lr_warmup_steps=0, weight_decay=0.0, lr=1e-3)


def make_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg, META)


def grid(g, n):
    """n random demonstration tensors (B, D, 16) with a 3x3 grid (and EOS) on a 4x4 canvas."""
    t = torch.zeros(B, D, 4, 4, dtype=torch.int32)
    t[..., :3, :3] = torch.randint(2, 12, (B, D, 3, 3), generator=g, dtype=torch.int32)
    t[..., 3, :3] = 1
    t[..., :3, 3] = 1
    return t.flatten(-2)


def make_batch(seed=0, valid=(3, 1, 5, 2)):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(D)[None, :] < torch.tensor(valid)[:, None]
    return {
        "inputs": torch.randint(0, 12, (B, 16), generator=g, dtype=torch.int32),
        "labels": torch.randint(0, 12, (B, 16), generator=g),
        "puzzle_identifiers": torch.arange(1, B + 1, dtype=torch.int32),
        "task_ids": torch.arange(B, dtype=torch.int32),
        "demo_inputs": grid(g, D), "demo_labels": grid(g, D), "demo_mask": mask,
    }  # fmt: skip


@pytest.mark.parametrize("encoder,pooling,layout", CASES)
@pytest.mark.parametrize("valid", [(1, 1, 1, 1), (0, 2, 0, 1), (0, 0, 0, 0)])
def test_few_or_no_demonstrations_give_finite_contexts_losses_and_gradients(encoder, pooling, layout, valid):
    """One demonstration, some samples with none, a batch with none: the context, the loss of a
    real training step, every gradient and every updated weight stay finite."""
    cfg = make_cfg(encoder, pooling, encoder_pair_layout=layout)
    model = make_model(cfg)
    batch = make_batch(valid=valid)
    cond = model.conditioner(batch)
    assert cond.context.shape == (B, 3, 32)
    assert torch.isfinite(cond.context).all()
    (cond.context.square().sum() + sum(cond.aux_losses.values())).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.conditioner.parameters() if p.grad is not None)
    model.zero_grad()
    opt, plan = Optimisers(cfg, model), plan_run(cfg, examples_per_epoch=100, world_size=1)
    autocast = functools.partial(torch.autocast, "cpu", enabled=False)
    _, metrics, _, _ = train_step(model, model.initial_carry(batch), batch, opt, cfg, 1, plan, autocast)
    assert all(torch.isfinite(v).all() for pair in metrics.values() for v in pair), metrics
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("encoder,pooling,layout", CASES)
def test_every_encoder_weight_trains_on_continuing_act_steps(encoder, pooling, layout):
    """Two real training steps; the second runs on samples that continue from the first ACT step
    (nothing halts before halt_max_steps), so a cached or detached context would leave the encoder
    without gradient there. Gradients are caught as backward computes them."""
    cfg = make_cfg(encoder, pooling, encoder_pair_layout=layout)
    model = make_model(cfg)
    opt = Optimisers(cfg, model)
    plan = plan_run(cfg, examples_per_epoch=100, world_size=1)
    autocast = functools.partial(torch.autocast, "cpu", enabled=False)
    batch = make_batch()
    carry = model.initial_carry(batch)
    carry, _, _, _ = train_step(model, carry, batch, opt, cfg, 1, plan, autocast)
    assert not carry.halted.any()
    grads = {}
    for name, p in model.conditioner.named_parameters():
        p.register_hook(functools.partial(grads.__setitem__, name))
    carry, metrics, _, _ = train_step(model, carry, make_batch(seed=1), opt, cfg, 2, plan, autocast)
    assert (carry.steps == 2).all()
    names = [n for n, _ in model.conditioner.named_parameters()]
    without = [n for n in names if n not in grads or not grads[n].abs().sum() > 0]
    assert not without, f"encoder weights without gradient: {without}"
    assert metrics["grad/encoder_norm"][0] > 0


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_frozen_encoder_stays_at_its_init_and_out_of_the_optimiser(encoder):
    cfg = make_cfg(encoder, "mean", freeze_encoder=True)
    model = make_model(cfg)
    opt = Optimisers(cfg, model)
    in_optimiser = {id(p) for g in opt.dense.param_groups for p in g["params"]}
    assert not in_optimiser & {id(p) for p in model.conditioner.parameters()}
    init = {n: p.detach().clone() for n, p in model.conditioner.named_parameters()}
    core_init = [p.detach().clone() for p in model.core.parameters()]
    plan = plan_run(cfg, examples_per_epoch=100, world_size=1)
    autocast = functools.partial(torch.autocast, "cpu", enabled=False)
    batch = make_batch()
    carry = model.initial_carry(batch)
    for step in range(1, 4):
        carry, _, _, _ = train_step(model, carry, batch, opt, cfg, step, plan, autocast)
    for n, p in model.conditioner.named_parameters():
        assert torch.equal(p, init[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(core_init, model.core.parameters()))


@pytest.mark.parametrize("encoder,pooling,layout", CASES)
def test_pad_cells_and_absent_demonstrations_do_not_change_the_context(encoder, pooling, layout):
    model = make_model(make_cfg(encoder, pooling, encoder_pair_layout=layout)).eval()
    batch = make_batch()
    with torch.no_grad():
        reference = model.conditioner(batch).context
        # Absent demonstrations filled with arbitrary grids.
        noisy = dict(batch)
        g = torch.Generator().manual_seed(9)
        absent = ~batch["demo_mask"]
        for key in ("demo_inputs", "demo_labels"):
            random = torch.randint(0, 12, batch[key].shape, generator=g, dtype=torch.int32)
            noisy[key] = torch.where(absent[..., None], random, batch[key])
        torch.testing.assert_close(model.conditioner(noisy).context, reference)
        # PAD cells given other content: a different PAD embedding.
        model.conditioner.embed.colour.weight[0].normal_()
        if layout == "overlay":  # a cell PAD in both grids is masked; one grid's PAD alone is content
            model.conditioner.embed.output_colour.weight[0].normal_()
        torch.testing.assert_close(model.conditioner(batch).context, reference)


@pytest.mark.parametrize("encoder,pooling,layout", CASES)
def test_demonstration_order_does_not_matter(encoder, pooling, layout):
    model = make_model(make_cfg(encoder, pooling, encoder_pair_layout=layout)).eval()
    batch = make_batch(valid=(5, 5, 5, 5))
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = {**batch, **{k: batch[k][:, perm] for k in ("demo_inputs", "demo_labels", "demo_mask")}}
    with torch.no_grad():
        torch.testing.assert_close(model.conditioner(shuffled).context, model.conditioner(batch).context)


def test_num_demos_keeps_the_first_valid_demonstrations():
    model = make_model(make_cfg("standard", "mean", num_demos=2)).eval()
    batch = make_batch(valid=(5, 1, 3, 2))
    mask = model.conditioner.select_demos(batch["demo_mask"])
    assert mask.sum(1).tolist() == [2, 1, 2, 2]
    changed = dict(batch)
    changed["demo_inputs"] = batch["demo_inputs"].clone()
    changed["demo_inputs"][:, 2:] = 0  # beyond the first two: never seen
    with torch.no_grad():
        torch.testing.assert_close(model.conditioner(changed).context, model.conditioner(batch).context)


def test_kl_term_is_the_formula_and_is_added_to_the_loss():
    cfg = make_cfg("lpn_variational", "mean", kl_weight=0.5)
    model = make_model(cfg).train()
    batch = make_batch()
    enc = model.conditioner
    mask = batch["demo_mask"]
    pairs = enc.encode_padded(batch["demo_inputs"], batch["demo_labels"], mask)
    mu, logvar = enc.mu(pairs), enc.logvar(pairs)
    kl_pair = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)
    expected = sum(kl_pair[b][mask[b]].mean() for b in range(B))
    cond = enc(batch)
    torch.testing.assert_close(cond.metrics["train/kl"][0], expected)
    torch.testing.assert_close(cond.aux_losses["kl_loss"], 0.5 * expected)
    carry, out = model(model.initial_carry(batch), batch)
    with_kl, _ = total_loss(out, carry)
    out.conditioning.aux_losses.clear()
    without, _ = total_loss(out, carry)
    torch.testing.assert_close(with_kl - without, cond.aux_losses["kl_loss"].double().to(with_kl.dtype), rtol=1e-4, atol=1e-4)


def test_variational_encoder_samples_in_training_and_takes_the_mean_in_evaluation():
    model = make_model(make_cfg("lpn_variational", "mean"))
    batch = make_batch()
    enc = model.conditioner
    with torch.no_grad():
        enc.train()
        a, b = enc(batch).context, enc(batch).context
        enc.eval()
        c, d = enc(batch).context, enc(batch).context
    assert not torch.allclose(a, b) and torch.equal(c, d)


def test_unknown_encoder_or_pooling_lists_the_valid_names():
    with pytest.raises(ValueError, match="lpn_standard, lpn_variational, standard"):
        EncoderArchConfig(encoder_type="transformer")
    with pytest.raises(ValueError, match="attention, cls, mean"):
        EncoderArchConfig(encoder_pooling_method="max")


def test_model_context_seam_is_the_same_core():
    """The encoder model is the puzzle-embedding model's core fed another context: with the same
    core weights and the encoder's context passed through the seam, both give the same step."""
    from trm.config import ArchConfig
    from trm.model.conditioning import Conditioning
    from trm.model.puzzle_embedding import PuzzleEmbedding

    model = make_model(make_cfg("standard", "mean")).eval()
    arch = ArchConfig(**{k: v for k, v in model.arch.model_dump().items() if k in ArchConfig.model_fields})
    original = TinyRecursiveModel(arch, PuzzleEmbedding(10, 32, 3), META["vocab_size"], META["seq_len"]).eval()
    original.core.load_state_dict(model.core.state_dict())
    batch = make_batch()
    with torch.no_grad():
        context = model.conditioner(batch).context
        _, own = model(model.initial_carry(batch), batch)
        _, seam = original(original.initial_carry(batch), batch, Conditioning(context))
        _, other = original(original.initial_carry(batch), batch, Conditioning(context.roll(1, dims=0)))
    torch.testing.assert_close(own.logits, seam.logits, rtol=0, atol=0)
    torch.testing.assert_close(own.q_halt, seam.q_halt, rtol=0, atol=0)
    assert not torch.allclose(own.logits, other.logits)  # the context matters to the comparison


def test_kl_gradient_reaches_the_encoder():
    """In evaluation mode the encoder's logvar head feeds only the KL term (z is the mean), so the
    gradient of the total loss on it is exactly the gradient of kl_weight x KL, written out here."""
    cfg = make_cfg("lpn_variational", "mean", kl_weight=0.5)
    model = make_model(cfg).eval()
    batch = make_batch()
    enc = model.conditioner
    carry, out = model(model.initial_carry(batch), batch)
    loss, _ = total_loss(out, carry)
    loss.backward()
    got = enc.logvar.weight.grad.clone()
    assert got.abs().sum() > 0
    with torch.no_grad():
        pairs = enc.encode_padded(batch["demo_inputs"], batch["demo_labels"], batch["demo_mask"])
    weight = enc.logvar.weight.detach().clone().requires_grad_(True)
    mu, logvar = enc.mu(pairs).detach(), pairs @ weight.T + enc.logvar.bias.detach()
    kl_pair = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)
    mask = batch["demo_mask"]
    reference = 0.5 * sum(kl_pair[b][mask[b]].mean() for b in range(B))
    reference.backward()
    torch.testing.assert_close(got, weight.grad)


def test_identity_diagnostic_pulls_the_context_toward_fixed_puzzle_codes():
    cfg = make_cfg("standard", "mean", identity_target_weight=2.0)
    model = make_model(cfg)
    batch = make_batch()
    enc = model.conditioner
    codes = enc.puzzle_code(batch["puzzle_identifiers"])
    torch.testing.assert_close(codes.square().mean(-1), torch.ones(B), atol=0.3, rtol=0)  # unit RMS
    torch.testing.assert_close(enc.puzzle_code(batch["puzzle_identifiers"]), codes)  # fixed
    cond = enc(batch)
    mse = (cond.context[:, 0] - codes).square().mean(-1).sum()
    torch.testing.assert_close(cond.aux_losses["identity_loss"], 2.0 * mse)
    cond.aux_losses["identity_loss"].backward()
    assert enc.to_context.weight.grad.abs().sum() > 0


def test_pair_layouts_by_hand():
    """sequence: input cells then output cells, colour + row + column + channel; overlay: one token
    per cell, input colour + output colour + row + column, masked where both grids are PAD."""
    from encoders.base import PairEmbedding
    from trm.data.demos import cell_triples

    torch.manual_seed(0)
    inputs = torch.tensor([[3, 4, 0, 0]])  # 2x2 canvas: a 1x2 input
    outputs = torch.tensor([[5, 0, 6, 0]])  # an output cell below the input: one grid's PAD only
    seq = PairEmbedding(12, 2, 8, "sequence")
    x, mask = seq(cell_triples(inputs, outputs, "sequence"))
    assert x.shape == (1, 8, 8) and mask.tolist() == [[True, True, False, False, True, False, True, False]]
    torch.testing.assert_close(x[0, 1], seq.colour.weight[4] + seq.row[0] + seq.col[1] + seq.channel[0])
    torch.testing.assert_close(x[0, 6], seq.colour.weight[6] + seq.row[1] + seq.col[0] + seq.channel[1])
    over = PairEmbedding(12, 2, 8, "overlay")
    x, mask = over(cell_triples(inputs, outputs, "overlay"))
    assert x.shape == (1, 4, 8) and mask.tolist() == [[True, True, True, False]]
    torch.testing.assert_close(x[0, 0], over.colour.weight[3] + over.output_colour.weight[5] + over.row[0] + over.col[0])
    torch.testing.assert_close(x[0, 2], over.colour.weight[0] + over.output_colour.weight[6] + over.row[1] + over.col[0])


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_context_tokens_have_the_configured_rms(encoder):
    model = make_model(make_cfg(encoder, "mean", encoder_context_scale=3.0)).eval()
    with torch.no_grad():
        context = model.conditioner(make_batch()).context
    torch.testing.assert_close(context.square().mean(-1).sqrt(), torch.full(context.shape[:2], 3.0), rtol=1e-4, atol=1e-4)


def demo_pool(seed=0, rows=7, size=4):
    """A pool of ``rows`` pairs on a size x size canvas, grids of every extent from 1x1 to full
    (with their EOS frame), so that packing fills several length buckets."""
    from trm.data.grids import encode_grid

    g = torch.Generator().manual_seed(seed)
    pool = {"inputs": [], "labels": []}
    for r in range(rows):
        for key, (h, w) in (("inputs", (1 + r % size, 1 + (r * 3) % size)), ("labels", (1 + (r * 2) % size, 1 + r % 2))):
            cells = torch.randint(0, 10, (h, w), generator=g).numpy().astype("uint8")
            pool[key].append(encode_grid(cells, size))
    return torch.tensor(np.stack(pool["inputs"])).numpy(), torch.tensor(np.stack(pool["labels"])).numpy()


# Rows of the pool per demonstration slot: shared rows across examples, empty slots, an example
# without any demonstration.
ROWS = np.array([[0, 1, 2, -1, -1], [2, 1, -1, -1, -1], [-1, -1, -1, -1, -1], [3, 4, 5, 6, 0]])


def test_packing_by_hand():
    """Each distinct row once, its filled cells in canvas order (input then output), in the first
    bucket that holds it; the index points every slot at its row, empty slots at the zero row U."""
    from trm.data.demos import pack_demos

    inputs, labels = demo_pool()
    packed = pack_demos(inputs, labels, ROWS, "sequence", buckets=(8, 16))
    assert packed.num_pairs == 7
    lengths = (inputs != 0).sum(1) + (labels != 0).sum(1)
    pool_rows = []  # the pool row of each block row, read back from its cells
    for block in packed.blocks:
        width = block.shape[1]
        for cells in block.numpy():
            filled = cells[:, 0] != 0
            n = int(filled.sum())
            assert filled[:n].all() and not filled[n:].any() and not cells[n:].any()  # cells first, zeros after
            row = next(r for r in range(7) if lengths[r] == n and (inputs[r, cells[:n][cells[:n, 1] == 0, 2]] == cells[:n][cells[:n, 1] == 0, 0]).all()
                       and (labels[r, cells[:n][cells[:n, 1] == 1, 2]] == cells[:n][cells[:n, 1] == 1, 0]).all())  # fmt: skip
            expected = np.concatenate([np.flatnonzero(inputs[row]), np.flatnonzero(labels[row])])
            assert cells[:n, 2].tolist() == expected.tolist()
            assert width == min(b for b in (8, 16, 32) if b >= n)  # the first bucket that holds it
            pool_rows.append(row)
    assert sorted(pool_rows) == list(range(7))
    index = packed.index.numpy()
    assert (index[ROWS < 0] == 7).all() and packed.mask.numpy().tolist() == (ROWS >= 0).tolist()
    assert [[pool_rows[i] for i in r[m]] for r, m in zip(index, ROWS >= 0)] == [list(r[r >= 0]) for r in ROWS]


@pytest.mark.parametrize("encoder,pooling,layout", CASES)
def test_packed_demonstrations_give_the_padded_vectors_and_gradients(encoder, pooling, layout):
    """The same batch on the canvas and packed (several buckets, shared and empty slots): equal
    contexts, auxiliary losses and gradients of every encoder weight, in training mode. In float64,
    where only the order of sums differs: in float32 rounding alone differs by up to ~1 % of the
    smallest gradients here, enough to hide a real difference."""
    from trm.data.demos import pack_demos

    inputs, labels = demo_pool()
    batch = make_batch()
    padded = {**batch, "demo_inputs": torch.tensor(np.where(ROWS[..., None] >= 0, inputs[ROWS], 0)).int(),
              "demo_labels": torch.tensor(np.where(ROWS[..., None] >= 0, labels[ROWS], 0)).int(),
              "demo_mask": torch.tensor(ROWS >= 0)}  # fmt: skip
    packed = {**batch, "demos": pack_demos(inputs, labels, ROWS, layout, buckets=(8, 16))}
    assert len(packed["demos"].blocks) >= 2
    model = make_model(make_cfg(encoder, pooling, encoder_pair_layout=layout, kl_weight=0.1)).double()
    results = []
    for b in (padded, packed):
        torch.manual_seed(1)  # the variational encoder's noise
        cond = model.conditioner(b)
        (cond.context.square().sum() + sum(cond.aux_losses.values())).backward()
        grads = {n: p.grad.clone() for n, p in model.conditioner.named_parameters() if p.grad is not None}
        model.zero_grad()
        results.append((cond.context.detach(), {k: v.detach() for k, v in cond.aux_losses.items()}, grads))
    (c1, a1, g1), (c2, a2, g2) = results
    torch.testing.assert_close(c2, c1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a2, a1, rtol=1e-10, atol=1e-10)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-7, atol=1e-10, msg=lambda m: f"{name}: {m}")
