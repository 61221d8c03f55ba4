"""The GPU fast path (marked ``gpu``, deselected by default; ``pytest -m gpu`` on a CUDA machine, or
``bash scripts/gpu_check.sh``, which runs these too)."""

import pytest
import torch

from trm.cli import compose
from trm.train import train

from helpers import assert_bf16_runs_agree, one_and_two_ranks, read_rows, tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run(tiny_dataset, run_dir, entry, *extra):
    overrides = tiny_overrides(tiny_dataset, run_dir, "device=cuda", "log_interval=1", "arch.halt_exploration_prob=0", *extra)
    if entry == "encoder":
        overrides = [o.replace("experiment=E0v2", "experiment=E1v2") for o in overrides] + ["data.split=trm"]
        return train(*compose("cfg_pretrain_encoder", overrides))
    return train(*compose("cfg_pretrain", overrides))


@pytest.mark.parametrize("entry", ["pretrain", "encoder"])
def test_a_compiled_run_gives_the_eager_loss(tiny_dataset, tmp_path, entry):
    """bf16 autocast both: the compiled core (and encoder) follow the eager loss at every step
    within bf16 tolerance, and end at the same train accuracy within it."""
    run(tiny_dataset, tmp_path / "eager", entry, "compile=false")
    run(tiny_dataset, tmp_path / "compiled", entry, "compile=true")
    eager, compiled = read_rows(tmp_path / "eager"), read_rows(tmp_path / "compiled")
    losses = [(a["train/lm_loss"], b["train/lm_loss"]) for a, b in zip(eager, compiled) if "train/lm_loss" in a]
    assert len(losses) >= 10
    for step, (a, b) in enumerate(losses, 1):
        assert b == pytest.approx(a, rel=3e-2), f"step {step}: eager {a}, compiled {b}"


@pytest.mark.parametrize("entry", ["pretrain", "encoder", "encoder-padded"])
def test_the_training_step_never_synchronises_with_the_host(tiny_dataset, tmp_path, entry):
    """torch.cuda's sync debug mode raises at any synchronising call (a blocking copy, .item(),
    nonzero) inside the step; the feed's wait for the halting flags is a CUDA event, which it
    allows. The padded demonstrations' ``nonzero`` is caught: the check can fail."""
    from trm.config import plan_run
    from trm.data.dataset import ArcSplit, EpochSampler
    from trm.data.pipeline import TrainFeed
    from trm.ema import EMA
    from trm.train import Optimisers, build_model, fast_path, train_step

    overrides = tiny_overrides(tiny_dataset, tmp_path / "r", "device=cuda", "compile=false")
    if entry == "encoder-padded":
        overrides.append("arch.encoder_packing=false")
    if entry.startswith("encoder"):
        overrides = [o.replace("experiment=E0v2", "experiment=E1v2") for o in overrides] + ["data.split=trm"]
        cfg, _ = compose("cfg_pretrain_encoder", overrides)
    else:
        cfg, _ = compose("cfg_pretrain", overrides)
    split = ArcSplit(tiny_dataset[0], "train")
    device = torch.device("cuda")
    model = build_model(cfg, split.meta).to(device)
    opt, ema, plan = Optimisers(cfg, model), EMA(model, cfg.ema_rate), plan_run(cfg, split.examples_per_epoch, 1)
    autocast = fast_path(cfg, model, device)
    feed = TrainFeed(split, EpochSampler(split, cfg.global_batch_size, cfg.seed), slice(0, cfg.global_batch_size),
                     model.conditioner.demos, device)  # fmt: skip
    carry, caught = None, None
    for step in range(1, 7):
        slots = (carry.halted, carry.data.get("demo_rows")) if carry is not None else ()
        batch = feed.next(*slots)
        carry = carry or model.initial_carry(batch)
        if step > 3:  # after warm-up (first allocations, lazy initialisation)
            torch.cuda.set_sync_debug_mode("error")
        try:
            carry, _, _, ok = train_step(model, carry, batch, opt, cfg, step, plan, autocast, feed)
            ema.update(ok)
        except RuntimeError as e:
            caught = e
            break
        finally:
            torch.cuda.set_sync_debug_mode("default")
    feed.close()
    if entry == "encoder-padded":
        assert caught is not None and "synchroniz" in str(caught)
    else:
        assert caught is None, caught


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("experiment", ["E0v2", "E1v2"])
def test_two_gpus_under_ddp_train_as_one(tiny_dataset, tmp_path, experiment):
    """The fast path (compiled, bf16 autocast) under DDP on two GPUs (NCCL) follows one GPU within
    bf16 rounding, as the CPU test shows for gloo."""
    one, two = one_and_two_ranks(tiny_dataset, tmp_path, experiment, ["ddp=true"], "device=cuda", "compile=true")
    assert_bf16_runs_agree(one, two)
