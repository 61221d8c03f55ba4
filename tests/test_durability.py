"""Runs that survive reruns, kills, signals and bad input without losing or changing results."""

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import trm.rundir as rundir
import trm.train as train_module
from trm import checkpoint
from trm.checkpoint import CheckpointError, load_weights
from trm.cli import compose
from trm.data.build import build_dataset, remove_stale_builds
from trm.data.dataset import ArcSplit
from trm.data.tasks import ArcDataError
from trm.errors import Interrupted
from trm.rundir import RunDirError
from trm.train import train

from helpers import ROOT, final_state, optimiser_tensors, read_rows, tiny_overrides

ENTRIES = {"pretrain": "cfg_pretrain", "encoder": "cfg_pretrain_encoder"}


def run(tiny_dataset, run_dir, *extra, entry="pretrain"):
    overrides = tiny_overrides(tiny_dataset, run_dir, *extra)
    if entry == "encoder":  # the tiny dataset is built in trm mode
        overrides = [o.replace("experiment=E0v2", "experiment=E1v2") for o in overrides] + ["data.split=trm"]
    cfg, raw = compose(ENTRIES[entry], overrides)
    return train(cfg, raw)


def folder_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}  # fmt: skip


def training_rows(run_dir) -> dict[int, dict]:
    """Every logged row by step, timing aside (wall-clock figures differ between runs)."""
    rows = {}
    for r in read_rows(run_dir):
        clean = {k: v for k, v in r.items() if not k.startswith(("timing/", "time/"))}
        rows.setdefault(r["step"], {}).update(clean)
    return rows


