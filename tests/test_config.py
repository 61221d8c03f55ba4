import json
import os
import subprocess
import sys

import pytest

from trm.cli import compose, normalise_overrides
from trm.config import ConfigError, TrainConfig, plan_run
from trm.rundir import default_run_name

from helpers import ROOT


def test_e0v2_is_the_plans_setting():
    cfg, raw = compose("cfg_pretrain", ["experiment=E0v2"])
    assert (cfg.data.num_train_groups, cfg.data.num_eval_groups) == (32, 32)
    assert (cfg.global_batch_size, cfg.epochs, cfg.eval_interval) == (256, 100000, 10000)
    assert cfg.data.split == "trm" and cfg.arch.hidden_size == 512 and cfg.lr == 1e-4
    assert raw["experiment"] == "E0v2" and raw["run_name"] is None  # named when the run starts
    assert default_run_name(raw).startswith("E0v2-")


def test_the_plans_command_line_spellings_compose():
    cfg, raw = compose("cfg_pretrain", ["+experiment=E0v2", "lr=3e-5", "grad_clip_norm=1.0", "+run_name=E0v2"])
    assert cfg.lr == 3e-5 and cfg.grad_clip_norm == 1.0 and cfg.run_name == "E0v2"
    cfg, _ = compose("cfg_pretrain", ["experiment=E0v2", "run_name=x", "run_dir=/tmp/somewhere"])
    assert cfg.run_name == "x" and cfg.run_dir == "/tmp/somewhere"
    assert normalise_overrides(["+experiment=E1", "preset=cpu", "run_name=a", "+run_name=b", "++lr=1"]) == [
        "experiment=E1", "preset=cpu", "+run_name=a", "+run_name=b", "++lr=1"]


def test_cpu_preset_shrinks_sizes_but_keeps_the_experiments_changes():
    cfg, _ = compose("cfg_pretrain", ["experiment=E0v2", "preset=cpu", "lr=3e-5"])
    assert cfg.data.max_grid_size == 10 and cfg.arch.hidden_size <= 256 and cfg.global_batch_size < 256
    assert cfg.lr == 3e-5  # the experiment's lr stays; the preset scales every lr by lr_scale
    assert cfg.lr_scale > 1


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigError, match=r"arch\.hidden_sizee: unknown key"):
        compose("cfg_pretrain", ["+arch.hidden_sizee=3"])


@pytest.mark.parametrize("entry", ["cfg_pretrain", "cfg_pretrain_encoder"])
@pytest.mark.parametrize("key", ["+epoch=3", "+eval.reliance_typo=1", "+data.max_grid=10"])
def test_unknown_keys_at_any_level_are_refused_by_both_entry_points(entry, key):

    experiment = "E1v2" if entry == "cfg_pretrain_encoder" else "E0v2"
    name = key[1:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{name.replace('.', '[.]')}: unknown key"):
        compose(entry, [f"experiment={experiment}", key])


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigError, match=r"global_batch_size: .*integer"):
        compose("cfg_pretrain", ["global_batch_size=abc"])
    with pytest.raises(ConfigError, match=r"arch\.forward_dtype"):
        compose("cfg_pretrain", ["arch.forward_dtype=float8"])


def test_encoder_keys_are_unknown_to_the_puzzle_embedding_model():
    with pytest.raises(ConfigError, match="encoder_type: unknown key"):
        compose("cfg_pretrain", ["+arch.encoder_type=standard"])


