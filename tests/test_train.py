import functools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from trm.cli import compose
from trm.config import ArchConfig, TrainConfig, plan_run
from trm.data.tasks import load_source
from trm.train import MetricWindow, Optimisers, build_model, train, train_step

from helpers import (
    assert_bf16_runs_agree,
    final_state,
    loss_rows,
    one_and_two_ranks,
    optimiser_tensors,
    read_rows,
    tiny_overrides,
)



def run(tiny_dataset, run_dir, *extra):
    cfg, raw = compose("cfg_pretrain", tiny_overrides(tiny_dataset, run_dir, *extra))
    return train(cfg, raw)


def examples_per_epoch_by_hand(dataset_dir) -> int:
    """One version of every training group per epoch: each training task gives all its pairs, each
    evaluation task (trm mode) its demonstration pairs; counted from the task files themselves."""
    info = json.loads((Path(dataset_dir) / "build.json").read_text())
    tasks = {t.name: t for s in ("arc-agi-1/training", "arc-agi-1/evaluation") for t in load_source(s)}
    names = info["tasks"]
    train, evals = names[: info["num_train_tasks"]], names[info["num_train_tasks"] :]
    return sum(len(tasks[n].demos) + len(tasks[n].tests) for n in train) + sum(len(tasks[n].demos) for n in evals)


def lr_by_hand(step, base, warmup, total, floor):
    if step < warmup:
        return base * step / warmup
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))


