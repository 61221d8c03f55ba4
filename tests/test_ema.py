import torch

from trm.ema import EMA


def test_ema_follows_the_formula_and_swaps_in_for_evaluation():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(model, rate=0.9)
    expected = torch.tensor([[1.0, 2.0]])
    for value in (3.0, -1.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update()
        expected = 0.9 * expected + 0.1 * value
    torch.testing.assert_close(ema.shadow[0], expected)
    with ema.applied():
        torch.testing.assert_close(model.weight.detach(), expected)
    assert (model.weight == -1.0).all()