def test_steps_come_from_examples_not_groups():
    cfg = TrainConfig(global_batch_size=256, epochs=100000, eval_interval=10000)
    plan = plan_run(cfg, examples_per_epoch=250, world_size=4)
    assert plan.total_steps == 100000 * 250 // 256 and plan.local_batch_size == 64
    evaluations = [s for s in range(1, plan.last_step + 1) if plan.evaluates_at(s)]
    assert evaluations == [k * 10000 * 250 // 256 for k in range(1, 11)] and evaluations[-1] == plan.total_steps
    with pytest.raises(ConfigError, match="not divisible by 3 ranks"):
        plan_run(cfg, 250, world_size=3)


def test_the_last_interval_ends_at_the_last_step():
    # 20 epochs of 9,008 examples in batches of 32 are 5,630 steps; an interval of 5 epochs is
    # 1,407.5 steps: evaluations where each interval ends, the fourth being the final one (counting
    # whole intervals of 1,407 steps put one at 5,628 and another at 5,630).
    plan = plan_run(TrainConfig(global_batch_size=32, epochs=20, eval_interval=5), 9008, world_size=1)
    assert [s for s in range(1, 6000) if plan.evaluates_at(s)] == [1407, 2815, 4222, 5630]
    cut = plan_run(TrainConfig(global_batch_size=32, epochs=20, eval_interval=5, max_steps=3000), 9008, world_size=1)
    assert [s for s in range(1, 6000) if cut.evaluates_at(s)] == [1407, 2815, 3000]
    once = plan_run(TrainConfig(global_batch_size=32, epochs=20, eval_interval=None), 9008, world_size=1)
    assert [s for s in range(1, 6000) if once.evaluates_at(s)] == [5630]
    every = plan_run(TrainConfig(global_batch_size=32, epochs=20, eval_interval=1), 8, world_size=1)  # 1 epoch < 1 batch
    assert all(every.evaluates_at(s) for s in range(1, every.last_step + 1))


FAMILY_EXPERIMENTS = sorted(p.stem for p in (ROOT / "config" / "experiment").glob("*_families.yaml"))


@pytest.mark.parametrize("experiment", FAMILY_EXPERIMENTS)
def test_family_benchmark_experiments_keep_their_changes_at_both_sizes(experiment):

    entry = "cfg_pretrain" if experiment.startswith("E0v2") else "cfg_pretrain_encoder"
    plain, _ = compose(entry, [f"experiment={experiment.removesuffix('_families')}"])
    for preset in ([], ["preset=cpu_families"]):
        cfg, raw = compose(entry, [f"experiment={experiment}", *preset])
        assert raw["experiment"] == experiment
        assert cfg.data.split == "heldout" and cfg.data.train_sources == ["families/train"]
        assert cfg.data.eval_sources == ["families/unseen_params", "families/unseen_families"]
        assert cfg.data.num_train_groups is None and cfg.data.num_eval_groups is None  # E0v2's 32 groups undone
        if entry == "cfg_pretrain_encoder":  # the experiment's own change survives benchmark and preset
            for key in ("conditioner", "encoder_type", "encoder_pooling_method", "freeze_encoder", "encoder_pair_layout",
                        "kl_weight", "contrastive_weight", "latent_steps", "rope_2d", "relative_2d"):
                assert getattr(cfg.arch, key) == getattr(plain.arch, key), key
        if preset:
            assert cfg.data.max_grid_size <= 10 and cfg.arch.hidden_size <= 128 and cfg.data.families.train_tasks <= 5000
        else:
            assert cfg.data.max_grid_size == 30 and cfg.data.families.train_tasks == 20000 and cfg.arch.hidden_size == 512


def test_help_lists_every_key_with_its_value_and_description():
    from encoders.config import EncoderArchConfig
    from trm.cli import schema_keys

    keys = schema_keys(TrainConfig, arch=EncoderArchConfig)
    assert all(description for _, description in keys), [k for k, d in keys if not d]
    out = subprocess.run([sys.executable, "pretrain_encoder.py", "experiment=E1v2", "preset=cpu", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    assert "experiment=...: E0v2," in out and "E_diag1" in out and "preset=...: cpu, cpu_arc10, cpu_families, cpu_multifamily" in out
    lines = {line.split(" = ")[0].strip(): line for line in out.splitlines() if " = " in line}
    assert set(lines) == {k for k, _ in keys}
    assert lines["arch.hidden_size"].split("#")[0].split("=")[1].strip() == "64"  # the preset's value
    assert "# rules that end a failing run" in lines["early_stop"] and "eval/train/exact_accuracy" in lines["early_stop"]


def test_sweep_names_runs_after_swept_values_and_survives_a_failed_job(tiny_dataset, tmp_path):
    from helpers import tiny_overrides

    args = tiny_overrides(tiny_dataset, tmp_path / "sw", "max_steps=2", "eval.reliance=false")
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "-m", *args, "lr=-1,0.001", "seed=0,1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 1
    assert "sweep: 2 job(s) failed" in proc.stderr and proc.stderr.count("lr: Input should be greater than 0") == 2
    for seed in (0, 1):  # the other two ran to the end, each in a folder naming its values
        assert json.loads((tmp_path / f"sw-lr=0.001-seed={seed}" / "summary.json").read_text())["step"] == 2
    assert list((tmp_path / "runs" / "sweeps").glob("*/multirun.yaml"))
