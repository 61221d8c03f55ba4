"""Slurm submission through Hydra's submitit launcher (the `slurm` extra, in `dev` too)."""

import json
import os
import subprocess
import sys

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers import ROOT, tiny_overrides
from trm.cli import CONFIG_DIR



def test_the_slurm_launcher_config_asks_for_one_node_of_four_gpus():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("cfg_pretrain_encoder", ["experiment=E1v2", "hydra/launcher=slurm_4gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 4, 4)
    assert launcher.max_num_timeout > 0  # preempted or timed-out jobs are requeued


def test_a_sweep_runs_its_jobs_through_submitit(tiny_dataset, tmp_path):
    """submitit's local executor: each job a process of its own, as on a Slurm node."""
    args = tiny_overrides(tiny_dataset, tmp_path / "job", "max_steps=2", "eval.reliance=false")
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "-m", "hydra/launcher=submitit_local", *args,
                           "seed=0,1"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for seed in (0, 1):
        run = tmp_path / f"job-seed={seed}"
        assert json.loads((run / "summary.json").read_text())["step"] == 2
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] >= 1
    logs = list((tmp_path / "runs" / "sweeps").glob("*/.submitit/*/*_log.out"))
    assert len(logs) == 2  # two submitit jobs ran them
