"""Training throughput of a configuration: times real training steps (ACT step, backward,
optimisers, EMA) after a warm-up, and prints samples/s.

    python scripts/bench_train.py experiment=E0v2 preset=cpu
    python scripts/bench_train.py experiment=E0v2 preset=cpu arch.hidden_size=512 arch.num_heads=8 global_batch_size=8
    python scripts/bench_train.py --entry cfg_pretrain_encoder experiment=E1v2 preset=cpu --steps 30
"""

from __future__ import annotations

import argparse
import functools
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trm.cli import compose  # noqa: E402
from trm.config import plan_run  # noqa: E402
from trm.data.build import ensure_dataset  # noqa: E402
from trm.data.dataset import ArcSplit, EpochSampler  # noqa: E402
from trm.distributed import setup  # noqa: E402
from trm.ema import EMA  # noqa: E402
from trm.train import Optimisers, _forward_dtype, _to_device, build_model, train_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entry", default="cfg_pretrain", help="config name: cfg_pretrain or cfg_pretrain_encoder")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args, overrides = p.parse_known_args()
    schema = None
    if args.entry == "cfg_pretrain_encoder":
        from encoders.config import EncoderTrainConfig as schema  # noqa: N813
    cfg, _ = compose(args.entry, overrides, *([schema] if schema else []))
    env = setup(cfg.device)
    data_dir = ensure_dataset(cfg.data.build_options(), cfg.data.resolved_path())
    split = ArcSplit(data_dir, "train")
    plan = plan_run(cfg, split.examples_per_epoch, env.world_size)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, split.meta).to(env.device)
    opt, ema = Optimisers(cfg, model), EMA(model, cfg.ema_rate)
    if cfg.compile:
        model.core.compile()
    sampler = EpochSampler(split, cfg.global_batch_size, cfg.seed)
    dtype = _forward_dtype(cfg, env.device)
    autocast = functools.partial(torch.autocast, env.device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()
    carry = None

    def step(i):
        nonlocal carry
        batch = _to_device(split.batch(sampler.next_indices()[: plan.local_batch_size], model.conditioner.needs_demos), env.device)
        carry = carry or model.initial_carry(batch)
        carry, metrics, _, ok = train_step(model, carry, batch, opt, cfg, i + 1, plan, autocast)
        ema.update(ok)
        return metrics

    for i in range(args.warmup):
        step(i)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        metrics = step(i)
    metrics["train/lm_loss"][0].item()  # wait for the device
    elapsed = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    device = torch.cuda.get_device_name() if env.device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    memory = (f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if env.device.type == "cuda"
              else f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")  # fmt: skip
    print(
        f"{device} | torch {torch.__version__} | {dtype} | hidden {cfg.arch.hidden_size}, seq "
        f"{cfg.arch.puzzle_emb_len + split.seq_len}, batch {plan.local_batch_size}, {n_params:,} parameters\n"
        f"{args.steps} steps in {elapsed:.2f} s: {1000 * elapsed / args.steps:.1f} ms/step, "
        f"{plan.local_batch_size * args.steps / elapsed:.1f} samples/s | {memory}"
    )


if __name__ == "__main__":
    main()
