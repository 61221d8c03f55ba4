"""Every command line of jobs.txt composes with Hydra, validates, and builds its model."""

import shlex
import sys

import pytest
import torch

import encoders  # noqa: F401
from trm.cli import compose
from trm.train import build_model

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from run_jobs import parse  # noqa: E402

ENTRIES = {"pretrain.py": "cfg_pretrain", "pretrain_encoder.py": "cfg_pretrain_encoder"}
JOBS = [command for _, _, command in parse(ROOT / "jobs.txt")]
SMALL = ["arch.hidden_size=32", "arch.num_heads=4", "arch.puzzle_emb_len=2"]
PLAN = ["E0v2", "E1v2", "E_diag1", "E2_lpn", "E3_lpn_var", "E4_lower_lr", "E5_grad_clip", "E7_attention", "E6_combined"]


def split_command(command):
    words = shlex.split(command)
    assert words[:3] == ["torchrun", "--nproc-per-node", "4"], command
    script = next(w for w in words if w.endswith(".py"))
    return script, words[words.index(script) + 1 :]


def test_the_plans_experiments_are_queued_in_phase_order_with_distinct_names():
    experiments = [next(a.split("=")[1] for a in split_command(c)[1] if a.startswith("experiment=")) for c in JOBS]
    assert [e for e in experiments if e in PLAN] == PLAN
    names = [next(a.split("=", 1)[1] for a in split_command(c)[1] if a.startswith("+run_name=")) for c in JOBS]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("command", JOBS)
def test_job_composes_and_builds(command):
    script, overrides = split_command(command)
    cfg, raw = compose(ENTRIES[script], overrides + SMALL)
    assert raw["experiment"] and cfg.run_name
    if script == "pretrain_encoder.py":
        assert cfg.data.split == "heldout"  # the encoder never sees its evaluation tasks
    meta = {"vocab_size": 12, "seq_len": 16, "grid_size": 4, "num_puzzle_identifiers": 8, "max_demos": 3}
    model = build_model(cfg, meta)
    batch = {
        "inputs": torch.randint(0, 12, (2, 16), dtype=torch.int32), "labels": torch.randint(0, 12, (2, 16)),
        "puzzle_identifiers": torch.tensor([1, 2], dtype=torch.int32), "task_ids": torch.tensor([0, 1]),
        "demo_inputs": torch.randint(0, 12, (2, 3, 16), dtype=torch.int32),
        "demo_labels": torch.randint(0, 12, (2, 3, 16), dtype=torch.int32),
        "demo_mask": torch.tensor([[True, True, False], [True, False, False]]),
    }  # fmt: skip
    _, out = model(model.initial_carry(batch), batch)
    assert torch.isfinite(out.logits).all()
