"""This framework's puzzle-embedding TRM beside the published implementation, at the same
configuration and on the same batches: the model's part of a training step (one ACT supervision
step forward, the loss, backward) timed alternately in one process, the published weights copied
into this model (``trm/model/published.py``), so the two losses must agree too.

    git clone https://github.com/SamsungSAILMontreal/TinyRecursiveModels /path/to/published
    python scripts/bench_published.py --published /path/to/published experiment=E0v2 preset=cpu
    python scripts/bench_published.py --published /path/to/published experiment=E0v2 \\
        data.max_grid_size=30 data.num_augmentations=8 global_batch_size=8 --steps 6   # full size

The optimiser steps are left out of both timings: the published one (``adam_atan2``) ships CUDA
kernels only. Losses are compared at the first step (same weights, same batch); after it the
two ACT halting explorations draw different random numbers, so later steps differ.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trm.cli import compose  # noqa: E402
from trm.data.build import ensure_dataset  # noqa: E402
from trm.data.dataset import ArcSplit, EpochSampler  # noqa: E402
from trm.model.published import from_published  # noqa: E402
from trm.train import build_model, fast_path, total_loss  # noqa: E402


def published_model(path: Path, cfg, meta: dict, batch_size: int):
    """The published ACT model with its loss head, configured as ``cfg``."""
    sys.path.insert(0, str(path))
    from models.losses import ACTLossHead  # the published repository's modules
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1

    a = cfg.arch
    config = dict(batch_size=batch_size, seq_len=meta["seq_len"], puzzle_emb_ndim=a.hidden_size,
                  num_puzzle_identifiers=meta["num_puzzle_identifiers"], vocab_size=meta["vocab_size"],
                  H_cycles=a.H_cycles, L_cycles=a.L_cycles, H_layers=0, L_layers=a.L_layers, hidden_size=a.hidden_size,
                  expansion=a.expansion, num_heads=a.num_heads, pos_encodings="rope", rms_norm_eps=a.rms_norm_eps,
                  rope_theta=a.rope_theta, halt_max_steps=a.halt_max_steps, halt_exploration_prob=a.halt_exploration_prob,
                  forward_dtype="float32", mlp_t=a.mlp_t, puzzle_emb_len=a.puzzle_emb_len, no_ACT_continue=a.no_ACT_continue)  # fmt: skip
    return ACTLossHead(TinyRecursiveReasoningModel_ACTV1(config), loss_type="stablemax_cross_entropy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--published", type=Path, required=True, help="a checkout of the published TRM repository")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=2)
    args, overrides = p.parse_known_args()
    if not (args.published / "models" / "recursive_reasoning" / "trm.py").is_file():
        sys.exit(f"{args.published}: not a checkout of the published TRM (models/recursive_reasoning/trm.py missing)")

    cfg, _ = compose("cfg_pretrain", overrides + ["device=cpu"])
    split = ArcSplit(ensure_dataset(cfg.data.build_options(), cfg.data.resolved_path()), "train")
    sampler = EpochSampler(split, cfg.global_batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    theirs = published_model(args.published, cfg, split.meta, cfg.global_batch_size)
    ours = build_model(cfg, split.meta)
    missing, unexpected = ours.load_state_dict(from_published(theirs.state_dict()), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    autocast = fast_path(cfg, ours, torch.device("cpu"))
    theirs.train(), ours.train()

    def our_step(carry, batch):
        carry = carry or ours.initial_carry(batch)
        with autocast():
            carry, out = ours(carry, batch)
            loss, _ = total_loss(out, carry)
        (loss / cfg.global_batch_size).backward()
        ours.zero_grad(set_to_none=True)
        return carry, loss.item()

    def their_step(carry, batch):
        batch = {k: batch[k] for k in ("inputs", "labels", "puzzle_identifiers")}
        carry = carry or theirs.initial_carry(batch)
        carry, loss, _, _, _ = theirs(carry=carry, batch=batch, return_keys=[])
        (loss / cfg.global_batch_size).backward()
        theirs.zero_grad(set_to_none=True)
        return carry, loss.item()

    carries, times, first = {"ours": None, "published": None}, {"ours": [], "published": []}, {}
    for i in range(args.warmup + args.steps):
        batch = split.batch(sampler.next_indices())
        order = (("ours", our_step), ("published", their_step))
        for name, step in order if i % 2 == 0 else order[::-1]:  # who goes first alternates
            start = time.perf_counter()
            carries[name], loss = step(carries[name], batch)
            if i >= args.warmup:
                times[name].append(1000 * (time.perf_counter() - start))
            first.setdefault(name, loss)
    ms = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{' '.join(overrides)} | batch {cfg.global_batch_size} | {torch.get_num_threads()} threads | torch {torch.__version__}")
    print("| implementation | forward + loss + backward, ms (median) | p10-p90 | first-step loss |")
    print("| --- | --- | --- | --- |")
    for name in ("ours", "published"):
        p10, p90 = np.percentile(times[name], [10, 90])
        print(f"| {name} | {ms[name]:.1f} | {p10:.1f}-{p90:.1f} | {first[name]:.6f} |")
    print(f"ours / published: {ms['ours'] / ms['published']:.3f}")


if __name__ == "__main__":
    main()
