"""The benchmark's FLOP count against PyTorch's own count of the same training step."""

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trm.cli import compose
from trm.train import build_model, total_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench  # noqa: E402

META = {"vocab_size": 12, "seq_len": 16, "num_puzzle_identifiers": 5, "grid_size": 4}


@pytest.mark.parametrize("entry", ["cfg_pretrain", "cfg_pretrain_encoder"])
def test_step_flops_match_the_counted_matrix_products(entry):
    """Attention runs in its math form so that every product is a counted matmul. The formula
    leaves out the 2-logit halting head (added here) and an encoder's set aggregation and context
    map (products over the few pair vectors: 0.6 % here, far less at full size)."""
    extra = ["experiment=E1v2" if entry.endswith("encoder") else "experiment=E0v2"]
    cfg, _ = compose(entry, [*extra, "arch.hidden_size=32", "arch.num_heads=2", "arch.H_cycles=3", "arch.L_cycles=2",
                             "arch.puzzle_emb_len=2"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, META).train()
    B, D = 3, 4
    batch = {"inputs": torch.randint(2, 12, (B, 16), dtype=torch.int32), "labels": torch.randint(2, 12, (B, 16)),
             "puzzle_identifiers": torch.arange(1, B + 1, dtype=torch.int32), "task_ids": torch.arange(B)}  # fmt: skip
    if entry.endswith("encoder"):
        batch["demo_inputs"] = torch.randint(2, 12, (B, D, 16), dtype=torch.int32)  # full grids: no PAD cell
        batch["demo_labels"] = torch.randint(2, 12, (B, D, 16), dtype=torch.int32)
        batch["demo_mask"] = torch.tensor([[True, True, False, False], [True] * 4, [True, False, False, False]])
    carry = model.initial_carry(batch)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        carry, out = model(carry, batch)
        total_loss(out, carry)[0].backward()
    halting_head = 3 * 2 * B * cfg.arch.hidden_size * 2
    tolerance = 1e-2 if entry.endswith("encoder") else 1e-6
    assert bench.step_flops(cfg, batch, 16, 12, model) + halting_head == pytest.approx(counter.get_total_flops(), rel=tolerance)
