"""Training objectives of the demonstration conditioners that are not the core's loss.

The objective against collapse (``arch.contrastive_weight``): a task's context, computed from two
disjoint halves of its demonstrations, should agree with itself and differ from every other task's
in the batch. With z_a, z_b (B, S) the two halves' context summaries, unit-normalised, and t the
temperature, sample i's loss is InfoNCE in both directions,

    0.5 * [ -log softmax_j(z_a_i . z_b_j / t)[i]  -  log softmax_j(z_b_i . z_a_j / t)[i] ],

the candidates j being the samples with two halves whose task differs from i's, and i itself. A
context that is the same for every task (a collapse) scores log(number of candidates); one that
tells tasks apart scores near 0. Under several ranks the candidates are the whole global batch's
(gathered, gradient included) and each rank sums its own samples' losses, so that two ranks train as
one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

from trm.model.conditioning import Conditioning, LatentSteps


def halves(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, D) demonstrations present -> the first half of each sample's present ones (the first
    ceil(n/2) in slot order), the rest, and whether the sample has two halves (n >= 2)."""
    rank = mask.cumsum(-1) - 1
    count = mask.sum(-1, keepdim=True)
    first = mask & (rank < (count + 1) // 2)
    return first, mask & ~first, count.squeeze(-1) >= 2


def contrastive_loss(za: torch.Tensor, zb: torch.Tensor, task_ids: torch.Tensor, valid: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The module's InfoNCE, summed over the valid samples (B,) of this rank, against the candidates
    of every rank; returns (sum, number of valid samples). No host-device synchronisation (a batch
    without a valid sample gives (0, 0))."""
    za, zb = F.normalize(za.float(), dim=-1), F.normalize(zb.float(), dim=-1)
    all_za, all_zb, all_tasks, all_valid = za, zb, task_ids, valid
    offset = 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        all_za, all_zb = torch.cat(all_gather(za)), torch.cat(all_gather(zb))
        all_tasks, all_valid = torch.cat(_gathered(task_ids)), torch.cat(_gathered(valid.int())).bool()
        offset = dist.get_rank() * len(za)
    own = offset + torch.arange(len(za), device=za.device)
    own_self = own[:, None] == torch.arange(len(all_za), device=za.device)[None, :]
    candidate = own_self | (all_valid[None, :] & (task_ids[:, None] != all_tasks[None, :]))
    floor = torch.finfo(torch.float32).min
    logits = (za @ all_zb.T / temperature).masked_fill(~candidate, floor)
    logits_t = (zb @ all_za.T / temperature).masked_fill(~candidate, floor)
    per_sample = 0.5 * (F.cross_entropy(logits, own, reduction="none") + F.cross_entropy(logits_t, own, reduction="none"))
    return torch.where(valid, per_sample, 0.0).sum(), valid.sum().to(per_sample.dtype)


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def add_contrastive(out: Conditioning, context_of, summary, mask: torch.Tensor, task_ids: torch.Tensor, arch) -> None:
    """Add the weighted objective against collapse to ``out``'s auxiliary losses
    (``contrastive_loss``, summed over the batch) and its mean per valid sample to the metrics
    (``train/contrastive``). ``context_of(mask)`` gives the contexts of a subset of the
    demonstrations, ``summary(conditioning)`` one vector per sample."""
    first, second, valid = halves(mask)
    loss, count = contrastive_loss(summary(context_of(first)), summary(context_of(second)), task_ids, valid,
                                   arch.contrastive_temperature)  # fmt: skip
    out.aux_losses["contrastive_loss"] = arch.contrastive_weight * loss
    out.metrics["train/contrastive"] = (loss.detach(), count)


def latent_steps_of(arch) -> LatentSteps | None:
    """The latent steps ``arch`` asks for (``latent_steps`` > 0), or None."""
    if not arch.latent_steps:
        return None
    return LatentSteps(arch.latent_steps, arch.latent_lr, arch.latent_first_order, arch.latent_act_steps)