def test_a_run_writes_its_directory(tiny_dataset, tmp_path):
    run_dir = tmp_path / "r"
    summary = run(tiny_dataset, run_dir, "log_interval=1", "lr_min_ratio=0.1", "lr=1e-3")
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    per_epoch = examples_per_epoch_by_hand(tiny_dataset[0])
    total = 4 * per_epoch // 8  # epochs=4 x examples per epoch / global batch 8
    assert summary["step"] == summary["total_steps"] == total

    rows = read_rows(run_dir)
    train_rows = {r["step"]: r for r in rows if "train/lr" in r}
    eval_rows = {r["step"]: r for r in rows if "eval/train/exact_accuracy" in r}
    assert sorted(train_rows) == list(range(1, total + 1))  # log_interval=1
    every = 2 * per_epoch // 8  # eval_interval=2 epochs
    assert sorted(eval_rows) == [every, 2 * every] and 2 * every == total
    # The cosine schedule runs over exactly the run's steps and ends at its floor.
    for step, r in train_rows.items():
        assert r["train/lr"] == pytest.approx(lr_by_hand(step, 1e-3, 2, total, 0.1), rel=1e-12), step
    assert train_rows[total]["train/lr"] == pytest.approx(1e-4, rel=1e-12)
    for r in train_rows.values():
        assert math.isfinite(r["train/lm_loss"]) and r["train/lm_loss"] > 0
        assert r["grad/total_norm"] > 0 and r["timing/samples_per_sec"] > 0
        assert r["grad/total_norm"] == pytest.approx(math.hypot(r["grad/trm_norm"], r["grad/encoder_norm"]), rel=1e-6)
        if "train/steps" in r:  # only where some slot halted
            assert 1 <= r["train/steps"] <= 3 and 0 <= r["train/accuracy"] <= 1
    # Evaluation: every example of the first version of each group; the test pairs of both versions.
    tasks = {t.name: t for t in load_source("arc-agi-1/evaluation")}
    info = json.loads((tiny_dataset[0] / "build.json").read_text())
    test_pairs = sum(len(tasks[n].tests) for n in info["tasks"][info["num_train_tasks"] :])
    last = eval_rows[total]
    assert last["eval/train/examples"] == per_epoch
    assert last["eval/test/examples"] == 2 * test_pairs and last["eval/test/tasks"] == 2
    for key in ("eval/train/exact_accuracy", "eval/test/accuracy", "ARC/pass@2"):
        assert 0 <= last[key] <= 1
        assert summary[key] == last[key]
    assert json.loads((run_dir / "summary.json").read_text()) == pytest.approx(summary)
    state = final_state(run_dir)
    assert state["step"] == total and state["sampler"]["epoch"] == 4 and state["sampler"]["offset"] == 0
    cfg, raw = compose("cfg_pretrain", tiny_overrides(tiny_dataset, run_dir, "log_interval=1", "lr_min_ratio=0.1", "lr=1e-3"))
    assert state["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: v for k, v in state["config"].items() if k != "run_name"} == {k: v for k, v in raw.items() if k != "run_name"}


def test_resume_continues_exactly(tiny_dataset, tmp_path, monkeypatch):
    """A run stopped at step 6 and resumed equals the run straight through: weights, optimiser
    moments, EMA, sampler position, random-number state, ACT carry and every logged training
    metric. Halting exploration matters here: the Q-head starts at +5 (halt at once) and each slot
    draws its minimum number of steps with probability 0.5, from the random stream."""
    import trm.train as train_module

    build = train_module.build_model

    def eager_to_halt(cfg, metadata):
        model = build(cfg, metadata)
        with torch.no_grad():
            model.core.q_head.bias.fill_(5.0)
        return model

    monkeypatch.setattr(train_module, "build_model", eager_to_halt)
    extra = ("arch.halt_exploration_prob=0.5", "lr=1e-3", "lr_min_ratio=0.1")  # cosine: the schedule shows
    run(tiny_dataset, tmp_path / "straight", *extra)
    run(tiny_dataset, tmp_path / "split", *extra, "max_steps=6")
    assert final_state(tmp_path / "split")["step"] == 6
    run(tiny_dataset, tmp_path / "split", *extra)  # resumes from step 6
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] > 6 and a["sampler"] == b["sampler"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    for x, y in zip(optimiser_tensors(a) + a["ema"]["shadow"], optimiser_tensors(b) + b["ema"]["shadow"], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    own = [torch.load(Path(d) / "checkpoints" / (Path(d) / "checkpoints" / "latest").read_text() / "rank_0.pt",
                      weights_only=False) for d in (tmp_path / "straight", tmp_path / "split")]  # fmt: skip
    assert torch.equal(own[0]["rng"]["torch"], own[1]["rng"]["torch"])
    for k in ("z_H", "z_L", "steps", "halted"):
        assert torch.equal(own[0]["carry"][k], own[1]["carry"][k]), k
    # Every logged training metric, step by step (timing aside).
    def train_metrics(run_dir):
        return {r["step"]: {k: v for k, v in r.items() if k.startswith(("train/", "grad/", "encoder/"))}
                for r in read_rows(run_dir) if "train/lr" in r}  # fmt: skip

    straight, split = train_metrics(tmp_path / "straight"), train_metrics(tmp_path / "split")
    assert straight == split
    explored = [r["train/steps"] for r in straight.values() if "train/steps" in r]
    assert any(s > 1 for s in explored), "no slot explored: the test does not exercise the random stream"


def test_train_metrics_count_only_the_samples_that_halt():
    """Of 4 slots, 3 halt at their second step and one restarts: accuracy, exact accuracy,
    q_halt accuracy and steps are averaged over the 3 halted slots; losses over all 4."""
    cfg = TrainConfig(arch=ArchConfig(hidden_size=16, num_heads=2, H_cycles=1, L_cycles=1, puzzle_emb_len=1,
                                      halt_max_steps=2, halt_exploration_prob=0.0),
                      global_batch_size=4, lr_warmup_steps=0, ema=False)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, {"vocab_size": 12, "seq_len": 9, "num_puzzle_identifiers": 5})
    opt, plan = Optimisers(cfg, model), plan_run(cfg, examples_per_epoch=8, world_size=1)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(2, 12, (4, 9), generator=g)
    labels[:, 6:] = -100  # three ignored cells per example
    batch = {"inputs": torch.randint(2, 12, (4, 9), generator=g, dtype=torch.int32), "labels": labels,
             "puzzle_identifiers": torch.arange(1, 5, dtype=torch.int32), "task_ids": torch.arange(4)}  # fmt: skip
    outputs = []
    model.register_forward_hook(lambda module, args, result: outputs.append(result[1]))
    autocast = functools.partial(torch.autocast, "cpu", enabled=False)

    carry, first, _, ok = train_step(model, model.initial_carry(batch), batch, opt, cfg, 1, plan, autocast)
    assert not carry.halted.any()  # q_halt = -5: only the step limit halts
    window = MetricWindow()
    window.add(first, ok)
    assert "train/steps" not in window.reduce(4)  # nothing halted: no value, not 0

    carry.halted[0] = True  # slot 0 restarts with the next example; slots 1-3 reach step 2 and halt
    carry, second, _, ok = train_step(model, carry, batch, opt, cfg, 2, plan, autocast)
    assert carry.halted.tolist() == [False, True, True, True]
    window.add(second, ok)
    got = window.reduce(4)
    out = outputs[-1]
    halted = [1, 2, 3]
    correct = (out.logits.argmax(-1) == labels)[:, :6].float()
    assert got["train/steps"] == 2.0
    assert got["train/accuracy"] == pytest.approx(correct[halted].mean().item())
    assert got["train/exact_accuracy"] == pytest.approx(correct[halted].min(1).values.mean().item())
    q_right = [(out.q_halt[i] >= 0).item() == bool(correct[i].min() == 1) for i in halted]
    assert got["train/q_halt_accuracy"] == pytest.approx(sum(q_right) / 3)
    # The loss is per sample over every slot: stablemax cross-entropy, mean over valid cells.
    x = out.logits.detach().double()
    s = torch.where(x < 0, 1 / (1 - x), x + 1)
    nll = -torch.log(s.gather(-1, labels.clamp_min(0)[..., None])[..., 0] / s.sum(-1))[:, :6]
    assert got["train/lm_loss"] == pytest.approx(nll.mean(1).sum().item() / 4, rel=1e-9)


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


# Both reducers for the puzzle embedding (E0v2), the encoder (E1v2) and a frozen encoder (E_diag1:
# weights without gradient, which DDP must leave alone); DDP for every other encoder, pooling and
# pair layout of the plan (each with its own parameters DDP must find used), the conditioners that
# read every cell, the contrastive objective (its candidates gathered from every rank) and latent
# steps (differentiated through: a gradient of a gradient under DDP), and the offset prior with the
# colour map.
REDUCER_CASES = [(e, r) for e in ("E0v2", "E1v2", "E_diag1") for r in ("all-reduce", "ddp")] + [
    (e, "ddp") for e in ("E2_lpn", "E7_attention", "E8_pool_cls", "E13_overlay", "E_diag3_identity", "E14_in_context",
                         "E15_token_set", "E16_contrastive", "E17_latent_steps", "E23_offset_colour")] + [
    ("E16_contrastive", "all-reduce")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("experiment, reducer", REDUCER_CASES)
def test_torchrun_two_ranks_matches_one_rank(tiny_dataset, tmp_path, experiment, reducer):
    """Data parallel on CPU (gloo): two ranks splitting the global batch train as one rank: the
    same loss at every step, and the same weights, optimiser state and EMA at the end
    (puzzle-embedding rows of equal ids summed across ranks before their sign-SGD update); the final
    evaluation (split across ranks, votes gathered) gives the same accuracies and pass@k."""
    one, two = one_and_two_ranks(tiny_dataset, tmp_path, experiment, [f"ddp={reducer == 'ddp'}"])
    a, b = final_state(one), final_state(two)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    for x, y in zip(optimiser_tensors(a) + a["ema"]["shadow"], optimiser_tensors(b) + b["ema"]["shadow"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    for x, y in zip(loss_rows(one), loss_rows(two)):
        assert x["train/lm_loss"] == pytest.approx(y["train/lm_loss"], rel=1e-4), x["step"]
    first, second = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    evaluated = [k for k in first if k.startswith(("eval/", "ARC/")) and "_ms_" not in k and k != "timing/eval_seconds"]
    assert "ARC/pass@2" in evaluated and "eval/test/accuracy" in evaluated
    for key in evaluated:
        assert first[key] == pytest.approx(second[key], rel=1e-4, abs=1e-9), key


@pytest.mark.slow
def test_the_variational_encoder_trains_under_ddp(tiny_dataset, tmp_path):
    """E3_lpn_var draws its latent noise per rank, so two ranks cannot follow one; they must train
    under DDP (every parameter used, or DDP raises at the next step), with finite losses and
    weights, its KL term logged."""
    _, two = one_and_two_ranks(tiny_dataset, tmp_path, "E3_lpn_var", ["ddp=true"])
    rows = loss_rows(two)
    assert all(math.isfinite(r["train/lm_loss"]) and r["train/kl"] > 0 for r in rows)
    assert all(torch.isfinite(v).all() for v in final_state(two)["model"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["E0v2", "E1v2"])
def test_the_compiled_bf16_model_under_ddp_trains_as_one_rank(tiny_dataset, tmp_path, experiment):
    """The GPU fast path under DDP, on CPU: the core (and the encoder's pair transformer) compiled,
    the forward pass under bf16 autocast, both runs; two ranks follow one within bf16 rounding
    (:func:`assert_bf16_runs_agree`; with gradients left unreduced this fails at step 1)."""
    one, two = one_and_two_ranks(tiny_dataset, tmp_path, experiment, ["ddp=true"], "compile=true",
                                 "arch.forward_dtype=bfloat16")  # fmt: skip
    assert_bf16_runs_agree(one, two)


def poison_loss(monkeypatch, bad_steps):
    """Make the loss of the given training steps NaN (so is every gradient)."""
    import trm.train as train_module

    healthy, calls = train_module.total_loss, [0]

    def poisoned(out, carry):
        loss, sums = healthy(out, carry)
        calls[0] += 1
        return (loss * float("nan") if calls[0] in bad_steps else loss), sums

    monkeypatch.setattr(train_module, "total_loss", poisoned)


def checkpoint_state(run_dir, step):
    return torch.load(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "state.pt", weights_only=False)


def assert_same_state(a, b):
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    for x, y in zip(optimiser_tensors(a) + a["ema"]["shadow"], optimiser_tensors(b) + b["ema"]["shadow"], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_non_finite_step_is_skipped_and_counted(tiny_dataset, tmp_path, monkeypatch):
    poison_loss(monkeypatch, {3})
    summary = run(tiny_dataset, tmp_path / "r", "log_interval=1", "checkpoint_interval=1", "keep_checkpoints=100", "lr=1e-3")
    assert_same_state(checkpoint_state(tmp_path / "r", 2), checkpoint_state(tmp_path / "r", 3))  # nothing moved
    after = checkpoint_state(tmp_path / "r", 4)
    assert not torch.equal(after["model"]["core.lm_head.weight"], checkpoint_state(tmp_path / "r", 3)["model"]["core.lm_head.weight"])
    rows = {r["step"]: r for r in read_rows(tmp_path / "r") if "train/lr" in r}
    assert "train/lm_loss" not in rows[3] and "grad/total_norm" not in rows[3]  # the skipped step's metrics left out
    assert [rows[s]["train/skipped_steps"] for s in (2, 3, 4)] == [0, 1, 1] and summary["train/skipped_steps"] == 1
    assert all(math.isfinite(v) for r in rows.values() for k, v in r.items() if isinstance(v, float))
    assert summary["step"] == summary["total_steps"] and all(torch.isfinite(v).all() for v in after["model"].values())


def test_a_non_finite_recursion_state_is_not_carried_on(tiny_dataset, tmp_path, monkeypatch):
    """A NaN reaching the ACT carry makes the next step non-finite; that step is skipped and every
    slot restarts, so one step is lost, not the up to halt_max_steps (3) a NaN slot would run."""
    import trm.train as train_module

    healthy = train_module.train_step

    def nan_state_after_step_4(model, carry, batch, opt, cfg, step, *rest):
        carry, metrics, lrs, ok = healthy(model, carry, batch, opt, cfg, step, *rest)
        if step == 4:  # mid-way: without exploration every slot halts at steps 3, 6, ...
            carry.z_H.fill_(float("nan"))
        return carry, metrics, lrs, ok

    monkeypatch.setattr(train_module, "train_step", nan_state_after_step_4)
    summary = run(tiny_dataset, tmp_path / "r", "arch.halt_exploration_prob=0", "log_interval=1")
    rows = {r["step"]: r for r in read_rows(tmp_path / "r") if "train/lr" in r}
    assert [rows[s]["train/skipped_steps"] for s in (4, 5, 6, 7)] == [0, 1, 1, 1] and summary["train/skipped_steps"] == 1


def test_too_many_non_finite_steps_in_a_row_stop_the_run_with_its_checkpoint_intact(tiny_dataset, tmp_path, monkeypatch):
    poison_loss(monkeypatch, set(range(5, 1000)))
    extra = ("log_interval=1", "checkpoint_interval=1", "keep_checkpoints=100", "max_skipped_steps=3")
    with pytest.raises(FloatingPointError, match="3 steps in a row up to step 7 had a non-finite loss or gradient"):
        run(tiny_dataset, tmp_path / "r", *extra)
    # Steps 5 and 6 were checkpointed (the run stops at step 7 before its save), holding the weights
    # of step 4, the last good update.
    assert final_state(tmp_path / "r")["step"] == 6
    assert_same_state(checkpoint_state(tmp_path / "r", 4), final_state(tmp_path / "r"))
    assert all(torch.isfinite(v).all() for v in final_state(tmp_path / "r")["model"].values() if v.is_floating_point())
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["diverged"] is True


def test_context_diagnostics_against_plain_formulas():
    """Contexts of different scales, two tasks with two samples each: the cosine runs over pairs of
    samples of different tasks only, on normalised vectors; the norm is per context token."""
    from trm.train import context_diagnostics

    g = torch.Generator().manual_seed(0)
    context = torch.randn(5, 3, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])[:, None, None] + 0.5
    tasks = [0, 0, 1, 2, 1]
    got = {k: (s / c).item() for k, (s, c) in context_diagnostics(context, torch.tensor(tasks)).items()}
    flat = context.flatten(1).double().tolist()

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    pairs = [cosine(flat[i], flat[j]) for i in range(5) for j in range(5) if tasks[i] != tasks[j]]
    assert len(pairs) == 16
    assert got["encoder/cross_puzzle_cosine"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    norms = [math.sqrt(sum(x * x for x in context[b, p].tolist())) for b in range(5) for p in range(3)]
    assert got["encoder/output_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    columns = list(zip(*flat))
    stds = [math.sqrt(sum((x - sum(c) / 5) ** 2 for x in c) / 5) for c in columns]
    assert got["encoder/cross_sample_std"] == pytest.approx(sum(stds) / len(stds), rel=1e-5)


EARLY_STOP = "early_stop=[{metric:eval/train/exact_accuracy,below:%s,at_fraction:0.5}]"


def test_early_stopping_ends_a_failing_run_at_its_rule(tiny_dataset, tmp_path, capsys):
    """With an evaluation every epoch, the rule is checked from half the steps on: a bar above any
    accuracy stops the run at the first evaluation from there (saved and summarised), none before."""
    summary = run(tiny_dataset, tmp_path / "r", EARLY_STOP % 1.1, "eval_interval=1")
    total = summary["total_steps"]
    stopped = summary["step"]
    assert total / 2 <= stopped < total
    assert summary["stop_reason"].startswith("early stop: eval/train/exact_accuracy = ")
    assert f"< 1.1 at step {stopped}" in summary["stop_reason"]
    saved = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert saved["stop_reason"] == summary["stop_reason"]
    assert final_state(tmp_path / "r")["step"] == stopped  # the checkpoint of the stopping step
    evaluated = sorted({row["step"] for row in read_rows(tmp_path / "r") if "eval/train/exact_accuracy" in row})
    assert evaluated[-1] == stopped and all(s < total / 2 for s in evaluated[:-1])  # no earlier stop
    # Rerunning the command leaves the early-stopped run as it is.
    capsys.readouterr()
    again = run(tiny_dataset, tmp_path / "r", EARLY_STOP % 1.1, "eval_interval=1")
    assert again["step"] == stopped and "is finished" in capsys.readouterr().out


def test_early_stopping_leaves_a_run_above_its_bar_alone(tiny_dataset, tmp_path):
    summary = run(tiny_dataset, tmp_path / "r", EARLY_STOP % -1.0, "eval_interval=1")
    assert summary["step"] == summary["total_steps"] and summary["stop_reason"] == "finished"


def test_an_early_stop_rule_on_a_metric_evaluation_lacks_is_named(tiny_dataset, tmp_path):
    from trm.errors import InputError

    with pytest.raises(InputError, match="early_stop: metric 'eval/train/exact_acuracy' is not among"):
        run(tiny_dataset, tmp_path / "r", "early_stop=[{metric:eval/train/exact_acuracy,below:0.2,at_fraction:0.5}]")
