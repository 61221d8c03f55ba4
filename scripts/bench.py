"""Speed and memory of a configuration: the training step, the evaluation step, the encoder's share
and the data pipeline, on CPU or CUDA, after a warm-up.

    python scripts/bench.py experiment=E0v2 preset=cpu
    python scripts/bench.py --entry encoder experiment=E1v2 preset=cpu --steps 30
    python scripts/bench.py --entry encoder experiment=E1v2 preset=cpu --compare arch.encoder_packing=false
    python scripts/bench.py experiment=E0v2 preset=cpu --compare experiment=E1v2 --compare-entry encoder
    python scripts/bench.py experiment=E0v2 compile=true --json out.json --markdown out.md     # on a GPU

Each configuration gets its own model, optimisers and data; ``--compare OVERRIDES`` times a second
configuration (the first one's overrides, then these; ``--compare-entry`` for the other entry point;
``--bf16-weights`` for the weights themselves in bfloat16) in the same process, the two alternating
in ``--rounds`` chunks of steps, and prints the ratio of their median step times: on a noisy machine
ratios from one run are the figures that count. The training step runs as in ``trm/train.py``:
batches from the background feed, demonstrations packed for the slots' examples.

Reported per configuration:
- train ms/step (median, p10-p90 over every timed step; each step synchronised on CUDA), samples/s,
  tokens/s (samples x the core's sequence, context positions included);
- eval ms/batch: a batch run through all ``halt_max_steps`` ACT steps without gradient;
- encoder share: the conditioner's forward and backward timed alone on batches of new examples,
  over the training step (0 for the puzzle embedding's lookup; on CUDA it has read more than the
  whole step: compare step times instead);
- data samples/s: batches assembled by the data pipeline (sampling, demonstrations, tensors);
- peak memory: the process's peak RSS on CPU (it only grows, so the second of two compared
  configurations reports the peak of both), the allocator's peak per configuration on CUDA;
- loss: the mean lm_loss of the timed steps (two configurations see the same batches);
- on CUDA, model FLOPs utilisation against the device's dense bf16 peak. FLOPs are counted from the
  shapes (matrix products only, 2 per multiply-add). With B the batch, T = the context's length
  (puzzle_emb_len; the batch's own for a conditioner that reads every cell) + seq_len,
  H hidden, I the SwiGLU width, V the vocabulary, one application of the core's shared stack is
      N = L_layers x B x (2T(3H)H + 4T^2 H + 2T H H + 2T(2I)H + 2T I H)   (qkv, scores and values,
                                                                          out, gate/up, down)
  and a training step is N (L_cycles + 1) H_cycles forward + 2 N (L_cycles + 1) backward (the last
  cycle only) + 3 x 2 B seq_len H V for the output head. The conditioner adds its own count
  (``Conditioner.forward_flops``), x3 when trained (forward and backward), x1 frozen: an encoder the
  same count over its blocks for the pairs it computes (packed, each block's pairs at the block's
  length, padding included: what the device runs; padded, the present pairs at the full canvas).
  Left out: the halting head, an encoder's set aggregation (products over a few vectors per
  sample: under 0.1 % at full size) and latent steps. tests/test_bench.py checks the count against
  PyTorch's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trm.cli import compose  # noqa: E402
from trm.config import plan_run  # noqa: E402
from trm.data.build import ensure_dataset  # noqa: E402
from trm.data.dataset import ArcSplit, EpochSampler  # noqa: E402
from trm.distributed import setup  # noqa: E402
from trm.ema import EMA  # noqa: E402
from trm.model.layers import block_flops  # noqa: E402
from trm.data.pipeline import TrainFeed  # noqa: E402
from trm.train import Optimisers, build_model, fast_path, train_step  # noqa: E402

ENTRIES = {"pretrain": "cfg_pretrain", "encoder": "cfg_pretrain_encoder"}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


@dataclass
class Result:
    name: str
    overrides: list[str]
    device: str
    parameters: int
    batch: int
    seq: int
    train_ms: list[float]
    eval_ms: float
    encoder_ms: float
    data_samples_per_sec: float
    peak_memory_gib: float
    train_flops: float
    losses: list[float]  # lm_loss of each timed step

    def row(self, peak_tflops: float | None) -> dict:
        med = float(np.median(self.train_ms))
        p10, p90 = np.percentile(self.train_ms, [10, 90])
        out = {"config": self.name, "train ms/step": med, "p10-p90": f"{p10:.1f}-{p90:.1f}",
               "samples/s": 1000 * self.batch / med, "tokens/s": 1000 * self.batch * self.seq / med,
               "eval ms/batch": self.eval_ms, "encoder share": self.encoder_ms / med,
               "data samples/s": self.data_samples_per_sec, "peak GiB": self.peak_memory_gib,
               "loss": float(np.mean(self.losses))}  # fmt: skip
        if peak_tflops:
            out["MFU"] = self.train_flops / (med / 1000) / (peak_tflops * 1e12)
        return out


def context_length(model, batch: dict) -> int:
    """The context tokens the core sees beside the grid: the conditioner's own length (a
    conditioner that reads every cell: this batch's)."""
    with torch.no_grad():
        return model.condition(batch).context.shape[1]


