"""Losses and per-step metrics of ACT training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trm.data.grids import IGNORE_LABEL_ID
from trm.model.layers import log_stablemax, stablemax_cross_entropy  # noqa: F401  (the output head's loss)


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
    lm_loss = (stablemax_cross_entropy(logits, labels, IGNORE_LABEL_ID) / divisor).sum()
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct.to(q_halt.dtype), reduction="sum")
    q_loss = q_halt_loss
    metrics["lm_loss"], metrics["q_halt_loss"] = lm_loss.detach(), q_halt_loss.detach()
    if target_q_continue is not None:
        q_continue_loss = F.binary_cross_entropy_with_logits(q_continue, target_q_continue, reduction="sum")
        q_loss = q_loss + q_continue_loss
        metrics["q_continue_loss"] = q_continue_loss.detach()
    return lm_loss + 0.5 * q_loss, metrics
