"""The Tiny Recursive Model: the recursive core and its adaptive computation time (ACT) wrapper."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from trm.model.config import ArchConfig
from trm.model.conditioning import Conditioner, Conditioning, LatentSteps
from trm.model.layers import IGNORE_INDEX, Block, Rotary, cell_offsets, linear, stablemax_cross_entropy, trunc_normal_


def rows_of(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, vocab, n) per-example table, (B, L) tokens -> (B, L, n): each token's row of its example's table."""
    return torch.gather(table, 1, tokens.long()[..., None].expand(-1, -1, table.shape[-1]))


class RecursiveCore(nn.Module):
    """One shared stack of ``L_layers`` post-norm blocks applied recursively.

    Per supervision step: ``H_cycles - 1`` cycles without gradient, then one with gradient, where a
    cycle is ``L_cycles`` updates z_L = net(z_L + z_H + x) followed by z_H = net(z_H + z_L).
    """

    def __init__(self, arch: ArchConfig, vocab_size: int, seq_len: int):
        super().__init__()
        self.arch = arch
        H, P = arch.hidden_size, arch.puzzle_emb_len
        self.embed_scale = math.sqrt(H)
        self.embed_tokens = nn.Embedding(vocab_size, H)
        trunc_normal_(self.embed_tokens.weight, 1.0 / self.embed_scale)
        self.side = math.isqrt(seq_len)
        grid = (P, self.side) if arch.rope_2d else None
        offsets = (2 * self.side - 1) ** 2 + 1 if arch.relative_2d else None  # every (dy, dx), and "no cell"
        self.rotary = None if arch.mlp_t or arch.relative_2d else Rotary(H // arch.num_heads, P + seq_len, arch.rope_theta, grid)
        self.blocks = nn.ModuleList(
            Block(H, arch.num_heads, arch.expansion, post_norm=True, eps=arch.rms_norm_eps,
                  seq_mlp_len=(P + seq_len) if arch.mlp_t else None, offsets=offsets)
            for _ in range(arch.L_layers)
        )  # fmt: skip
        self.lm_head = linear(H, vocab_size)
        self.q_head = linear(H, 2, bias=True)  # logits (halt, continue), read at position 0
        nn.init.zeros_(self.q_head.weight)
        nn.init.constant_(self.q_head.bias, -5.0)
        self.register_buffer("H_init", trunc_normal_(torch.empty(H), 1.0))
        self.register_buffer("L_init", trunc_normal_(torch.empty(H), 1.0))

    def net(self, z: torch.Tensor, injection: torch.Tensor, rope=None, key_mask: torch.Tensor | None = None,
            offsets: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        z = z + injection
        for block in self.blocks:
            z = block(z, rope, key_mask, offsets)
        return z

    def forward(self, z_H: torch.Tensor, z_L: torch.Tensor, inputs: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, context_positions: torch.Tensor | None = None,
                offset_bias: torch.Tensor | None = None, input_embedding: torch.Tensor | None = None,
                output_bias: torch.Tensor | None = None):  # fmt: skip
        """z_H, z_L: (B, P + L, hidden); inputs: (B, L) tokens; context: (B, P, hidden), any P;
        context_mask: (B, P) bool, False for padding (never attended); context_positions: (B, P)
        rotary positions of the context (the grid then at puzzle_emb_len + i; default: the whole
        sequence at 0..P+L-1, as published); offset_bias: (B, heads, (2 side - 1)^2), added to
        every head's score from grid cell i to grid cell j by their offset (dy, dx); input_embedding:
        (B, vocab, hidden), row t added to the embedding of each input token t; output_bias: (B,
        vocab, vocab), row t added to the logits of each grid cell whose input token is t.

        Returns new (z_H, z_L), logits (B, L, vocab) and q_logits (B, 2) float32.
        """
        P = context.shape[1]
        tokens = self.embed_scale * self.embed_tokens(inputs)
        if input_embedding is not None:
            tokens = tokens + rows_of(input_embedding.to(tokens.dtype), inputs)
        x = torch.cat((context.to(tokens.dtype), tokens), dim=1)
        rope, key_mask, offsets = self.positions(inputs, P, context_mask, context_positions, offset_bias)
        with torch.no_grad():
            for _ in range(self.arch.H_cycles - 1):
                for _ in range(self.arch.L_cycles):
                    z_L = self.net(z_L, z_H + x, rope, key_mask, offsets)
                z_H = self.net(z_H, z_L, rope, key_mask, offsets)
        for _ in range(self.arch.L_cycles):
            z_L = self.net(z_L, z_H + x, rope, key_mask, offsets)
        z_H = self.net(z_H, z_L, rope, key_mask, offsets)
        logits = self.lm_head(z_H[:, P:])
        if output_bias is not None:
            logits = logits + rows_of(output_bias.to(logits.dtype), inputs)
        q_logits = self.q_head(z_H[:, 0]).float()
        return z_H, z_L, logits, q_logits

    def positions(self, inputs: torch.Tensor, P: int, context_mask: torch.Tensor | None,
                  context_positions: torch.Tensor | None, offset_bias: torch.Tensor | None = None):  # fmt: skip
        """What the blocks' attention needs of the sequence [context (P), grid (L)]: rotary (cos,
        sin), the key mask (B, P + L) and, with relative_2d, each pair's cell offset (B, T, T); None
        where unused. The grid's cell i sits at position puzzle_emb_len + i whenever the context
        has positions of its own; a context token at such a position is that cell's. With an
        ``offset_bias`` the key mask becomes an additive bias (B, heads, T, T): the offset bias
        between grid cells, 0 where a context token is involved, -inf at masked keys."""
        B, L = inputs.shape
        grid = torch.arange(L, device=inputs.device).expand(B, -1)
        rope = key_mask = offsets = None
        if self.rotary is not None:
            positions = None if context_positions is None else torch.cat((context_positions, grid + self.arch.puzzle_emb_len), 1)
            rope = self.rotary.tables(P + L, positions)
        if self.arch.relative_2d:
            context_cells = torch.full((B, P), -1, device=inputs.device) if context_positions is None else \
                torch.where(context_positions >= self.arch.puzzle_emb_len, context_positions - self.arch.puzzle_emb_len, -1)  # fmt: skip
            offsets = cell_offsets(torch.cat((context_cells, grid), dim=1), self.side)
        if context_mask is not None:
            key_mask = torch.cat((context_mask, context_mask.new_ones(B, L)), dim=1)
        if offset_bias is not None:
            # Built once, in the dtype attention computes in: (B, heads, T, T) is the largest
            # tensor of the step, and each block would otherwise cast a copy of its own.
            device = inputs.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else offset_bias.dtype
            between_cells = offset_bias.to(dtype)[:, :, cell_offsets(grid[:1], self.side)[0]]  # (B, heads, L, L)
            bias = F.pad(between_cells, (P, 0, P, 0))
            key_mask = bias if key_mask is None else bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return rope, key_mask, offsets


@dataclass
class Carry:
    """State that persists across training steps, one slot per batch row."""

    z_H: torch.Tensor  # (B, P + L, hidden), detached
    z_L: torch.Tensor  # (B, P + L, hidden), detached
    steps: torch.Tensor  # (B,) int32 supervision steps taken by the slot's current example
    halted: torch.Tensor  # (B,) bool: the slot takes a new example at the next step
    data: dict[str, torch.Tensor]  # the slot's current example (batch tensors)

    def state_dict(self) -> dict:
        return {"z_H": self.z_H, "z_L": self.z_L, "steps": self.steps, "halted": self.halted, "data": self.data}


@dataclass
class StepOutput:
    logits: torch.Tensor  # (B, L, vocab)
    q_halt: torch.Tensor  # (B,) float32
    q_continue: torch.Tensor  # (B,) float32
    conditioning: Conditioning
    target_q_continue: torch.Tensor | None = None  # (B,), only with no_ACT_continue=false


def leave_one_out(mask: torch.Tensor) -> torch.Tensor:
    """(..., D) demonstrations present -> (..., D, D): view j holds the present pairs other than j."""
    D = mask.shape[-1]
    return mask.unsqueeze(-2) & ~torch.eye(D, dtype=torch.bool, device=mask.device)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (a.ndim - 1))), a, b)