def step_flops(cfg, batch: dict, seq_len: int, vocab: int, model) -> float:
    a = cfg.arch
    B, T = batch["inputs"].shape[0], context_length(model, batch) + seq_len
    net = block_flops(B, T, a.hidden_size, a.expansion, a.L_layers)
    calls_per_cycle = a.L_cycles + 1
    flops = net * calls_per_cycle * a.H_cycles + 2 * net * calls_per_cycle + 3 * 2 * B * seq_len * a.hidden_size * vocab
    trained = any(p.requires_grad for p in model.conditioner.parameters())
    return float(flops + (3 if trained else 1) * model.conditioner.forward_flops(batch))


class Bench:
    """One configuration, set up once; :meth:`train` times chunks of steps. ``bf16_weights``: the
    weights themselves in bfloat16 and no autocast (the ACT carry then bfloat16 too), to compare
    with the default autocast over float32 weights."""

    def __init__(self, entry: str, overrides: list[str], name: str, bf16_weights: bool = False):
        self.cfg, _ = compose(ENTRIES[entry], overrides)
        self.name, self.overrides = name, overrides + (["(bf16 weights)"] if bf16_weights else [])
        self.env = setup(self.cfg.device)
        data_dir = ensure_dataset(self.cfg.data.build_options(), self.cfg.data.resolved_path())
        self.split = ArcSplit(data_dir, "train")
        self.plan = plan_run(self.cfg, self.split.examples_per_epoch, self.env.world_size)
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(self.cfg, self.split.meta).to(self.env.device)
        if bf16_weights:
            self.model.to(torch.bfloat16)
        self.opt, self.ema = Optimisers(self.cfg, self.model), EMA(self.model, self.cfg.ema_rate)
        self.autocast = fast_path(self.cfg, self.model, self.env.device)
        if bf16_weights:
            self.autocast = contextlib.nullcontext
        self.demos = self.model.conditioner.demos
        sampler = EpochSampler(self.split, self.cfg.global_batch_size, self.cfg.seed)
        self.feed = TrainFeed(self.split, sampler, slice(0, self.plan.local_batch_size), self.demos, self.env.device)
        self.carry, self.step_no, self.times, self.losses, self.peak_bytes = None, 0, [], [], 0

    def _sync(self):
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def _measured(self):
        """This configuration's own allocator peak, though two configurations take turns (CUDA)."""
        if self.env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        yield
        if self.env.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())

    def batch(self) -> dict:
        """A batch of new examples (every slot takes one), its demonstrations packed for it."""
        return self.feed.next()

    def train(self, steps: int, timed: bool = True) -> None:
        with self._measured():
            self._train(steps, timed)

    def _train(self, steps: int, timed: bool) -> None:
        self.model.train()
        for _ in range(steps):
            slots = (self.carry.halted, self.carry.data.get("demo_rows")) if self.carry is not None else ()
            self._sync()
            start = time.perf_counter()  # the feed's last-moment packing is part of the step
            batch = self.feed.next(*slots)
            self.carry = self.carry or self.model.initial_carry(batch)
            self.step_no += 1
            self.carry, metrics, _, ok = train_step(self.model, self.carry, batch, self.opt, self.cfg, self.step_no,
                                                    self.plan, self.autocast, self.feed)  # fmt: skip
            self.ema.update(ok)
            self._sync()
            if timed:
                self.times.append(1000 * (time.perf_counter() - start))
                self.losses.append(float(metrics["train/lm_loss"][0] / metrics["train/lm_loss"][1]))

    def evaluate(self, batches: int) -> float:
        """ms per evaluation batch (the evaluation loop: all ACT steps, no gradient)."""
        self.model.eval()
        times = []
        with torch.no_grad():
            for i in range(batches + 1):
                batch = self.batch()
                self._sync()
                start = time.perf_counter()
                with self.autocast():
                    self.model.predict(batch, self.model.condition(batch))
                self._sync()
                if i:  # the first is a warm-up
                    times.append(1000 * (time.perf_counter() - start))
        self.model.train()
        return float(np.median(times))

    def encoder(self, batches: int) -> float:
        """ms of the conditioner's forward and backward on a training batch (median)."""
        if not any(p.requires_grad for p in self.model.conditioner.parameters()) and not self.demos:
            return 0.0
        times = []
        for i in range(batches + 1):
            batch = self.batch()
            self._sync()
            start = time.perf_counter()
            with self.autocast():
                context = self.model.condition(batch).context
            if context.requires_grad:
                context.float().square().mean().backward()
            self._sync()
            if i:
                times.append(1000 * (time.perf_counter() - start))
        self.model.zero_grad(set_to_none=True)
        return float(np.median(times))

    def data(self, batches: int) -> float:
        """Samples/s of one thread assembling global batches with their demonstrations (packed as
        the configuration has them), from a sampler of its own."""
        sampler = EpochSampler(self.split, self.cfg.global_batch_size, self.cfg.seed + 1)
        start = time.perf_counter()
        for _ in range(batches):
            self.split.batch(sampler.next_indices(), self.demos)
        return batches * self.cfg.global_batch_size / (time.perf_counter() - start)

    def result(self, device_name: str, batches: int) -> Result:
        batch = self.batch()
        with self._measured():
            eval_ms, encoder_ms = (self.evaluate(batches), self.encoder(batches)) if batches else (float("nan"),) * 2
        cuda = self.env.device.type == "cuda"
        peak = self.peak_bytes if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return Result(self.name, self.overrides, device_name, sum(p.numel() for p in self.model.parameters()),
                      self.plan.local_batch_size, context_length(self.model, batch) + self.split.seq_len, self.times,
                      eval_ms, encoder_ms, self.data(20), peak / 2**30,
                      step_flops(self.cfg, batch, self.split.seq_len, self.split.meta["vocab_size"], self.model),
                      self.losses)  # fmt: skip


