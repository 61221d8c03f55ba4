"""Losses and per-step metrics of ACT training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trm.data.grids import IGNORE_LABEL_ID


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log of s(x) / sum s(x), with s(x) = 1 / (1 - x) for x < 0 and x + 1 otherwise."""
    # Each branch only sees the inputs it applies to: 1 / (1 - x) evaluated at x = 1 would be inf,
    # and torch.where's backward turns the unused branch's 0 * inf into a NaN gradient.
    s = torch.where(x < 0, 1 / (1 - x.clamp(max=0)), x.clamp(min=0) + 1)
    return torch.log(s / s.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID) -> torch.Tensor:
    """Per-token loss (B, L) in float64; zero where the label is ignored. logits: (B, L, V)."""
    logprobs = log_stablemax(logits.to(torch.float64))
    valid = labels != ignore_index
    picked = logprobs.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return -torch.where(valid, picked, 0)


def act_loss(logits, q_halt, q_continue, labels, halted, steps, target_q_continue=None):
    """Loss of one supervision step and its metrics, all summed over the local batch.

    lm_loss: per-token stablemax cross-entropy divided by each sequence's count of valid labels,
    summed. q_halt_loss: BCE of q_halt against "the whole sequence is exactly right". The total is
    lm_loss + 0.5 * (q_halt_loss [+ q_continue_loss]). Metrics other than the losses are counted over
    the slots that halt at this step (``count``), as in the original TRM.

    logits (B, L, V); q_halt, q_continue (B,); labels (B, L); halted (B,) bool; steps (B,).
    """
    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    divisor = counts.clamp_min(1).unsqueeze(-1)
    with torch.no_grad():
        correct = mask & (logits.argmax(-1) == labels)
        seq_correct = correct.sum(-1) == counts
        valid = halted & (counts > 0)
        metrics = {
            "count": valid.sum(),
            "accuracy": torch.where(valid, correct.sum(-1) / divisor.squeeze(-1), 0).sum(),
            "exact_accuracy": (valid & seq_correct).sum(),
            "q_halt_accuracy": (valid & ((q_halt >= 0) == seq_correct)).sum(),
            "steps": torch.where(valid, steps, 0).sum(),
        }
    lm_loss = (stablemax_cross_entropy(logits, labels) / divisor).sum()
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct.to(q_halt.dtype), reduction="sum")
    q_loss = q_halt_loss
    metrics["lm_loss"], metrics["q_halt_loss"] = lm_loss.detach(), q_halt_loss.detach()
    if target_q_continue is not None:
        q_continue_loss = F.binary_cross_entropy_with_logits(q_continue, target_q_continue, reduction="sum")
        q_loss = q_loss + q_continue_loss
        metrics["q_continue_loss"] = q_continue_loss.detach()
    return lm_loss + 0.5 * q_loss, metrics
