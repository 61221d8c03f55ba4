"""Conditioners that read every cell of the demonstrations, with no pooling to one vector per pair.

Each demonstration pair's cells become tokens (``arch.encoder_pair_layout``: :class:`PairEmbedding`),
optionally contextualised by a per-pair transformer (``arch.encoder_num_layers``, default 1; cells
attend within their own pair; with ``arch.relative_2d`` they see each other's offset (dy, dx), as the
core's cells do), plus a learned embedding of the pair's slot, so that cells of one pair
are known as one pair's. Then:

- ``in_context``: every cell token is a context token of the core, beside the query grid: the core's
  attention reads the demonstrations themselves. A cell at canvas position p sits at the core's
  rotary position ``puzzle_emb_len + p``, the position of the query's own cell p, so that "the same
  cell" and "the cell two to the left" are the same relative offsets within a demonstration as in
  the query. A learned summary token comes first (the core reads halting at position 0). The
  context has 1 + (the example's cells) tokens: its length follows the batch's demonstrations.
  Cost: the core's attention grows with (context + grid)^2: at 30x30, 10 demonstrations in the
  sequence layout are up to 18,000 context tokens (overlay: 9,000); ``arch.num_demos`` bounds it
  (at most num_demos x 2 x 900, or x 900 with the overlay layout), and ``token_set`` is the bounded
  form.
- ``token_set``: ``arch.token_set_queries`` learned queries cross-attend to every cell token of the task
  (``arch.token_set_layers`` layers of cross-attention and an MLP) and become as many context
  tokens (all at rotary position 0: a set, told apart by content): a fixed-length context whatever
  the demonstrations, at a cost linear in their cells.

Demonstrations arrive packed with each example's cells in a row (``<layout>:cells``,
:mod:`trm.data.demos`; the default) or on the canvas (``arch.encoder_packing=false``, the reference
the packed path is tested against): the same tokens, positions and slots, so the same context up
to the order of its tokens, which neither the core's attention (positions travel with the tokens)
nor the queries' sees. Empty slots and padding cells are masked everywhere and change nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.base import PairEmbedding
from encoders.config import EncoderArchConfig
from encoders.colours import ColourMap
from encoders.objectives import add_contrastive, latent_steps_of
from encoders.offsets import OffsetPrior, pair_canvases
from trm.data.demos import PackedDemos, cell_triples
from trm.data.grids import PAD_ID
from trm.model.conditioning import Conditioner, Conditioning, register_conditioner
from trm.model.layers import Block, SwiGLU, block_flops, cell_offsets, linear, rms_norm, swiglu_width, trunc_normal_


def any_key(mask: torch.Tensor) -> torch.Tensor:
    """A key mask under which every row has a key: a row with none attends to all (zero) tokens,
    finite, its output then unused or masked."""
    return mask | ~mask.any(dim=-1, keepdim=True)


class CellConditioner(Conditioner):
    """What ``in_context`` and ``token_set`` share: each example's demonstration cells as tokens
    (B, C, d) with their mask, canvas positions and slots; subclasses turn them into a context
    (:meth:`context_of_cells`)."""

    arch_schema = EncoderArchConfig

    def __init__(self, arch: EncoderArchConfig, metadata: dict):
        super().__init__()
        self.arch = arch
        self.latent_steps = latent_steps_of(arch)
        layout = arch.encoder_pair_layout
        packed = arch.encoder_packing and self.latent_steps is None
        self.demos = f"{layout}:cells" if packed else "padded"
        d = arch.encoder_hidden_size or arch.hidden_size
        self.dim, self.heads = d, arch.encoder_num_heads or arch.num_heads
        self.embed = PairEmbedding(metadata["vocab_size"], metadata["grid_size"], d, layout)
        self.side = metadata["grid_size"]
        offsets = (2 * self.side - 1) ** 2 + 1 if arch.relative_2d else None  # as the core's: cells see their (dy, dx)
        self.blocks = nn.ModuleList(
            Block(d, self.heads, arch.expansion, post_norm=False, eps=arch.rms_norm_eps, offsets=offsets)
            for _ in range(1 if arch.encoder_num_layers is None else arch.encoder_num_layers)
        )
        self.slot = nn.Parameter(trunc_normal_(torch.empty(metadata["max_demos"], d), 0.5))
        self.offset_prior = None
        if arch.offset_prior:
            self.offset_prior = OffsetPrior(metadata["vocab_size"], self.side, arch.offset_prior_channels, arch.num_heads,
                                            arch.offset_prior_heads)  # fmt: skip
        self.colour_map = None
        if arch.colour_map:
            self.colour_map = ColourMap(metadata["vocab_size"], arch.hidden_size, arch.colour_map_logits)

    @property
    def reads_canvases(self) -> bool:
        """Whether a prior reads each pair's two canvases (the offset prior, the colour map)."""
        return self.offset_prior is not None or self.colour_map is not None

    @classmethod
    def build(cls, arch: EncoderArchConfig, metadata: dict) -> CellConditioner:
        conditioner = cls(arch, metadata)
        if arch.freeze_encoder:
            conditioner.requires_grad_(False)
        return conditioner

    # Cells as tokens ----------------------------------------------------------------------------

    def encode_pairs(self, triples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, 3) cell triples of N pairs -> their tokens (N, T, d), after the per-pair
        transformer, and the cell mask (N, T)."""
        x, cells = self.embed(triples)
        keys = any_key(cells)
        offsets = cell_offsets(triples[..., 2], self.side) if self.arch.relative_2d else None
        for block in self.blocks:
            x = block(x, key_mask=keys, offsets=offsets)
        return rms_norm(x, self.arch.rms_norm_eps), cells

    def compile_parts(self) -> None:
        """torch.compile the per-pair transformer, with dynamic shapes (the packed blocks change)."""
        self.encode_pairs = torch.compile(self.encode_pairs, dynamic=True)

    def cells_packed(self, demos: PackedDemos) -> tuple[torch.Tensor, ...]:
        """Tokens (B, C, d), mask (B, C), canvas positions (B, C) and slots (B, C) of each example's
        cells from packed demonstrations: each distinct pair encoded once, gathered per example."""
        encoded = [self.encode_pairs(block)[0] for block in demos.blocks]
        dtype = encoded[0].dtype if encoded else torch.float32
        pool = torch.cat([e.flatten(0, 1) for e in encoded] + [torch.zeros(1, self.dim, dtype=dtype, device=demos.index.device)])
        cells = torch.cat([b[..., 2].flatten() for b in demos.blocks] + [demos.index.new_zeros(1)])
        return pool[demos.cell_index], demos.cell_slot >= 0, cells[demos.cell_index], demos.cell_slot

    def encode_dense(self, demo_inputs: torch.Tensor, demo_labels: torch.Tensor) -> torch.Tensor:
        """(..., D, L) canvases -> each pair's cell tokens (..., D, T, d + 1), channel d 1 where the
        cell holds something (T = L, or 2L in the sequence layout, in canvas order); with the offset
        prior or the colour map two more channels hold, at t < L, the input's and the output's
        token at cell t (what :meth:`context_of_pairs` reads them from; constant under latent
        steps). No selection: shapes fixed by the input, no host-device synchronisation (``vmap``)."""
        lead = demo_inputs.shape[:-1]
        inputs, labels = demo_inputs.flatten(0, -2).long(), demo_labels.flatten(0, -2).long()
        tokens, cells = self.encode_pairs(cell_triples(inputs, labels, self.arch.encoder_pair_layout))
        parts = [tokens * cells[..., None], cells[..., None].to(tokens.dtype)]
        if self.reads_canvases:
            canvases = torch.stack((inputs, labels), dim=-1).to(tokens.dtype)  # (N, L, 2)
            parts.append(F.pad(canvases, (0, 0, 0, tokens.shape[1] - canvases.shape[1])))
        pairs = torch.cat(parts, dim=-1)
        return pairs.view(*lead, *pairs.shape[-2:])

    def cells_of_pairs(self, pairs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Tokens, mask, positions and slots (B, D * T, ...) from :meth:`encode_dense`'s ``pairs``
        (B, D, T, d + 1 [+ 2]) where ``mask`` (B, D)."""
        B, D, T, _ = pairs.shape
        L = T if self.arch.encoder_pair_layout == "overlay" else T // 2
        cells = (pairs[..., self.dim] > 0.5) & mask[..., None]
        positions = (torch.arange(T, device=pairs.device) % L).expand(B, D, T)
        slots = torch.arange(D, device=pairs.device)[:, None].expand(B, D, T)
        return pairs[..., : self.dim].flatten(1, 2), cells.flatten(1, 2), positions.flatten(1, 2), slots.flatten(1, 2)

    # Context -------------------------------------------------------------------------------------

    def context_of_cells(self, tokens, mask, positions, slots) -> Conditioning:
        """tokens (B, C, d); mask (B, C) bool; positions (B, C) canvas cells; slots (B, C)."""
        raise NotImplementedError

    def _selected(self, mask: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The cell mask restricted to the demonstration slots ``keep`` (B, D)."""
        return mask & keep.gather(1, slots.clamp_min(0))

    def select_demos(self, demo_mask: torch.Tensor) -> torch.Tensor:
        """The first ``num_demos`` present demonstrations of each example."""
        if self.arch.num_demos is None:
            return demo_mask
        return demo_mask & (demo_mask.cumsum(dim=1) <= self.arch.num_demos)

    def context_of_pairs(self, pairs: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        keep = self.select_demos(mask)
        tokens, cells, positions, slots = self.cells_of_pairs(pairs, keep)
        out = self.context_of_cells(tokens, cells, positions, slots)
        if self.reads_canvases:
            canvases = pairs[:, :, : self.side * self.side, self.dim + 1 :].detach().round().long()  # (B, D, L, 2)
            self.add_priors(out, lambda statistic: statistic(canvases[..., 0], canvases[..., 1]), keep)
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> Conditioning:
        if "demos" in batch:
            demo_mask = batch["demos"].mask
            tokens, cells, positions, slots = self.cells_packed(batch["demos"])
        else:
            demo_mask = batch["demo_mask"]
            pairs = self.encode_dense(batch["demo_inputs"], batch["demo_labels"])
            tokens, cells, positions, slots = self.cells_of_pairs(pairs, demo_mask)
        keep = self.select_demos(demo_mask)
        out = self.context_of_cells(tokens, self._selected(cells, slots, keep), positions, slots)
        self.add_priors(out, lambda statistic: self.per_slot(batch, statistic), keep)
        if self.latent_steps is not None:
            out.latent = pairs
        if self.training and self.arch.contrastive_weight > 0:
            add_contrastive(out, lambda m: self.context_of_cells(tokens, self._selected(cells, slots, m), positions, slots),
                            self.summary, keep, batch["task_ids"], self.arch)  # fmt: skip
        return out

    def add_priors(self, out: Conditioning, per_slot, keep: torch.Tensor) -> None:
        """Set ``out``'s offset bias, input embedding and output bias from the demonstration slots ``keep``
        (B, D); ``per_slot(statistic)`` gives a pair statistic of canvases for every slot (B, D, ...)."""
        if self.offset_prior is not None:
            out.offset_bias = self.offset_prior.bias(per_slot(self.offset_prior.correlate), keep)
        if self.colour_map is not None:
            shares = self.colour_map.shares(per_slot(self.colour_map.count), keep)
            out.input_embedding, out.output_bias = self.colour_map.embedding(shares), self.colour_map.logits(shares)
            if self.colour_map.log_logit_weight is not None:  # logged: whether the logit path grew or faded
                weight = self.colour_map.log_logit_weight.detach().exp()
                out.metrics["train/colour_logit_weight"] = (weight, torch.ones_like(weight))

    def per_slot(self, batch: dict[str, torch.Tensor], statistic) -> torch.Tensor:
        """(B, D, ...): ``statistic`` (input and output canvases (..., L) -> (..., ...)) of each
        demonstration slot, that of a pair without cells where a slot is empty; packed, each
        distinct pair once."""
        if "demos" not in batch:
            return statistic(batch["demo_inputs"], batch["demo_labels"])
        demos = batch["demos"]
        pool = [statistic(*pair_canvases(block, self.arch.encoder_pair_layout, self.side)) for block in demos.blocks]
        nothing = torch.full((1, self.side * self.side), PAD_ID, device=demos.index.device)
        return torch.cat([*pool, statistic(nothing, nothing)])[demos.index]  # the last row: an empty slot's

    def summary(self, conditioning: Conditioning) -> torch.Tensor:
        """One vector per example of its context (the contrastive objective compares them)."""
        return conditioning.context.flatten(1)


@register_conditioner("in_context")
class InContext(CellConditioner):
    """Every demonstration cell a context token, at the rotary position of the query's same cell."""

    def __init__(self, arch: EncoderArchConfig, metadata: dict):
        super().__init__(arch, metadata)
        self.to_hidden = linear(self.dim, arch.hidden_size)
        self.summary_token = nn.Parameter(trunc_normal_(torch.empty(arch.hidden_size), 1.0))

    def context_of_cells(self, tokens, mask, positions, slots) -> Conditioning:
        B = tokens.shape[0]
        x = self.to_hidden(tokens + self.slot[slots.clamp_min(0)].to(tokens.dtype))
        x = self.arch.encoder_context_scale * rms_norm(x) * mask[..., None]
        first = (self.arch.encoder_context_scale * rms_norm(self.summary_token)).to(x.dtype).expand(B, 1, -1)
        return Conditioning(
            torch.cat((first, x), dim=1),
            mask=torch.cat((mask.new_ones(B, 1), mask), dim=1),
            positions=torch.cat((positions.new_zeros(B, 1), self.arch.puzzle_emb_len + positions), dim=1),
        )

    def summary(self, conditioning: Conditioning) -> torch.Tensor:
        """The mean of its cell tokens (the summary token is the same for every task)."""
        m = conditioning.mask[:, 1:, None].to(conditioning.context.dtype)
        return (conditioning.context[:, 1:] * m).sum(1) / m.sum(1).clamp_min(1)

    def forward_flops(self, batch: dict[str, torch.Tensor]) -> float:
        return _pair_transformer_flops(self, batch) + 2 * batch_cells(batch) * self.dim * self.arch.hidden_size


@register_conditioner("token_set")
class TokenSet(CellConditioner):
    """``token_set_queries`` learned queries cross-attend to every cell token of the task."""

    def __init__(self, arch: EncoderArchConfig, metadata: dict):
        super().__init__(arch, metadata)
        d, K = self.dim, arch.token_set_queries
        self.queries = nn.Parameter(trunc_normal_(torch.empty(K, d), 1.0))
        self.q = nn.ModuleList(linear(d, d) for _ in range(arch.token_set_layers))
        self.kv = nn.ModuleList(linear(d, 2 * d) for _ in range(arch.token_set_layers))
        self.out = nn.ModuleList(linear(d, d) for _ in range(arch.token_set_layers))
        self.mlp = nn.ModuleList(SwiGLU(d, arch.expansion) for _ in range(arch.token_set_layers))
        self.to_hidden = linear(d, arch.hidden_size)

    def context_of_cells(self, tokens, mask, positions, slots) -> Conditioning:
        B, C, d = tokens.shape
        h = self.heads
        cells = (tokens + self.slot[slots.clamp_min(0)].to(tokens.dtype)) * mask[..., None]  # padding: zero
        keys = any_key(mask)[:, None, None, :]
        x = self.queries.to(tokens.dtype).expand(B, -1, -1)
        for q, kv, out, mlp in zip(self.q, self.kv, self.out, self.mlp):
            query = q(rms_norm(x)).view(B, -1, h, d // h).transpose(1, 2)
            k, v = kv(rms_norm(cells)).view(B, C, 2, h, d // h).permute(2, 0, 3, 1, 4)
            x = x + out(F.scaled_dot_product_attention(query, k, v, attn_mask=keys).transpose(1, 2).reshape(B, -1, d))
            x = x + mlp(rms_norm(x))
        # All at rotary position 0: the core tells them apart by content (they are a set), and any
        # number of them fits the core's table.
        return Conditioning(self.arch.encoder_context_scale * rms_norm(self.to_hidden(x)),
                            positions=torch.zeros(B, x.shape[1], dtype=torch.long, device=x.device))

    def forward_flops(self, batch: dict[str, torch.Tensor]) -> float:
        """Per layer: the queries' and output projections, the cells' keys and values, scores and
        values over every cell of the example, the MLP; then the map to the core's width."""
        K, d, H = self.arch.token_set_queries, self.dim, self.arch.hidden_size
        B, cells = batch["inputs"].shape[0], batch_cells(batch)
        inner = swiglu_width(d, self.arch.expansion)
        per_layer = 2 * 2 * B * K * d * d + 2 * cells * 2 * d * d + 4 * K * cells * d + 2 * B * K * 3 * d * inner
        return _pair_transformer_flops(self, batch) + self.arch.token_set_layers * per_layer + 2 * B * K * d * H


def batch_cells(batch: dict[str, torch.Tensor]) -> int:
    """Cell tokens of the batch's examples, padding included (what the device runs): packed, the
    rows of cell_index; on the canvas, every cell of every slot (x 2 in the sequence layout is left
    to the caller's count of tokens per pair; here cells)."""
    if "demos" in batch:
        return int(batch["demos"].cell_index.numel())
    return int(batch["demo_inputs"].numel())


def _pair_transformer_flops(conditioner: CellConditioner, batch: dict[str, torch.Tensor]) -> float:
    """The per-pair transformer's matrix products, as :meth:`DemoEncoder.forward_flops` counts them, and the
    offset prior's correlations and the colour map's counts."""
    layers = len(conditioner.blocks)
    if "demos" in batch:
        shapes = [tuple(b.shape[:2]) for b in batch["demos"].blocks]
    else:
        tokens = batch["demo_inputs"].shape[-1] * (1 if conditioner.arch.encoder_pair_layout == "overlay" else 2)
        shapes = [(batch["demo_inputs"].shape[0] * batch["demo_inputs"].shape[1], tokens)]
    flops = sum(block_flops(n, t, conditioner.dim, conditioner.arch.expansion, layers) for n, t in shapes)
    if conditioner.offset_prior is not None:
        flops += conditioner.offset_prior.flops(sum(n for n, _ in shapes))
    if conditioner.colour_map is not None:
        flops += conditioner.colour_map.flops(sum(n for n, _ in shapes), conditioner.side**2)
    return flops