def device_name() -> tuple[str, float | None]:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        return name, peak
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads", None


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}") if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entry", choices=sorted(ENTRIES), default="pretrain")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=4, help="alternating chunks with --compare")
    p.add_argument("--eval-batches", type=int, default=5,
                   help="batches timed for the evaluation step and the encoder share (0: skip both)")
    p.add_argument("--compare", nargs="*", default=None, metavar="OVERRIDE", help="a second configuration: these overrides on top")
    p.add_argument("--compare-entry", choices=sorted(ENTRIES), help="the second configuration's entry point (default: --entry)")
    p.add_argument("--bf16-weights", action="store_true",
                   help="the weights in bfloat16 without autocast (the second configuration's, with --compare)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    args, overrides = p.parse_known_args()

    comparing = args.compare is not None
    benches = [Bench(args.entry, overrides, "A" if comparing else "config", args.bf16_weights and not comparing)]
    if comparing:
        benches.append(Bench(args.compare_entry or args.entry, overrides + args.compare, "B", args.bf16_weights))
    for b in benches:
        b.train(args.warmup, timed=False)
    rounds = args.rounds if comparing else 1
    for r in range(rounds):  # alternate, so that drifts of the machine hit both alike
        for b in benches:
            b.train(args.steps // rounds + (r < args.steps % rounds))
    name, peak = device_name()
    results = [b.result(name, args.eval_batches) for b in benches]
    rows = [r.row(peak) for r in results]
    print(f"{name} | torch {torch.__version__} | {' '.join(overrides)}")
    table = markdown(rows)
    if comparing:
        ratio = rows[1]["train ms/step"] / rows[0]["train ms/step"]
        table += f"\n\nB = A + {' '.join(benches[1].overrides[len(overrides):])}; step time B / A: {ratio:.3f}"
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "results": [asdict(r) for r in results],
                                         "rows": rows}, indent=2))  # fmt: skip
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
