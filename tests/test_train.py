import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trm.cli import compose
from trm.data.dataset import ArcSplit
from trm.train import train

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(tiny_dataset, run_dir, *extra):
    path, o = tiny_dataset
    return [
        "experiment=E0v2", f"data.path={path}", f"data.num_train_groups={o.num_train_groups}",
        f"data.num_eval_groups={o.num_eval_groups}", f"data.num_augmentations={o.num_augmentations}",
        f"data.max_grid_size={o.max_grid_size}", "arch.hidden_size=32", "arch.num_heads=2",
        "arch.H_cycles=2", "arch.L_cycles=1", "arch.puzzle_emb_len=2", "arch.halt_max_steps=3",
        "global_batch_size=8", "epochs=4", "eval_interval=2", "lr_warmup_steps=2", "log_interval=2",
        "eval.train_augmentations=1", "wandb.mode=disabled", f"run_dir={run_dir}", *extra,
    ]  # fmt: skip


def run(tiny_dataset, run_dir, *extra):
    cfg, raw = compose("cfg_pretrain", tiny_overrides(tiny_dataset, run_dir, *extra))
    return train(cfg, raw)


def final_state(run_dir):
    latest = (Path(run_dir) / "checkpoints" / "latest").read_text()
    return torch.load(Path(run_dir) / "checkpoints" / latest / "state.pt", weights_only=False)


def test_a_run_writes_its_directory(tiny_dataset, tmp_path):
    summary = run(tiny_dataset, tmp_path / "r")
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints"} <= files
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in line for line in lines)
    names = set().union(*lines)
    for key in ("train/lm_loss", "train/accuracy", "train/exact_accuracy", "train/q_halt_accuracy", "train/steps",
                "train/lr", "eval/train/exact_accuracy", "eval/test/accuracy", "ARC/pass@2", "grad/total_norm"):
        assert key in names, key
    on_disk = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert on_disk["eval/train/exact_accuracy"] == summary["eval/train/exact_accuracy"]
    per_epoch = ArcSplit(tiny_dataset[0], "train").examples_per_epoch
    assert summary["step"] == summary["total_steps"] == 4 * per_epoch // 8  # epochs x examples per epoch / batch
    state = final_state(tmp_path / "r")
    assert {"model", "optimisers", "ema", "sampler", "step", "config"} <= set(state)


def test_resume_continues_exactly(tiny_dataset, tmp_path):
    run(tiny_dataset, tmp_path / "straight")
    run(tiny_dataset, tmp_path / "split", "max_steps=7")
    assert final_state(tmp_path / "split")["step"] == 7
    run(tiny_dataset, tmp_path / "split")  # resumes from step 7
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] > 7
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


def test_wandb_offline_never_prompts_and_writes_beside_the_run(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run(tiny_dataset, tmp_path / "r", "wandb.mode=auto", "max_steps=2")
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "r" / "wandb_id.txt").read_text().strip()


def test_a_directory_holding_another_run_is_not_overwritten(tiny_dataset, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="already holds files"):
        run(tiny_dataset, tmp_path / "r")
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == "{}\n"


@pytest.mark.slow
def test_torchrun_two_ranks_matches_one_rank(tiny_dataset, tmp_path):
    """Data parallel on CPU (gloo): with exploration off, two ranks splitting the global batch
    train the same weights as one rank."""
    common = tiny_overrides(tiny_dataset, "X", "arch.halt_exploration_prob=0", "max_steps=6")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for n, name in ((1, "one"), (2, "two")):
        args = [a if not a.startswith("run_dir=") else f"run_dir={tmp_path / name}" for a in common]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "pretrain.py", *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert b["world_size"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    import trm.train as train_module

    healthy = train_module.train_step
    first_eval = 2 * ArcSplit(tiny_dataset[0], "train").examples_per_epoch // 8  # eval_interval=2 epochs, batch 8

    def diverging(model, carry, batch, opt, cfg, step, *rest):
        carry, metrics, lrs = healthy(model, carry, batch, opt, cfg, step, *rest)
        if step > first_eval:  # after the first evaluation and its checkpoint
            for p in model.parameters():
                p.data.fill_(float("nan"))
            _, count = metrics["train/lm_loss"]
            metrics["train/lm_loss"] = (torch.tensor(float("nan")), count)
        return carry, metrics, lrs

    monkeypatch.setattr(train_module, "train_step", diverging)
    first_log = first_eval + 2 - first_eval % 2  # log_interval=2
    with pytest.raises(FloatingPointError, match=f"diverged: train/lm_loss is nan at step {first_log}"):
        run(tiny_dataset, tmp_path / "r")
    state = final_state(tmp_path / "r")
    assert state["step"] == first_eval
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["diverged"] is True