def assert_same_training(a_dir, b_dir):
    a, b = final_state(a_dir), final_state(b_dir)
    assert a["step"] == b["step"] and a["sampler"] == b["sampler"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    for x, y in zip(optimiser_tensors(a) + a["ema"]["shadow"], optimiser_tensors(b) + b["ema"]["shadow"], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert training_rows(a_dir) == training_rows(b_dir)


@pytest.mark.parametrize("entry", ["pretrain", "encoder"])
def test_stop_and_resume_equals_one_uninterrupted_run(tiny_dataset, tmp_path, entry):
    """N steps, stop, resume to 2N: weights, optimiser state, EMA and every logged row (evaluations
    included) equal the uninterrupted run's, bit for bit."""
    extra = ("arch.halt_exploration_prob=0.5", "lr=1e-3", "lr_min_ratio=0.1", "log_interval=1")
    run(tiny_dataset, tmp_path / "straight", *extra, entry=entry)
    total = final_state(tmp_path / "straight")["step"]
    run(tiny_dataset, tmp_path / "split", *extra, f"max_steps={total // 2}", entry=entry)
    assert final_state(tmp_path / "split")["step"] == total // 2
    run(tiny_dataset, tmp_path / "split", *extra, entry=entry)
    assert_same_training(tmp_path / "straight", tmp_path / "split")


@pytest.mark.parametrize("layout", ["sequence", "overlay"])
def test_packed_demonstrations_train_like_padded_ones(tiny_dataset, tmp_path, layout):
    """Whole training runs, ACT slots continuing across batches (so the feed packs, for each step,
    the pairs of the examples the slots hold, not just the new batch's): packed and padded
    demonstrations log the same losses and metrics at every step and end with the same weights,
    within float32 rounding."""
    extra = ("arch.halt_exploration_prob=0.5", "lr=1e-3", "log_interval=1", f"arch.encoder_pair_layout={layout}")
    run(tiny_dataset, tmp_path / "packed", *extra, entry="encoder")
    run(tiny_dataset, tmp_path / "padded", *extra, "arch.encoder_packing=false", entry="encoder")
    packed, padded = read_rows(tmp_path / "packed"), read_rows(tmp_path / "padded")
    assert [r.keys() for r in packed] == [r.keys() for r in padded]
    for a, b in zip(packed, padded):
        numbers = [k for k, v in a.items() if isinstance(v, float) and not k.startswith("timing/")]
        assert [a[k] for k in numbers] == pytest.approx([b[k] for k in numbers], rel=1e-4, abs=1e-5), a["step"]
    ours, theirs = final_state(tmp_path / "packed")["model"], final_state(tmp_path / "padded")["model"]
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_rerunning_a_finished_run_changes_nothing(tiny_dataset, tmp_path, capsys):
    summary = run(tiny_dataset, tmp_path / "r")
    before = folder_hash(tmp_path / "r")
    capsys.readouterr()
    again = run(tiny_dataset, tmp_path / "r")
    assert folder_hash(tmp_path / "r") == before
    assert again == pytest.approx(summary)
    out = capsys.readouterr().out
    assert "is finished" in out and str(tmp_path / "r" / "summary.json") in out


def test_extend_trains_on_or_evaluates_again_keeping_the_old_summary(tiny_dataset, tmp_path):
    first = run(tiny_dataset, tmp_path / "r", "lr_min_ratio=0.1")
    again = run(tiny_dataset, tmp_path / "r", "lr_min_ratio=0.1", "extend=true")  # same length: a new evaluation
    assert again["step"] == first["step"] and again["eval/train/accuracy"] == first["eval/train/accuracy"]
    kept = list((tmp_path / "r").glob("summary.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == pytest.approx(first)
    longer = run(tiny_dataset, tmp_path / "r", "lr_min_ratio=0.1", "extend=true", "epochs=6")
    assert longer["step"] == longer["total_steps"] == first["step"] * 6 // 4
    assert len(list((tmp_path / "r").glob("summary.*.json"))) == 2
    # The longer schedule is now the stored one (the old config kept): the extended run is finished.
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["epochs"] == 6
    assert [yaml.safe_load(p.read_text())["epochs"] for p in (tmp_path / "r").glob("config.*.yaml")] == [4]
    before = folder_hash(tmp_path / "r")
    assert run(tiny_dataset, tmp_path / "r", "lr_min_ratio=0.1", "epochs=6") == pytest.approx(longer)
    assert folder_hash(tmp_path / "r") == before
    # Each evaluation step appears once: the re-evaluation replaced the first final evaluation's row.
    eval_steps = [r["step"] for r in read_rows(tmp_path / "r") if "eval/train/exact_accuracy" in r]
    assert eval_steps == sorted(set(eval_steps))
    with pytest.raises(RunDirError) as err:  # a longer schedule needs extend=true
        run(tiny_dataset, tmp_path / "r", "lr_min_ratio=0.1", "epochs=8")
    assert "epochs: stored 6, now 8" in str(err.value) and "extend=true also allows: epochs" in str(err.value)


def test_resume_refuses_a_changed_config_naming_each_key(tiny_dataset, tmp_path):
    run(tiny_dataset, tmp_path / "r", "max_steps=3")
    before = folder_hash(tmp_path / "r")
    with pytest.raises(RunDirError) as err:
        run(tiny_dataset, tmp_path / "r", "global_batch_size=4", "arch.hidden_size=64", "log_interval=5")
    message = str(err.value)
    assert "global_batch_size: stored 8, now 4" in message and "arch.hidden_size: stored 32, now 64" in message
    assert "log_interval" not in message  # may change on resume
    assert folder_hash(tmp_path / "r") == before


def test_a_failing_setup_writes_nothing_and_the_corrected_command_runs(tiny_dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset[0], broken)
    (broken / "train" / "labels.npy").unlink()
    overrides = [o if not o.startswith("data.path=") else f"data.path={broken}" for o in tiny_overrides(tiny_dataset, tmp_path / "r")]
    cfg, raw = compose("cfg_pretrain", overrides)
    with pytest.raises(ArcDataError, match=f"{broken / 'train' / 'labels.npy'}: missing"):
        train(cfg, raw)
    assert not (tmp_path / "r").exists()
    # A folder holding only what an older failure left (its config) is reused by the command.
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("seed: 0\n")
    assert run(tiny_dataset, tmp_path / "r", "max_steps=2")["step"] == 2


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tiny_dataset, tmp_path, capsys):
    extra = ("checkpoint_interval=2", "keep_checkpoints=3", "lr=1e-3", "log_interval=1")
    run(tiny_dataset, tmp_path / "straight", *extra)
    run(tiny_dataset, tmp_path / "split", *extra, "max_steps=6")
    folders = checkpoint.checkpoints(tmp_path / "split" / "checkpoints")
    assert [checkpoint.step_of(f) for f in folders] == [6, 4, 2]  # every 2 steps, the newest 3 kept
    newest = folders[0] / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    # Rows logged after step 4 (and a row cut by a kill) must not appear twice after the resume.
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lm_loss": 1.0}\n{"step": 8, "trai')
    run(tiny_dataset, tmp_path / "split", *extra)
    assert f"checkpoint {newest} is unreadable" in capsys.readouterr().out
    assert (newest.parent.parent / "step_00000006.unreadable" / "state.pt").is_file()  # set aside, not deleted
    assert_same_training(tmp_path / "straight", tmp_path / "split")
    assert len(checkpoint.checkpoints(tmp_path / "split" / "checkpoints")) == 3


def test_a_resumed_runs_training_time_counts_every_session(tiny_dataset, tmp_path):
    """summary.json's time/train_seconds is the run's, not only its last session's: the seconds a
    checkpoint records are carried on by the session that resumes from it."""
    run(tiny_dataset, tmp_path / "r", "max_steps=2")
    latest = tmp_path / "r" / "checkpoints" / (tmp_path / "r" / "checkpoints" / "latest").read_text()
    state = torch.load(latest / "state.pt", weights_only=False)
    assert 0 < state["train_seconds"] < 600
    state["train_seconds"] = 1e6  # as if the first session had trained for days
    torch.save(state, latest / "state.pt")
    summary = run(tiny_dataset, tmp_path / "r")
    assert summary["step"] > 2 and 1e6 < summary["time/train_seconds"] < 1e6 + 600


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(tiny_dataset, tmp_path, monkeypatch):
    extra = ("lr=1e-3", "log_interval=1", "checkpoint_interval=1000")
    run(tiny_dataset, tmp_path / "straight", *extra)
    healthy = train_module.train_step

    def preempted(model, carry, batch, opt, cfg, step, *rest):
        out = healthy(model, carry, batch, opt, cfg, step, *rest)
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as Slurm preempts
        return out

    monkeypatch.setattr(train_module, "train_step", preempted)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 5") as err:
        run(tiny_dataset, tmp_path / "split", *extra)
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert final_state(tmp_path / "split")["step"] == 5 and not (tmp_path / "split" / "summary.json").exists()
    monkeypatch.setattr(train_module, "train_step", healthy)
    run(tiny_dataset, tmp_path / "split", *extra)
    assert_same_training(tmp_path / "straight", tmp_path / "split")


def test_a_stop_signal_during_an_evaluation_ends_it_at_once_and_the_run_resumes_evaluating_again(
        tiny_dataset, tmp_path, monkeypatch):  # fmt: skip
    """SIGTERM one second into the first evaluation, made to last a minute: the run exits within
    seconds, with the checkpoint of that step saved before the evaluation; the same command resumes,
    evaluates that step again and ends as the uninterrupted run (weights, every logged row)."""
    extra = ("lr=1e-3", "log_interval=1", "checkpoint_interval=1000")
    run(tiny_dataset, tmp_path / "straight", *extra)
    healthy = train_module.evaluate_model
    evaluated = []

    def long(*args, **kwargs):
        if not evaluated:
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # as Slurm preempts
        evaluated.append(1)
        metrics = healthy(*args, **kwargs)
        time.sleep(60)  # the rest of a long evaluation
        return metrics

    monkeypatch.setattr(train_module, "evaluate_model", long)
    began = time.perf_counter()
    with pytest.raises(Interrupted, match="stopped by SIGTERM during the evaluation at step (\\d+)") as err:
        run(tiny_dataset, tmp_path / "split", *extra)
    assert time.perf_counter() - began < 20 and err.value.exit_code == 128 + signal.SIGTERM
    step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    state = final_state(tmp_path / "split")
    assert state["step"] == step and state["evaluation_pending"] and not (tmp_path / "split" / "summary.json").exists()
    assert not any(k.startswith("eval/") for r in read_rows(tmp_path / "split") for k in r)  # nothing of it logged
    monkeypatch.setattr(train_module, "evaluate_model", healthy)
    run(tiny_dataset, tmp_path / "split", *extra)
    assert_same_training(tmp_path / "straight", tmp_path / "split")
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("straight", "split")]
    assert {k: v for k, v in summaries[0].items() if k.startswith(("eval/", "ARC/"))} == \
        {k: v for k, v in summaries[1].items() if k.startswith(("eval/", "ARC/"))}  # fmt: skip


def test_runs_started_in_the_same_second_get_their_own_folders(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir, "default_run_name", lambda raw: "E0v2-20261127-120000")
    for _ in range(2):
        overrides = [o for o in tiny_overrides(tiny_dataset, "x", "max_steps=1") if not o.startswith("run_dir=")]
        train(*compose("cfg_pretrain", overrides))
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["E0v2-20261127-120000", "E0v2-20261127-120000-2"]
    for name in names:
        assert json.loads((tmp_path / "runs" / name / "summary.json").read_text())["step"] == 1


def test_a_killed_build_leaves_no_temporary_folder_after_the_next(tiny_dataset, tmp_path):
    out = tmp_path / "data" / "set"
    out.parent.mkdir()
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = out.parent / f".set.tmp-{host}-{dead.pid}-abc123"
    live = out.parent / f".set.tmp-{host}-{os.getpid()}-def456"  # a build still running
    elsewhere = out.parent / ".set.tmp-another-host-1-ghi789"
    for folder in (killed, live, elsewhere):
        folder.mkdir()
        (folder / "inputs.npy").write_bytes(b"x" * 100)
    build_dataset(tiny_dataset[1], out, log=lambda *_: None)
    assert not killed.exists() and live.exists() and elsewhere.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".set.tmp") and p not in (live, elsewhere)]
    remove_stale_builds(out)  # idempotent
    assert live.exists()


