"""What every demo encoder shares: embedding of demonstration pairs, a grid transformer run on the
valid pairs only, per-pair pooling, and the final mapping to context tokens.

Demonstrations arrive packed (``batch["demos"]``, :class:`trm.data.demos.PackedDemos`: each
distinct pair of the batch once, cropped to its cells, in length buckets; the default,
``arch.encoder_packing``) or on the canvas (demo_inputs, demo_labels (B, D, L) tokens with
L = grid_size^2, demo_mask (B, D)). Both become cell triples, so both give the same vectors.
How a pair's cells become tokens is ``arch.encoder_pair_layout`` (:class:`PairEmbedding`), plus a
CLS token with CLS pooling. PAD cells are masked in attention and pooling; absent demonstrations
are never encoded.

A sample without any demonstration (the empty task, which the null-context evaluation uses) gets a
defined, finite context: its demonstration vectors are all zero and masked, so ``standard``'s
queries attend to nothing (their own values stay) and the LPN encoders map the zero mean.
"""

from __future__ import annotations

import torch
from torch import nn

from encoders.config import EncoderArchConfig
from encoders.objectives import add_contrastive, latent_steps_of
from encoders.registry import ENCODERS, POOLINGS
from trm.data.demos import PackedDemos, cell_mask, cell_triples
from trm.data.grids import EOS_ID, PAD_ID
from trm.model.conditioning import Conditioner, Conditioning, ParamGroup, register_conditioner
from trm.model.layers import Block, block_flops, linear, rms_norm, trunc_normal_


