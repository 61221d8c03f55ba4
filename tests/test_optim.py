import math

import torch

from trm.model.puzzle_embedding import PuzzleEmbedding, SparseSignSGD
from trm.optim import AdamATan2, lr_at


def test_adam_atan2_matches_the_formula_over_several_steps():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    ref = p.detach().clone()
    m = torch.zeros(5)
    v = torch.zeros(5)
    lr, b1, b2, wd = 0.01, 0.9, 0.95, 0.1
    opt = AdamATan2([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    for t in range(1, 6):
        g = torch.randn(5)
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        ref = ref - lr / (1 - b1**t) * torch.atan2(m, torch.sqrt(v / (1 - b2**t)))
        torch.testing.assert_close(p.detach(), ref)


def test_adam_atan2_is_scale_invariant_and_bounded():
    p1, p2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    o1, o2 = AdamATan2([p1], lr=0.1, weight_decay=0), AdamATan2([p2], lr=0.1, weight_decay=0)
    g = torch.tensor([1e-8, 1.0, -1e3])
    p1.grad, p2.grad = g.clone(), 1000 * g.clone()
    o1.step(), o2.step()
    torch.testing.assert_close(p1.detach(), p2.detach())
    assert p1.detach().abs().max() <= 0.1 / (1 - 0.9) * math.pi / 2


def test_sparse_sign_sgd_sums_equal_ids_and_touches_only_seen_rows():
    emb = PuzzleEmbedding(num_puzzle_identifiers=5, hidden_size=2, puzzle_emb_len=1)
    emb.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -2.0], [3.0, 3.0], [4.0, 4.0], [5.0, 5.0]]))
    emb.train()
    ids = torch.tensor([1, 3, 1], dtype=torch.int32)
    emb({"puzzle_identifiers": ids})
    _, rows = emb.looked_up
    # id 1 gets (+1, -3) and (+2, +1): summed (3, -2). id 3 gets (-1, 0): sign 0 leaves it.
    rows.grad = torch.tensor([[1.0, -3.0], [-1.0, 0.0], [2.0, 1.0]])
    lr, wd = 0.5, 0.1
    SparseSignSGD(emb, lr, wd).step()
    decay = 1 - lr * wd
    expected = torch.tensor([
        [1.0, 1.0],
        [2.0 * decay - lr, -2.0 * decay + lr],
        [3.0, 3.0],
        [4.0 * decay + lr, 4.0 * decay],
        [5.0, 5.0],
    ])  # fmt: skip
    torch.testing.assert_close(emb.weight, expected)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 1.0, 10, 110, 0.1) == 0.0
    assert lr_at(5, 1.0, 10, 110, 0.1) == 0.5
    assert lr_at(10, 1.0, 10, 110, 0.1) == 1.0
    assert math.isclose(lr_at(60, 1.0, 10, 110, 0.1), 0.1 + 0.9 * 0.5)
    assert math.isclose(lr_at(110, 1.0, 10, 110, 0.1), 0.1)
    assert lr_at(500, 2.0, 10, 110, 1.0) == 2.0  # min_ratio 1: flat