@pytest.mark.parametrize("cut", [40, 200])  # inside the header; inside the data
def test_a_truncated_dataset_array_is_named(tiny_dataset, tmp_path, cut):
    copy = tmp_path / "d"
    shutil.copytree(tiny_dataset[0], copy)
    target = copy / "test" / "inputs.npy"
    target.write_bytes(target.read_bytes()[:cut])
    with pytest.raises(ArcDataError, match=f"{target}: unreadable.*delete it to rebuild"):
        ArcSplit(copy, "test")


@pytest.mark.parametrize("script, experiment, other", [("pretrain.py", "E1v2", "pretrain_encoder.py"),
                                                        ("pretrain_encoder.py", "E0v2", "pretrain.py")])
def test_an_experiment_of_the_other_entry_point_is_refused_naming_its_command(tmp_path, script, experiment, other):
    """Refused before anything is built or written: no dataset folder, no run directory."""
    args = [f"experiment={experiment}", "preset=cpu", f"data.root={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"which {other} trains, not {script}: python {other} {' '.join(args)}" in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_weights_that_do_not_fit_name_the_tensor_and_both_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = model.state_dict()
    state["0.weight"] = torch.zeros(5, 4)
    state["extra.bias"] = torch.zeros(1)
    del state["1.bias"]
    with pytest.raises(CheckpointError) as err:
        load_weights(model, state, "ckpt.pt")
    message = str(err.value)
    assert "0.weight: (5, 4) in ckpt.pt, (3, 4) in the model" in message
    assert "missing from ckpt.pt: 1.bias" in message and "not in the model: extra.bias" in message


def test_a_checkpoint_of_another_format_is_refused(tiny_dataset, tmp_path):
    run(tiny_dataset, tmp_path / "r", "max_steps=2")
    state_file = checkpoint.checkpoints(tmp_path / "r" / "checkpoints")[0] / "state.pt"
    state = torch.load(state_file, weights_only=False)
    torch.save({**state, "format_version": 99}, state_file)
    with pytest.raises(CheckpointError, match=f"{state_file} has checkpoint format 99"):
        run(tiny_dataset, tmp_path / "r")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(tiny_dataset, tmp_path):
    """The training process is killed (SIGKILL) at random instants, checkpoint writes included
    (a checkpoint at every step), and rerun each time until it finishes."""
    args = tiny_overrides(tiny_dataset, "X", "lr=1e-3", "log_interval=1", "checkpoint_interval=1", "epochs=40")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def command(name):
        return [sys.executable, "pretrain.py", *[a if not a.startswith("run_dir=") else f"run_dir={tmp_path / name}" for a in args]]

    subprocess.run(command("straight"), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    rng, kills, deadline = random.Random(0), 0, time.monotonic() + 900
    metrics = tmp_path / "killed" / "metrics.jsonl"
    rows = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    while not (tmp_path / "killed" / "summary.json").exists():
        assert time.monotonic() < deadline, f"no finish after {kills} kills"
        before = rows()
        proc = subprocess.Popen(command("killed"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and rows() <= before:  # until it trains (start-up takes seconds)
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))  # then anywhere in a step, its logging or its checkpoint
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]
    print(f"survived {kills} kills")
    assert kills >= 5
    assert_same_training(tmp_path / "straight", tmp_path / "killed")
    steps = [r["step"] for r in read_rows(tmp_path / "killed") if "train/lr" in r]
    assert steps == sorted(set(steps)), "a step was logged twice"
    assert np.all(np.diff(steps) == 1)
    assert not list((tmp_path / "killed" / "checkpoints").glob(".step_*"))  # killed saves cleaned up


def published_layout(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The state dict the published TRM would save for ``model``, its names written out by hand."""
    state = model.state_dict()
    out = {f"{prefix}embed_tokens.embedding_weight": state["core.embed_tokens.weight"],
           f"{prefix}lm_head.weight": state["core.lm_head.weight"], f"{prefix}q_head.weight": state["core.q_head.weight"],
           f"{prefix}q_head.bias": state["core.q_head.bias"], f"{prefix}H_init": state["core.H_init"],
           f"{prefix}L_init": state["core.L_init"], f"{prefix}puzzle_emb.weights": state["conditioner.weight"]}  # fmt: skip
    for i in range(len(model.core.blocks)):
        out[f"{prefix}L_level.layers.{i}.self_attn.qkv_proj.weight"] = state[f"core.blocks.{i}.mixer.qkv.weight"]
        out[f"{prefix}L_level.layers.{i}.self_attn.o_proj.weight"] = state[f"core.blocks.{i}.mixer.out.weight"]
        out[f"{prefix}L_level.layers.{i}.mlp.gate_up_proj.weight"] = state[f"core.blocks.{i}.mlp.gate_up.weight"]
        out[f"{prefix}L_level.layers.{i}.mlp.down_proj.weight"] = state[f"core.blocks.{i}.mlp.down.weight"]
    return out


@pytest.mark.parametrize("prefix", ["_orig_mod.model.inner.", "model.inner."])  # compiled, plain
def test_published_trm_weights_start_a_run(tiny_dataset, tmp_path, prefix):
    from trm.train import build_model

    cfg, _ = compose("cfg_pretrain", tiny_overrides(tiny_dataset, tmp_path / "r"))
    torch.manual_seed(123)
    source = build_model(cfg, ArcSplit(tiny_dataset[0], "train").meta)
    with torch.no_grad():
        source.conditioner.weight.normal_()  # a trained table, not the zero init
    torch.save(published_layout(source, prefix), tmp_path / "published.pt")
    loaded, averaged = checkpoint.initial_weights(str(tmp_path / "published.pt"))
    assert averaged is None
    assert loaded.keys() == source.state_dict().keys()
    for k, v in source.state_dict().items():
        assert torch.equal(loaded[k], v), k
    # A run started from them: after one step at a warm-up lr (1e-7; 1e-5 for the table) the weights
    # (and the EMA) are still the published ones, not the seed's.
    run(tiny_dataset, tmp_path / "r", f"init_from={tmp_path / 'published.pt'}", "max_steps=1", "lr_warmup_steps=1000")
    state = final_state(tmp_path / "r")
    for k, v in source.state_dict().items():
        torch.testing.assert_close(state["model"][k], v, atol=2e-5, rtol=0, msg=k)
    for shadow, p in zip(state["ema"]["shadow"], [p for p in source.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(shadow, p, atol=1e-5, rtol=0)
    # max_steps=0: the published weights evaluated as they are, no training step.
    summary = run(tiny_dataset, tmp_path / "eval", f"init_from={tmp_path / 'published.pt'}", "max_steps=0")
    assert summary["step"] == 0 and 0 <= summary["ARC/pass@2"] <= 1 and "eval/train/exact_accuracy" in summary
    state = final_state(tmp_path / "eval")
    for k, v in source.state_dict().items():
        assert torch.equal(state["model"][k], v), k


@pytest.mark.parametrize("entry", ["pretrain", "encoder"])
def test_a_run_directory_as_init_from_evaluates_its_averaged_weights(tiny_dataset, tmp_path, entry):
    """init_from=<run dir> takes its latest checkpoint's EMA weights, the ones its evaluations used:
    evaluating them without training (max_steps=0) gives the run's final evaluation again."""
    extra = ("lr=1e-3", "eval.reliance=false")
    trained = run(tiny_dataset, tmp_path / "r", *extra, entry=entry)
    again = run(tiny_dataset, tmp_path / "eval", *extra, f"init_from={tmp_path / 'r'}", "max_steps=0", entry=entry)
    evaluated = [k for k in trained if k.startswith(("eval/", "ARC/"))]
    assert len(evaluated) > 5 and {k: again[k] for k in evaluated} == {k: trained[k] for k in evaluated}


def test_a_published_variant_this_model_lacks_is_named(tmp_path):
    torch.save({"model.inner.embed_pos.embedding_weight": torch.zeros(3, 2)}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match="tensor model.inner.embed_pos.embedding_weight has no counterpart"):
        checkpoint.initial_weights(str(tmp_path / "p.pt"))


@pytest.mark.slow
def test_ctrl_c_saves_and_says_where_in_one_line(tiny_dataset, tmp_path):
    args = tiny_overrides(tiny_dataset, tmp_path / "r", "epochs=400", "log_interval=1")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "pretrain.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not ((tmp_path / "r" / "metrics.jsonl").exists() and len(read_rows(tmp_path / "r")) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    step = final_state(tmp_path / "r")["step"]
    # between two steps, or during an evaluation (then "during the evaluation at step N")
    assert last.startswith("stopped by SIGINT ") and f"at step {step}; checkpoint {tmp_path / 'r' / 'checkpoints'}" in last
    assert not (tmp_path / "r" / "summary.json").exists()


def test_a_schedulers_signal_saves_first_then_reaches_its_own_handler(tiny_dataset, tmp_path, monkeypatch):
    """submitit asks a Slurm job to requeue with SIGUSR2 through a handler of its own: the run saves
    a checkpoint at the next step, then hands the signal to that handler (which would requeue the
    job); the requeued command resumes from the checkpoint."""
    extra = ("lr=1e-3", "log_interval=1", "checkpoint_interval=1000")
    seen = []

    def requeue(signum, frame):  # stands for submitit's handler
        seen.append((signum, final_state(tmp_path / "r")["step"]))

    previous = signal.signal(signal.SIGUSR2, requeue)
    healthy = train_module.train_step

    def warned(model, carry, batch, opt, cfg, step, *rest):
        out = healthy(model, carry, batch, opt, cfg, step, *rest)
        if step == 4:
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    try:
        monkeypatch.setattr(train_module, "train_step", warned)
        with pytest.raises(Interrupted, match="stopped by SIGUSR2 at step 4"):
            run(tiny_dataset, tmp_path / "r", *extra)
        assert seen == [(signal.SIGUSR2, 4)]  # called once, with the step-4 checkpoint already written
        assert signal.getsignal(signal.SIGUSR2) is requeue  # restored
    finally:
        signal.signal(signal.SIGUSR2, previous)
    monkeypatch.setattr(train_module, "train_step", healthy)
    assert run(tiny_dataset, tmp_path / "r", *extra)["step"] == final_state(tmp_path / "r")["step"] > 4


def test_a_second_command_on_a_running_run_directory_is_refused(tiny_dataset, tmp_path, monkeypatch):
    """While a run trains, its directory's lock is held: another command on it (here a second
    holder of the lock, as another host's process would be) is refused naming the holder; the run
    itself is untouched and the lock is free once it ends."""
    from trm.filelock import LockHeld, exclusive

    refusals = []
    healthy = train_module.train_step

    def step_and_knock(*args, **kwargs):
        try:
            with exclusive(tmp_path / "r", "run directory r", wait=False):
                pass
        except LockHeld as e:
            refusals.append(str(e))
        return healthy(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step_and_knock)
    run(tiny_dataset, tmp_path / "r", "max_steps=2")
    assert len(refusals) == 2 and f"pid {os.getpid()}" in refusals[0] and socket.gethostname() in refusals[0]
    with exclusive(tmp_path / "r", "run directory r", wait=False):  # free again
        pass


def test_a_run_directory_in_use_elsewhere_is_refused_and_left_alone(tiny_dataset, tmp_path):
    from trm.filelock import LockHeld

    run(tiny_dataset, tmp_path / "r", "max_steps=2")
    before = folder_hash(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "r")], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=rf"run directory {tmp_path / 'r'} is in use by host .* pid {holder.pid} since"):
            run(tiny_dataset, tmp_path / "r")
    finally:
        holder.kill()
        holder.wait()
    assert folder_hash(tmp_path / "r") == before
    resumed = run(tiny_dataset, tmp_path / "r")  # the holder gone (killed), the run resumes
    assert resumed["step"] == resumed["total_steps"] > 2