class PairEmbedding(nn.Module):
    """A demonstration pair's cells as tokens, in one of two layouts:

    - ``sequence`` (the plan's and LPN's): the input's cells then the output's (2L tokens), each
      colour + row + column + channel (input or output);
    - ``overlay``: one token per canvas cell carrying both grids' colours there (input colour +
      output colour, separate tables) + row + column (L tokens). A cell the task changes is then one
      token whose embedding shows the change (a -> b), instead of two tokens the transformer must
      first pair up by position; half the tokens, too.
    """

    def __init__(self, vocab_size: int, grid_size: int, dim: int, layout: str = "sequence"):
        super().__init__()
        self.grid_size, self.layout = grid_size, layout
        self.colour = nn.Embedding(vocab_size, dim)  # sequence: both grids; overlay: the input's
        self.row = nn.Parameter(torch.empty(grid_size, dim))
        self.col = nn.Parameter(torch.empty(grid_size, dim))
        if layout == "overlay":
            self.output_colour = nn.Embedding(vocab_size, dim)
            extra = self.output_colour.weight
        else:
            self.channel = nn.Parameter(torch.empty(2, dim))
            extra = self.channel
        for w in (self.colour.weight, self.row, self.col, extra):
            trunc_normal_(w, 0.5)  # four terms: unit scale in sum

    def forward(self, triples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T) cell triples (colour, second, position) of :mod:`trm.data.demos` -> tokens
        (N, T, dim) and their mask (N, T), True where a cell holds something."""
        S = self.grid_size
        colour, second, cell = triples.unbind(-1)
        x = self.colour(colour) + self.row[cell // S] + self.col[cell % S]
        x = x + (self.output_colour(second) if self.layout == "overlay" else self.channel[second])
        return x, cell_mask(triples, self.layout)


@register_conditioner("demo_encoder")
class DemoEncoder(Conditioner):
    """The ``demo_encoder`` conditioner: each demonstration pair pooled to one vector, the vectors
    aggregated to the context by the encoder named by ``arch.encoder_type`` (a registered subclass,
    implementing :meth:`aggregate`)."""

    arch_schema = EncoderArchConfig
    default_layers = 2

    @classmethod
    def build(cls, arch: EncoderArchConfig, metadata: dict) -> DemoEncoder:
        encoder = ENCODERS.get_valid(arch.encoder_type)(arch, metadata)
        if arch.freeze_encoder:
            encoder.requires_grad_(False)
        return encoder

    def __init__(self, arch: EncoderArchConfig, metadata: dict):
        super().__init__()
        self.arch = arch
        self.latent_steps = latent_steps_of(arch)
        # Latent steps need the demonstrations on the canvas (their objective runs the core on them).
        self.demos = arch.encoder_pair_layout if arch.encoder_packing and self.latent_steps is None else "padded"
        d = arch.encoder_hidden_size or arch.hidden_size
        heads = arch.encoder_num_heads or arch.num_heads
        self.dim, self.heads = d, heads
        self.embed = PairEmbedding(metadata["vocab_size"], metadata["grid_size"], d, arch.encoder_pair_layout)
        self.pooling = POOLINGS.get_valid(arch.encoder_pooling_method)(d)
        self.blocks = nn.ModuleList(
            Block(d, heads, arch.expansion, post_norm=False, eps=arch.rms_norm_eps)
            for _ in range(arch.encoder_num_layers or self.default_layers)
        )
        self.to_context = linear(d, arch.puzzle_emb_len * arch.hidden_size)
        # Fixed frequencies and phases of the identity diagnostic's per-puzzle codes.
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("code_freq", torch.rand(arch.hidden_size, generator=g) * 1000.0, persistent=False)
        self.register_buffer("code_phase", torch.rand(arch.hidden_size, generator=g) * 6.2832, persistent=False)

    def param_groups(self) -> list[ParamGroup]:
        """Its weights at ``encoder_lr_scale`` x lr, warmed up over ``encoder_lr_warmup_steps`` (none
        when frozen)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroup("encoder_lr", params, self.arch.encoder_lr_scale, self.arch.encoder_lr_warmup_steps)] if params else []

    def encode_cells(self, triples: torch.Tensor) -> torch.Tensor:
        """(N, T, 3) cell triples of N pairs -> (N, d) pair vectors."""
        x, cells = self.embed(triples)
        x, cells = self.pooling.prepend(x, cells)
        for block in self.blocks:
            x = block(x, key_mask=cells)
        return self.pooling(rms_norm(x, self.arch.rms_norm_eps), cells)

    def compile_parts(self) -> None:
        """torch.compile the pair transformer, with dynamic shapes: the packed blocks change their
        number of pairs and length from step to step."""
        self.encode_cells = torch.compile(self.encode_cells, dynamic=True)

    def encode_packed(self, demos: PackedDemos) -> torch.Tensor:
        """One vector per demonstration slot from packed pairs: (B, D, d), zero where the slot is
        empty. Each block of the pool is encoded on its own (no cell attends across pairs)."""
        pool = [self.encode_cells(block) for block in demos.blocks]
        empty = torch.zeros(1, self.dim, dtype=pool[0].dtype if pool else torch.float32, device=demos.index.device)
        return torch.cat([*pool, empty])[demos.index]  # empty slots point at the zero row

    def encode_padded(self, demo_inputs, demo_labels, demo_mask) -> torch.Tensor:
        """The same from (B, D, L) canvases: (B, D, d). Only present pairs are encoded; selecting
        them costs a host-device synchronisation (``nonzero``), which the packed form avoids."""
        B, D, L = demo_inputs.shape
        index = demo_mask.flatten().nonzero().squeeze(-1)
        triples = cell_triples(demo_inputs.flatten(0, 1)[index].long(), demo_labels.flatten(0, 1)[index].long(),
                               self.arch.encoder_pair_layout)  # fmt: skip
        pooled = self.encode_cells(triples)
        out = pooled.new_zeros(B * D, self.dim)
        return out.index_copy(0, index, pooled).view(B, D, self.dim)

    def encode_dense(self, demo_inputs: torch.Tensor, demo_labels: torch.Tensor) -> torch.Tensor:
        """(..., L) canvases of pairs, absent ones (all PAD) included -> (..., d), zero for those.
        No pair is selected: no host-device synchronisation and shapes fixed by the input, so the
        call can run under ``torch.func.vmap`` (per-task weights, :mod:`trm.adapt`). An absent pair
        is given one EOS cell, so that its attention has a key (its vector is then dropped)."""
        lead = demo_inputs.shape[:-1]
        demo_inputs, demo_labels = demo_inputs.flatten(0, -2), demo_labels.flatten(0, -2)  # (N, L)
        present = ((demo_inputs != PAD_ID) | (demo_labels != PAD_ID)).any(-1)  # (N,)
        first_cell = torch.arange(demo_inputs.shape[-1], device=demo_inputs.device) == 0
        inputs = torch.where(first_cell & ~present[:, None], EOS_ID, demo_inputs)
        pooled = self.encode_cells(cell_triples(inputs.long(), demo_labels.long(), self.arch.encoder_pair_layout))
        return torch.where(present[:, None], pooled, 0.0).view(*lead, -1)

    def context_of_pairs(self, pairs: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """The context from pair vectors (B, D, d) where ``mask`` (B, D), the first ``num_demos``;
        the others are zeroed first (an aggregation that falls back to every pair when a sample
        has none, as ``standard``'s, must not see a left-out one)."""
        mask = self.select_demos(mask)
        return self.aggregate(pairs * mask[..., None].to(pairs.dtype), mask)

    def forward_flops(self, batch: dict[str, torch.Tensor]) -> float:
        """The pair transformer's matrix products (:func:`trm.model.layers.block_flops`): packed,
        each block's pairs at the block's length (padding included: what the device runs); padded,
        the present pairs at the full canvas. The aggregation over a few vectors per sample is left
        out (under 0.1 % at full size)."""
        if "demos" in batch:
            shapes = [tuple(b.shape[:2]) for b in batch["demos"].blocks]
        else:
            tokens = batch["demo_inputs"].shape[-1] * (1 if self.arch.encoder_pair_layout == "overlay" else 2)
            shapes = [(int(batch["demo_mask"].sum()), tokens)]
        return sum(block_flops(n, t, self.dim, self.arch.expansion, len(self.blocks)) for n, t in shapes)

    def select_demos(self, demo_mask: torch.Tensor) -> torch.Tensor:
        """Keep the first ``num_demos`` valid demonstrations of each sample."""
        if self.arch.num_demos is None:
            return demo_mask
        return demo_mask & (demo_mask.cumsum(dim=1) <= self.arch.num_demos)

    def context_from(self, vector: torch.Tensor) -> torch.Tensor:
        """(B, d) task vector -> (B, puzzle_emb_len, hidden) context."""
        B = vector.shape[0]
        return self.scaled(self.to_context(vector).view(B, self.arch.puzzle_emb_len, self.arch.hidden_size))

    def scaled(self, context: torch.Tensor) -> torch.Tensor:
        """Context tokens at RMS ``encoder_context_scale`` per position (1: the token embeddings'
        scale; the puzzle embedding's learned vectors grow well past it)."""
        return self.arch.encoder_context_scale * rms_norm(context)

    def aggregate(self, pairs: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """pairs: (B, D, d) demonstration vectors; mask: (B, D) -> context and extras."""
        raise NotImplementedError

    def puzzle_code(self, puzzle_ids: torch.Tensor) -> torch.Tensor:
        """(B,) ids -> (B, hidden) fixed pseudo-random codes of unit RMS: sqrt(2) sin(id f + phase)
        with random frequencies, nearly orthogonal for different ids, no table to store."""
        return 2**0.5 * torch.sin(puzzle_ids[:, None].double() * self.code_freq.double() + self.code_phase.double()).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> Conditioning:
        if self.latent_steps is not None:  # the pairs are the latent: the dense encoding of the canvases
            pairs = self.encode_dense(batch["demo_inputs"], batch["demo_labels"])
            out = self.context_of_pairs(pairs, batch["demo_mask"])
            out.latent, mask = pairs, self.select_demos(batch["demo_mask"])
        else:
            if "demos" in batch:
                demos = batch["demos"]
                mask, pairs = self.select_demos(demos.mask), self.encode_packed(demos)
                if self.arch.num_demos is not None:  # pairs past num_demos were encoded with their pool
                    pairs = pairs * mask[..., None].to(pairs.dtype)
            else:
                mask = self.select_demos(batch["demo_mask"])
                pairs = self.encode_padded(batch["demo_inputs"], batch["demo_labels"], mask)
            out = self.aggregate(pairs, mask)
        if self.training and self.arch.contrastive_weight > 0:
            add_contrastive(out, lambda m: self.context_of_pairs(pairs, m), lambda c: c.context.flatten(1), mask,
                            batch["task_ids"], self.arch)  # fmt: skip
        if self.arch.identity_target_weight > 0:
            # The plan's identity-encoder test: can the encoder pass known embeddings through?
            target = self.arch.encoder_context_scale * self.puzzle_code(batch["puzzle_identifiers"])
            mse = (out.context[:, 0].float() - target).square().mean(-1)  # (B,)
            n = torch.full((), float(mse.shape[0]), device=mse.device)
            out.aux_losses["identity_loss"] = self.arch.identity_target_weight * mse.sum()
            out.metrics["train/identity_mse"] = (mse.sum().detach(), n)
        return out
