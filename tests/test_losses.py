import math

import torch

from trm.losses import act_loss, log_stablemax, stablemax_cross_entropy


def s(x):
    return 1 / (1 - x) if x < 0 else x + 1


def test_log_stablemax_matches_the_formula():
    x = torch.tensor([[-2.0, 0.0, 3.5, -0.25]])
    expected = [math.log(s(v) / sum(s(w) for w in x[0].tolist())) for v in x[0].tolist()]
    torch.testing.assert_close(log_stablemax(x.double())[0], torch.tensor(expected, dtype=torch.float64))


def test_stablemax_cross_entropy_ignores_masked_tokens_and_is_float64():
    logits = torch.tensor([[[1.0, -1.0, 0.0], [0.5, 0.5, 2.0]]])
    labels = torch.tensor([[2, -100]])
    loss = stablemax_cross_entropy(logits, labels)
    assert loss.dtype == torch.float64
    expected = -math.log(s(0.0) / (s(1.0) + s(-1.0) + s(0.0)))
    torch.testing.assert_close(loss, torch.tensor([[expected, 0.0]], dtype=torch.float64))


def test_act_loss_divides_by_valid_labels_and_counts_halted_samples_only():
    V = 3
    # Sample 0: both tokens right (label 1). Sample 1: one of three valid tokens right.
    logits = torch.full((2, 3, V), -1.0)
    logits[0, :, 1] = 5.0
    logits[1, :, 0] = 5.0
    labels = torch.tensor([[1, 1, -100], [0, 2, 2]])
    q_halt = torch.tensor([1.0, -1.0])
    halted = torch.tensor([True, False])
    steps = torch.tensor([3, 5])
    loss, m = act_loss(logits, q_halt, torch.zeros(2), labels, halted, steps)
    ce = stablemax_cross_entropy(logits, labels)
    lm = ce[0].sum() / 2 + ce[1].sum() / 3
    q = torch.nn.functional.binary_cross_entropy_with_logits(q_halt, torch.tensor([1.0, 0.0]), reduction="sum")
    torch.testing.assert_close(loss, lm + 0.5 * q.double())
    assert m["count"] == 1  # only the halted sample
    assert m["exact_accuracy"] == 1 and m["accuracy"] == 1.0 and m["steps"] == 3 and m["q_halt_accuracy"] == 1


def test_stablemax_gradient_is_finite_and_exact_at_the_branch_points():
    # A logit of exactly 1.0 once made the unused 1 / (1 - x) branch inf and its gradient NaN.
    x = torch.tensor([[[1.0, 0.0, -2.0, 3.0]]], dtype=torch.float64, requires_grad=True)
    stablemax_cross_entropy(x, torch.tensor([[1]])).sum().backward()
    s = torch.tensor([2.0, 1.0, 1 / 3, 4.0], dtype=torch.float64)  # s(x) by hand
    ds = torch.tensor([1.0, 1.0, 1 / 9, 1.0], dtype=torch.float64)  # s'(x): 1 for x >= 0, 1/(1-x)^2 below
    # loss = -log s_1 + log sum s  =>  dloss/dx_i = ds_i / sum s - [i == 1] ds_1 / s_1
    expected = ds / s.sum()
    expected[1] -= ds[1] / s[1]
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad[0, 0], expected)