HOLD_LOCK = """
import sys, time
from trm.filelock import exclusive
with exclusive(sys.argv[1], "x", wait=False):
    print("held", flush=True)
    time.sleep(600)
"""


def test_two_builds_of_one_dataset_wait_for_each_other(tiny_dataset, tmp_path):
    """Two processes asked for a missing dataset while a third builds it (holds the lock): both
    wait, then one builds and the other uses its folder; nothing is built twice."""
    from trm.filelock import exclusive

    out = tmp_path / "data" / "set"
    code = ("import sys; from trm.data.build import BuildOptions, ensure_dataset; "
            f"ensure_dataset(BuildOptions(**{tiny_dataset[1].model_dump()!r}), sys.argv[1])")  # fmt: skip
    with exclusive(tmp_path / "data" / "set", "the build", wait=False):
        command = [sys.executable, "-c", code, str(out)]
        builders = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        for b in builders:
            assert b.stdout.readline().startswith(f"waiting for host {socket.gethostname()} pid {os.getpid()}")
        assert not out.exists()
    logs = [b.communicate(timeout=120)[0] for b in builders]
    assert [b.returncode for b in builders] == [0, 0]
    assert sum(log.count(f"built {out}") for log in logs) == 1, logs
    assert ArcSplit(out, "train").num_examples == ArcSplit(tiny_dataset[0], "train").num_examples


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import errno

    import trm.filelock as filelock

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(filelock.fcntl, "flock", no_locks)
    ran = []
    with filelock.exclusive(tmp_path / "d" / "x", "the build of x", wait=True):
        ran.append(True)
    warning = f"warning: {tmp_path / 'd'} does not support file locks (No locks available); the build of x is not locked"
    assert ran and warning in capsys.readouterr().err
