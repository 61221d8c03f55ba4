"""The Tiny Recursive Model: the recursive core and its adaptive computation time (ACT) wrapper."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trm.model.config import ArchConfig
from trm.model.conditioning import Conditioner, Conditioning
from trm.model.layers import Block, Rotary, linear, trunc_normal_


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
        self.rotary = None if arch.mlp_t else Rotary(H // arch.num_heads, P + seq_len, arch.rope_theta)
        self.blocks = nn.ModuleList(
            Block(H, arch.num_heads, arch.expansion, post_norm=True, eps=arch.rms_norm_eps,
                  seq_mlp_len=(P + seq_len) if arch.mlp_t else None)
            for _ in range(arch.L_layers)
        )  # fmt: skip
        self.lm_head = linear(H, vocab_size)
        self.q_head = linear(H, 2, bias=True)  # logits (halt, continue), read at position 0
        nn.init.zeros_(self.q_head.weight)
        nn.init.constant_(self.q_head.bias, -5.0)
        self.register_buffer("H_init", trunc_normal_(torch.empty(H), 1.0))
        self.register_buffer("L_init", trunc_normal_(torch.empty(H), 1.0))

    def net(self, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        z = z + injection
        for block in self.blocks:
            z = block(z, self.rotary)
        return z

    def forward(self, z_H: torch.Tensor, z_L: torch.Tensor, inputs: torch.Tensor, context: torch.Tensor):
        """z_H, z_L: (B, P + L, hidden); inputs: (B, L) tokens; context: (B, P, hidden).

        Returns new (z_H, z_L), logits (B, L, vocab) and q_logits (B, 2) float32.
        """
        tokens = self.embed_scale * self.embed_tokens(inputs)
        x = torch.cat((context.to(tokens.dtype), tokens), dim=1)
        with torch.no_grad():
            for _ in range(self.arch.H_cycles - 1):
                for _ in range(self.arch.L_cycles):
                    z_L = self.net(z_L, z_H + x)
                z_H = self.net(z_H, z_L)
        for _ in range(self.arch.L_cycles):
            z_L = self.net(z_L, z_H + x)
        z_H = self.net(z_H, z_L)
        logits = self.lm_head(z_H[:, self.arch.puzzle_emb_len :])
        q_logits = self.q_head(z_H[:, 0]).float()
        return z_H, z_L, logits, q_logits


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


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (a.ndim - 1))), a, b)


class TinyRecursiveModel(nn.Module):
    """The core with ACT: one call is one supervision step for every slot of the batch.

    Halted slots are reset to (H_init, L_init) and take the new batch's example; the others keep
    their example and state. A slot halts at ``halt_max_steps`` or, in training, when q_halt > 0
    (or > q_continue); with probability ``halt_exploration_prob`` it first draws a minimum number of
    steps from U[2, halt_max_steps]. In evaluation every example runs all ``halt_max_steps``.
    """

    def __init__(self, arch: ArchConfig, conditioner: Conditioner, vocab_size: int, seq_len: int):
        super().__init__()
        self.arch = arch
        self.core = RecursiveCore(arch, vocab_size, seq_len)
        self.conditioner = conditioner

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

    def forward(self, carry: Carry, batch: dict[str, torch.Tensor], conditioning: Conditioning | None = None):
        """Returns (new carry, StepOutput). ``conditioning`` may be passed to reuse a context
        computed once per batch (evaluation); in training it is recomputed with gradient. Entries of
        ``batch`` that are not per-slot tensors (packed demonstrations, built for the slots of this
        step) go to the conditioner as they are."""
        data = {k: _where(carry.halted, batch[k], v) for k, v in carry.data.items()}
        z_H, z_L, steps = self.restarted(carry, carry.halted)
        steps = steps + 1

        cond = conditioning if conditioning is not None else self.conditioner({**batch, **data})
        z_H, z_L, logits, q = self.core(z_H, z_L, data["inputs"], cond.context)
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
                    _, _, _, q_next = self.core(z_H, z_L, data["inputs"], cond.context)
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