class TinyRecursiveModel(nn.Module):
    """The core with ACT: one call is one supervision step for every slot of the batch.

    Halted slots are reset to (H_init, L_init) and take the new batch's example; the others keep
    their example and state. A slot halts at ``halt_max_steps`` or, in training, when q_halt > 0
    (or > q_continue); with probability ``halt_exploration_prob`` it first draws a minimum number of
    steps from U[2, halt_max_steps]. In evaluation every example runs all ``halt_max_steps``.
    """

    def __init__(self, arch: ArchConfig, conditioner: Conditioner, vocab_size: int, seq_len: int, pad_id: int = 0):
        super().__init__()
        self.arch = arch
        self.core = RecursiveCore(arch, vocab_size, seq_len)
        self.conditioner = conditioner
        self.pad_id = pad_id  # the dataset's empty cell: a demonstration's label there is left out of a loss

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> Carry:
        B, L = batch["inputs"].shape
        z = torch.zeros(B, self.arch.puzzle_emb_len + L, self.arch.hidden_size, device=batch["inputs"].device,
                        dtype=self.core.H_init.dtype)  # float32, or the weights' dtype where they are cast
        steps = torch.zeros(B, dtype=torch.int32, device=z.device)
        halted = torch.ones(B, dtype=torch.bool, device=z.device)
        data = {k: torch.zeros_like(v) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return Carry(z, z.clone(), steps, halted, data)

    def restarted(self, carry: Carry, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The recursion state (z_H, z_L, steps) with the slots of ``mask`` ((B,) or 0-dim bool)
        back at the initial state and step 0."""
        return (_where(mask, self.core.H_init.expand_as(carry.z_H), carry.z_H),
                _where(mask, self.core.L_init.expand_as(carry.z_L), carry.z_L), torch.where(mask, 0, carry.steps))  # fmt: skip

    @staticmethod
    def fitted(z: torch.Tensor, init: torch.Tensor, context_length: int, grid_length: int) -> torch.Tensor:
        """A recursion state (B, P_old + L, hidden) for a context of ``context_length`` positions:
        context positions past it dropped, or new ones added at ``init`` (hidden,). A slot's own
        context tokens come first, so a slot that keeps its example keeps its state: only padding
        comes and goes when the batch's context length changes."""
        old = z.shape[1] - grid_length
        if old == context_length:
            return z
        if old > context_length:
            return torch.cat((z[:, :context_length], z[:, old:]), dim=1)
        added = init.to(z.dtype).expand(z.shape[0], context_length - old, -1)
        return torch.cat((z[:, :old], added, z[:, old:]), dim=1)

    def condition(self, batch: dict[str, torch.Tensor]) -> Conditioning:
        """The context of ``batch``: the conditioner's, after the latent steps it asks for
        (:class:`LatentSteps`, in training and in evaluation alike), whose leave-one-out objective
        needs the demonstrations on the canvas (demo_inputs, demo_labels (B, D, L), demo_mask)."""
        cond = self.conditioner(batch)
        if self.conditioner.latent_steps is None or cond.latent is None:
            return cond
        latent = self.latent_descent(cond.latent, batch, self.conditioner.latent_steps)
        refined = self.conditioner.context_of_pairs(latent, batch["demo_mask"])
        return replace(refined, aux_losses={**refined.aux_losses, **cond.aux_losses},
                       metrics={**refined.metrics, **cond.metrics}, latent=latent)  # fmt: skip

    def latent_descent(self, latent: torch.Tensor, demos: dict[str, torch.Tensor], how: LatentSteps) -> torch.Tensor:
        """``how.steps`` gradient steps of size ``how.lr`` on :meth:`latent_objective` from ``latent``
        (B, D, ...). In training the steps are differentiated through (second order), or with
        ``first_order`` the step is a constant shift (the encoder's gradient flows straight through);
        in evaluation they run with gradients enabled for the latent alone."""
        through = self.training and torch.is_grad_enabled() and latent.requires_grad and not how.first_order
        # Differentiating through a step differentiates attention's backward: the math kernel has
        # one, the fused kernels do not.
        kernel = sdpa_kernel(SDPBackend.MATH) if through else contextlib.nullcontext()
        with torch.enable_grad(), kernel:
            for _ in range(how.steps):
                z = latent if through else latent.detach().requires_grad_(True)
                objective = self.latent_objective(z, demos, how.act_steps).sum()
                (grad,) = torch.autograd.grad(objective, z, create_graph=through)
                latent = latent - how.lr * grad.to(latent.dtype)
        return latent

    def latent_objective(self, latent: torch.Tensor, demos: dict[str, torch.Tensor], act_steps: int) -> torch.Tensor:
        """(B,) mean over each example's present demonstrations j of the loss of y_j given x_j and
        the context of its *other* demonstrations (:meth:`Conditioner.context_of_pairs` of
        ``latent`` (B, D, ...) without j): what the latent must explain without having seen the pair.
        demos: demo_inputs, demo_labels (B, D, L), demo_mask (B, D). Fixed shapes (every slot is
        run, absent ones weighted 0): no host-device synchronisation."""
        mask = demos["demo_mask"]
        B, D = mask.shape
        others = leave_one_out(mask)  # (B, D views, D)
        views = latent.unsqueeze(1).expand(B, D, *latent.shape[1:]).flatten(0, 1)  # (B * D, D, ...)
        cond = self.conditioner.context_of_pairs(views, others.flatten(0, 1))
        losses = self.pair_losses(demos["demo_inputs"].flatten(0, 1), demos["demo_labels"].flatten(0, 1), cond, act_steps)
        weight = mask.to(losses.dtype)
        return (losses.view(B, D) * weight).sum(1) / weight.sum(1).clamp_min(1)

    def pair_losses(self, inputs: torch.Tensor, labels: torch.Tensor, conditioning: Conditioning,
                    act_steps: int) -> torch.Tensor:  # fmt: skip
        """(N,) mean per-token stablemax loss of each pair's output ``labels`` (N, L) (empty cells
        left out) given its input ``inputs`` (N, L) and ``conditioning`` (N rows), the model run for
        ``act_steps`` ACT steps from the initial state, differentiable through the last. A pair
        without labelled cells gets 0."""
        labels = labels.long().masked_fill(labels == self.pad_id, IGNORE_INDEX)
        pairs = {"inputs": inputs, "labels": labels}
        carry = self.initial_carry(pairs)
        with torch.no_grad():
            for _ in range(act_steps - 1):
                carry, _ = self(carry, pairs, conditioning)
        carry, out = self(carry, pairs, conditioning)
        per_token = stablemax_cross_entropy(out.logits, labels)  # (N, L) float64
        return per_token.sum(-1) / (labels != IGNORE_INDEX).sum(-1).clamp_min(1)

    def forward(self, carry: Carry, batch: dict[str, torch.Tensor], conditioning: Conditioning | None = None):
        """Returns (new carry, StepOutput). ``conditioning`` may be passed to reuse a context
        computed once per batch (evaluation); in training it is recomputed with gradient. Entries of
        ``batch`` that are not per-slot tensors (packed demonstrations, built for the slots of this
        step) go to the conditioner as they are."""
        data = {k: _where(carry.halted, batch[k], v) for k, v in carry.data.items()}
        z_H, z_L, steps = self.restarted(carry, carry.halted)
        steps = steps + 1

        cond = conditioning if conditioning is not None else self.condition({**batch, **data})
        P, L = cond.context.shape[1], data["inputs"].shape[1]
        z_H, z_L = self.fitted(z_H, self.core.H_init, P, L), self.fitted(z_L, self.core.L_init, P, L)
        z_H, z_L, logits, q = self.core(z_H, z_L, data["inputs"], *cond.core_inputs())
        q_halt, q_continue = q[:, 0], q[:, 1]

        max_steps = self.arch.halt_max_steps
        target_q_continue = None
        with torch.no_grad():
            halted = steps >= max_steps
            if self.training and max_steps > 1:
                halted |= (q_halt > 0) if self.arch.no_ACT_continue else (q_halt > q_continue)
                explore = torch.rand_like(q_halt) < self.arch.halt_exploration_prob
                min_steps = explore * torch.randint_like(steps, 2, max_steps + 1)
                halted &= steps >= min_steps
                if not self.arch.no_ACT_continue:
                    # Q-learning target for "continue": the halting value one step later.
                    _, _, _, q_next = self.core(z_H, z_L, data["inputs"], *cond.core_inputs())
                    best_next = torch.where(steps >= max_steps, q_next[:, 0], q_next.max(dim=-1).values)
                    target_q_continue = torch.sigmoid(best_next)
        new_carry = Carry(z_H.detach(), z_L.detach(), steps.to(torch.int32), halted, data)
        return new_carry, StepOutput(logits, q_halt, q_continue, cond, target_q_continue)

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor], conditioning: Conditioning | None = None):
        """Evaluation (the model in eval mode): every example runs all ``halt_max_steps``. Returns
        the final predictions (B, L), those of the first step whose q_halt > 0 (where ACT would
        stop; the last step's where none is) and the last step's q_halt (B,)."""
        carry = self.initial_carry(batch)
        halted = torch.zeros(batch["inputs"].shape[0], dtype=torch.bool, device=batch["inputs"].device)
        at_halt = None
        for _ in range(self.arch.halt_max_steps):
            carry, out = self(carry, batch, conditioning)
            preds = out.logits.argmax(-1)
            at_halt = preds if at_halt is None else torch.where(halted[:, None], at_halt, preds)
            halted = halted | (out.q_halt > 0)
        return preds, at_halt, out.q_halt
