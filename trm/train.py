"""The training loop behind ``pretrain.py`` and ``pretrain_encoder.py``.

One call of :func:`train` builds (or finds) the dataset, the model with its conditioner and the
optimisers, decides what the run directory holds (new, resumed or finished: :mod:`trm.rundir`), and
only then writes into it. It then loops: draw a global batch, run one ACT supervision step, reduce
gradients across ranks, clip, step the optimisers (skipping an update whose gradient is not finite),
update the EMA; log every ``log_interval`` steps; evaluate (with the EMA weights) every
``eval_interval`` epochs and at the end; checkpoint at evaluations, every ``checkpoint_interval``
steps, and on SIGINT/SIGTERM before exiting.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from trm import checkpoint, rundir
from trm.adapt import check_target
from trm.config import RunPlan, TrainConfig, early_stop_reason, plan_run
from trm.data.build import ensure_dataset, wait_for_dataset
from trm.data.dataset import ArcSplit, EpochSampler
from trm.data.grids import PAD_ID
from trm.data.pipeline import TrainFeed
from trm.distributed import DistEnv, all_reduce_max, all_reduce_sum_, from_scheduler, on_main, setup, teardown
from trm.ema import EMA
from trm.errors import Interrupted
from trm.evaluate import evaluate_model
from trm.logger import RunLogger
from trm.losses import act_loss
from trm.model.conditioning import CONDITIONERS
from trm.model.trm import Carry, TinyRecursiveModel
from trm.optim import AdamATan2, lr_at

# Metrics summed over slots and divided by the number of halted samples when logged.
PER_HALTED = ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps")
# Evaluation metrics printed to the terminal at each evaluation.
HEADLINE = ("/exact_accuracy", "/exact_accuracy_wrong_context", "/context_reliance", "/pass@2")


def build_model(cfg: TrainConfig, metadata: dict) -> TinyRecursiveModel:
    """The core and the conditioner ``arch.conditioner`` for a dataset's ``metadata``."""
    arch = cfg.arch
    conditioner = CONDITIONERS.get_valid(arch.conditioner).build(arch, metadata)
    return TinyRecursiveModel(arch, conditioner, metadata["vocab_size"], metadata["seq_len"], metadata.get("pad_id", PAD_ID))


class Optimisers:
    """AdamATan2 on the dense weights: the core's, then the conditioner's own groups with their
    learning-rate scales and warm-ups (:meth:`Conditioner.param_groups`); and the conditioner's
    sparse optimiser where it has one (the puzzle embedding's sign-SGD). Frozen weights are left out."""

    def __init__(self, cfg: TrainConfig, model: TinyRecursiveModel):
        self.cfg = cfg
        self.core_params = [p for p in model.core.parameters() if p.requires_grad]
        cond_groups = model.conditioner.param_groups()
        self.cond_params = [p for g in cond_groups for p in g.params]
        groups = [{"params": self.core_params, "name": "lr", "lr_scale": 1.0, "warmup": cfg.lr_warmup_steps}]
        groups += [{"params": g.params, "name": g.name, "lr_scale": g.lr_scale,
                    "warmup": cfg.lr_warmup_steps if g.warmup is None else g.warmup} for g in cond_groups]  # fmt: skip
        self.dense = AdamATan2(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.sparse = model.conditioner.sparse_optimizer(cfg.puzzle_emb_lr, cfg.puzzle_emb_weight_decay)

    def set_lr(self, step: int, total: int) -> dict[str, float]:
        """Set every group's lr for ``step``; returns them as train/<group> metrics."""
        c, lrs = self.cfg, {}
        for g in self.dense.param_groups:
            g["lr"] = lr_at(step, c.lr * c.lr_scale * g["lr_scale"], g["warmup"], total, c.lr_min_ratio)
            lrs[f"train/{g['name']}"] = g["lr"]
        if self.sparse is not None:
            self.sparse.lr = lr_at(step, self.sparse.base_lr * c.lr_scale, c.lr_warmup_steps, total, c.lr_min_ratio)
            lrs[f"train/{self.sparse.name}"] = self.sparse.lr
        return lrs

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dense.load_state_dict(state["dense"])


def _norm(tensors: list[torch.Tensor], device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float())


def context_diagnostics(context: torch.Tensor, task_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Statistics of the task context the core receives, as (sum, count) pairs over the batch.

    encoder/output_norm: mean per-token L2 norm. encoder/cross_puzzle_cosine: mean cosine similarity
    between the flattened contexts of samples of different tasks (near 1: every task gets the same
    context, a collapse; scale-free, so encoders of any output scale compare). encoder/cross_sample_std:
    standard deviation over the batch, averaged over features.
    context: (B, P, hidden); task_ids: (B,).
    """
    context = context.detach().float()
    B = context.shape[0]
    flat = torch.nn.functional.normalize(context.flatten(1), dim=-1)
    different = task_ids[:, None] != task_ids[None, :]
    cosine = (flat @ flat.T) * different  # a product, not a boolean index: no synchronisation
    spread = context.flatten(1).std(dim=0, unbiased=False).mean() if B > 1 else context.new_zeros(())
    n = torch.full((), float(B), device=context.device)  # a fill, not a copy from the host
    return {
        "encoder/output_norm": (context.norm(dim=-1).mean() * n, n),
        "encoder/cross_puzzle_cosine": (cosine.sum(), different.sum().float()),
        "encoder/cross_sample_std": (spread * n, n),
    }


def total_loss(out, carry: Carry) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ACT loss of the step plus the conditioner's auxiliary losses (e.g. the weighted KL), summed
    over the local batch; and the metric sums of :func:`trm.losses.act_loss`."""
    loss, sums = act_loss(out.logits, out.q_halt, out.q_continue, carry.data["labels"], carry.halted,
                          carry.steps, out.target_q_continue)  # fmt: skip
    for aux in out.conditioning.aux_losses.values():
        loss = loss + aux
    return loss, sums


def _sum_over_ranks(state, bucket):
    """DDP communication hook: a bucket's gradients summed over ranks (DDP's own hook averages; the
    loss is already divided by the global batch, as for the sparse puzzle-embedding rows)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def train_step(model, carry: Carry, batch, opt: Optimisers, cfg: TrainConfig, step: int, plan: RunPlan, autocast,
               feed: TrainFeed | None = None, ddp: DistributedDataParallel | None = None):  # fmt: skip
    """One supervision step for every slot. Returns the new carry, the step's metrics as
    (sum, count) pairs over the local batch, the learning rates, and ``ok`` (0-dim bool): False when
    the global gradient was not finite, the update then skipped (weights and optimiser state
    unchanged, every slot restarts its example from the initial state; :class:`MetricWindow` leaves
    the step's metrics out). ``feed`` is shown the slots right after the forward pass
    (:meth:`TrainFeed.watch`). With ``ddp`` (the model wrapped), its backward pass reduces the dense
    gradients; else one all-reduce follows it. No host-device synchronisation."""
    with autocast():
        carry, out = (model if ddp is None else ddp)(carry, batch)
        if feed is not None:
            feed.watch(carry.halted, carry.data.get("demo_rows"))
        loss, sums = total_loss(out, carry)
    (loss / cfg.global_batch_size).backward()

    # Gradients: summed over ranks first, so norms and clipping see the global gradient.
    core_grads = [p.grad for p in opt.core_params if p.grad is not None]
    cond_grads = [p.grad for p in opt.cond_params if p.grad is not None]
    if ddp is None:
        all_reduce_sum_(core_grads + cond_grads)
    sparse_grad = opt.sparse.gathered_grad() if opt.sparse is not None else None
    device = carry.steps.device
    trm_norm = _norm(core_grads, device)
    enc_norm = _norm(cond_grads + ([sparse_grad[1]] if sparse_grad is not None else []), device)
    total_norm = torch.sqrt(trm_norm**2 + enc_norm**2)
    ok = torch.isfinite(total_norm)  # of the global gradient: every rank decides alike
    if cfg.grad_clip_norm is not None:
        torch._foreach_mul_(core_grads + cond_grads, (cfg.grad_clip_norm / (total_norm + 1e-6)).clamp(max=1.0))

    lrs = opt.set_lr(step, plan.total_steps)
    opt.dense.step(ok)
    opt.dense.zero_grad(set_to_none=True)
    if opt.sparse is not None:
        opt.sparse.step(sparse_grad, ok)
    # A non-finite state is not carried on: every slot restarts its example (the examples stay,
    # as the feed saw them).
    carry.z_H, carry.z_L, carry.steps = model.restarted(carry, ~ok)

    samples = torch.full((), float(carry.halted.numel()), device=device)  # no host-to-device copy: no sync
    one = torch.ones((), device=device)
    count = sums.pop("count")
    metrics = {f"train/{k}": (v, count if k in PER_HALTED else samples) for k, v in sums.items()}
    metrics.update({f"train/{k}": (v.detach(), samples) for k, v in out.conditioning.aux_losses.items()})
    metrics.update(out.conditioning.metrics)
    metrics.update(context_diagnostics(out.conditioning.context, carry.data["task_ids"]))
    metrics.update({"grad/total_norm": (total_norm, one), "grad/trm_norm": (trm_norm, one),
                    "grad/encoder_norm": (enc_norm, one)})  # fmt: skip
    return carry, metrics, lrs, ok


class MetricWindow:
    """Accumulates (sum, count) metric pairs on the device between two logging steps, with no
    synchronisation; :meth:`reduce` sums them over steps and ranks and divides."""

    def __init__(self):
        self.pairs: dict[str, torch.Tensor] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, metrics: dict[str, tuple[torch.Tensor, torch.Tensor]], ok: torch.Tensor) -> None:
        """One step's metrics; those of a skipped step (``ok`` False) count as no sample."""
        for k, (num, den) in metrics.items():
            pair = torch.where(ok, torch.stack([num.detach().double(), den.detach().double()]), 0.0)
            self.pairs[k] = self.pairs[k] + pair if k in self.pairs else pair
        self.steps += 1

    def reduce(self, global_batch: int) -> dict[str, float]:
        keys = sorted(self.pairs)
        stacked = torch.stack([self.pairs[k] for k in keys])
        all_reduce_sum_([stacked])
        # A metric without samples in the window (no slot halted) is left out, not logged as 0.
        out = {k: num / den for k, (num, den) in zip(keys, stacked.tolist()) if den > 0}
        elapsed = time.perf_counter() - self.start
        out["timing/samples_per_sec"] = global_batch * self.steps / elapsed
        out["timing/step_ms"] = 1000 * elapsed / self.steps
        self.__init__()
        return out


class SkippedSteps:
    """Counts the steps whose update was skipped (non-finite gradient) on the device; read at
    logging steps only. ``longest_run``: the most skipped in a row seen at the last read."""

    def __init__(self, before: int, device: torch.device):
        self.count = torch.tensor(float(before), device=device)
        self.run = self.worst = torch.zeros((), device=device)
        self.longest_run = 0

    def add(self, ok: torch.Tensor) -> None:
        skipped = (~ok).to(torch.float32)
        self.count, self.run = self.count + skipped, (self.run + 1) * skipped
        self.worst = torch.maximum(self.worst, self.run)

    def total(self) -> int:
        return int(self.count.item())

    def metrics(self) -> dict[str, float]:
        """train/skipped_steps (all so far); resets the longest run of the window."""
        self.longest_run = int(self.worst.item())
        self.worst = self.run
        return {"train/skipped_steps": float(self.count.item())}


def fast_path(cfg: TrainConfig, model: TinyRecursiveModel, device: torch.device):
    """Switch on what makes a step fast on ``device`` as the config asks: TF32 matrix products and
    torch.compile of the core and of the encoder's pair transformer (``compile=auto``: on CUDA).
    Returns the autocast context of the forward pass (``arch.forward_dtype``; auto: bfloat16 on
    CUDA, float32 on CPU), which keeps float32 weights and casts them in each matrix product."""
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.compile is True or (cfg.compile == "auto" and cuda):
        model.core.compile()
        model.conditioner.compile_parts()
    name = cfg.arch.forward_dtype
    if name == "auto":
        name = "bfloat16" if cuda else "float32"
    dtype = getattr(torch, name)
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)


class StopDuringEvaluation(BaseException):
    """A stop signal arrived during an evaluation, which the state saved before it makes safe to
    abandon. A BaseException, so that no handler of ordinary errors swallows it."""


class StopRequest:
    """SIGINT, SIGTERM and SIGUSR2 (Ctrl-C, Slurm preemption, submitit's time-limit warning) ask the
    loop to stop between two steps; it then saves a checkpoint and exits, after handing the signal
    to the handler it had before, where that is a Python function (submitit's, which requeues the
    job). During an evaluation (:meth:`abandoning`) the signal ends it at once instead: the state
    was saved before it, and an evaluation may outlast a scheduler's grace period. A second signal
    interrupts a single process at once (the last checkpoint stays)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self, world_size: int):
        self.signum: int | None = None
        self.world_size = world_size
        self._previous: dict[int, object] = {}
        self._abandon = False

    def _handle(self, signum, frame):
        # Under torchrun a Ctrl-C reaches each worker twice (the terminal's SIGINT, then the agent's
        # SIGTERM): only a single process escalates on a second signal.
        if self.signum is not None and self.world_size == 1:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        if self._abandon:
            raise StopDuringEvaluation

    @contextlib.contextmanager
    def abandoning(self):
        """A block (an evaluation) that a stop signal ends at once, with :class:`StopDuringEvaluation`
        (also when the signal came just before it). Under torchrun every rank gets the signal and
        leaves its own evaluation."""
        if self.signum is not None:
            raise StopDuringEvaluation
        self._abandon = True
        try:
            yield
        finally:
            self._abandon = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def hand_over(self) -> None:
        """Once the stop is saved: the signal's previous handler, where it had one of its own (not
        Python's Ctrl-C default), gets it now, e.g. submitit's requeue of a Slurm job."""
        previous = self._previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            self.__exit__()
            previous(self.signum, None)

    def agreed(self, env: DistEnv, step: int, every: int) -> bool:
        """Whether to stop now. One process checks at every step; ranks agree at logging steps (one
        collective), so that they save the same step together, all with the signal one received."""
        if env.world_size > 1:
            if step % every:
                return False
            self.signum = int(all_reduce_max(float(self.signum or 0), env.device)) or None
        return self.signum is not None


def train(cfg: TrainConfig, raw_config: dict) -> dict[str, float]:
    """Run one training job; returns the summary (also written to ``<run_dir>/summary.json``)."""
    # The dataset is built before the process group exists: a first build of the full data can
    # outlast a collective's timeout. Other ranks wait for rank 0's folder to appear.
    from_scheduler()  # a Slurm job's tasks become torchrun-style ranks
    data_dir = cfg.data.resolved_path()
    if int(os.environ.get("RANK", "0")) == 0:
        ensure_dataset(cfg.data.build_options(), data_dir)
    else:
        wait_for_dataset(data_dir)
    env = setup(cfg.device)
    try:
        with contextlib.ExitStack() as held:
            on_main(lambda: held.enter_context(rundir.in_use_lock(cfg)))
            return _train(cfg, raw_config, env, data_dir)
    finally:
        teardown()


def _train(cfg: TrainConfig, raw_config: dict, env: DistEnv, data_dir: Path) -> dict[str, float]:
    # Everything that can fail (data, plan, model, optimisers, the run directory's state, the
    # checkpoint) runs before anything is written into the run directory.
    train_split, test_split = ArcSplit(data_dir, "train"), ArcSplit(data_dir, "test")
    plan = plan_run(cfg, train_split.examples_per_epoch, env.world_size)
    run = on_main(lambda: rundir.inspect(cfg, raw_config, plan.last_step))
    if run.status == "finished":
        summary = on_main(lambda: rundir.finished_summary(run))
        if env.is_main:
            print(f"run {run.path} is finished (step {run.checkpoint_step} of {plan.last_step}); its summary is "
                  f"{run.path / 'summary.json'}. Nothing changed; extend=true trains on or evaluates again.")  # fmt: skip
        return summary

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, train_split.meta).to(env.device)
    check_target(cfg.eval.adapt, model)
    if run.status == "new" and cfg.init_from:
        checkpoint.start_from(model, cfg.init_from)
    opt = Optimisers(cfg, model)
    ema = EMA(model, cfg.ema_rate) if cfg.ema else None
    sampler = EpochSampler(train_split, cfg.global_batch_size, cfg.seed)
    torch.manual_seed(cfg.seed * 7919 + env.rank + 1)  # per-rank randomness (halting exploration)
    demos = model.conditioner.demos
    step, carry, skipped_before, evaluation_pending, seconds_before = 0, None, 0, False, 0.0
    if run.status == "resume":
        folder, shared, own = checkpoint.load_latest(run.path / "checkpoints", env)
        checkpoint.load_weights(model, shared["model"], str(folder / "state.pt"))
        opt.load_state_dict(shared["optimisers"])
        if ema is not None:
            ema.load_state_dict(shared["ema"])
        sampler.load_state_dict(shared["sampler"])
        step, skipped_before = shared["step"], shared.get("skipped_steps", 0)
        evaluation_pending = shared.get("evaluation_pending", False)
        seconds_before = shared.get("train_seconds", 0.0)  # the run's time before this session
        if own is not None:
            checkpoint.set_rng_state(own["rng"])
            carry = Carry(**own["carry"]) if own["carry"] is not None else None
    reevaluate = evaluation_pending or step >= plan.last_step  # its evaluation rows of that step are logged again
    run_dir = on_main(lambda: rundir.open_run(run, raw_config, step, reevaluate=reevaluate))

    autocast = fast_path(cfg, model, env.device)
    # The model itself evaluates and is saved; the wrapper only runs the training forward pass. The
    # puzzle embedding (a buffer, updated sparsely) is not broadcast. Not static_graph: the core
    # uses its weights several times per step, and DDP's static-graph mode then reduces a
    # gradient before all of it has accumulated (2-3x too small, seen in the two-rank test). With
    # the core compiled, its backward pass is one compiled function: its gradients are all ready at
    # its end, so their buckets overlap only the rest of the backward pass (the encoder's).
    ddp = None
    if cfg.ddp and env.world_size > 1:
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        ddp.register_comm_hook(None, _sum_over_ranks)
    logger = RunLogger(run_dir, run_dir.name, raw_config, cfg.wandb, enabled=env.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    if env.is_main:
        print(
            f"run {run_dir} | {env.world_size} x {env.device.type} | {n_params:,} parameters | "
            f"{train_split.num_examples} train examples ({plan.examples_per_epoch}/epoch), "
            f"{test_split.num_examples} test | {plan.total_steps} steps"
            + (f" (stopping at {plan.last_step})" if plan.last_step < plan.total_steps else "")
            + (f" | resumed at step {step}" if step else "")
        )

    saved_at = step if run.status == "resume" else None

    def save(evaluation_pending: bool = False):
        """A checkpoint of this step; ``evaluation_pending``: saved before the step's evaluation, so
        that a run stopped during it resumes by evaluating again."""
        nonlocal saved_at
        shared = {"model": model.state_dict(), "optimisers": opt.state_dict(), "ema": ema and ema.state_dict(),
                  "sampler": feed.state_dict(), "step": step, "skipped_steps": skips.total(), "config": raw_config,
                  "metadata": train_split.meta, "evaluation_pending": evaluation_pending,
                  "train_seconds": seconds_before + time.perf_counter() - start}  # fmt: skip
        own = {"carry": carry and carry.state_dict(), "rng": checkpoint.rng_state()}
        saved_at = step
        return checkpoint.save(run_dir / "checkpoints", step, shared, own, env, cfg.keep_checkpoints)

    def evaluate() -> dict[str, float]:
        eval_start = time.perf_counter()
        with ema.applied() if ema is not None else contextlib.nullcontext():
            metrics = evaluate_model(model, train_split, test_split, cfg.eval, cfg.seed, plan.local_eval_batch_size,
                                     env.device, autocast, demos)  # fmt: skip
        metrics["timing/eval_seconds"] = time.perf_counter() - eval_start
        window.start += metrics["timing/eval_seconds"]  # throughput counts training time only
        logger.log(metrics, step)
        if env.is_main:  # the headline figures; metrics.jsonl and wandb hold them all
            headline = {k: v for k, v in metrics.items() if k.count("/") <= 2 and k.endswith(HEADLINE)}
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in headline.items()))
        return metrics

    def evaluate_here() -> None:
        """The evaluation of this step, between a checkpoint before it (a stop signal abandons it
        with nothing lost) and one after; then the early-stopping rules."""
        nonlocal last_eval, stop_reason
        save(evaluation_pending=True)
        with stop.abandoning():
            last_eval = evaluate()
        stop_reason = early_stop_reason(cfg.early_stop, last_eval, step, plan.total_steps)
        save()

    window, skips, last_train, last_eval = MetricWindow(), SkippedSteps(skipped_before, env.device), {}, {}
    stop_reason = None
    start, start_step = time.perf_counter(), step
    bar = tqdm(total=plan.last_step, initial=step, disable=not env.is_main, unit="step", dynamic_ncols=True)
    model.train()
    rows = slice(env.rank * plan.local_batch_size, (env.rank + 1) * plan.local_batch_size)
    feed = TrainFeed(train_split, sampler, rows, demos, env.device)
    with StopRequest(env.world_size) as stop, contextlib.closing(feed):
        try:
            if evaluation_pending:  # stopped during this step's evaluation: evaluate again first
                evaluate_here()
            while step < plan.last_step and not stop_reason:
                batch = feed.next(*((carry.halted, carry.data.get("demo_rows")) if carry is not None else ()))
                if step == start_step and carry is not None and carry.data.keys() != model.initial_carry(batch).data.keys():
                    carry = None  # resumed with a carry saved with other demonstrations: the slots restart
                carry = carry or model.initial_carry(batch)
                step += 1
                carry, metrics, lrs, ok = train_step(model, carry, batch, opt, cfg, step, plan, autocast, feed, ddp)
                if ema is not None:
                    ema.update(ok)
                window.add(metrics, ok)
                skips.add(ok)
                bar.update(1)

                if step % cfg.log_interval == 0 or step == plan.last_step:
                    last_train = {**window.reduce(cfg.global_batch_size), **lrs, **skips.metrics()}
                    logger.log(last_train, step)
                    shown = {"loss": "train/lm_loss", "acc": "train/accuracy", "exact": "train/exact_accuracy",
                             "sps": "timing/samples_per_sec"}  # fmt: skip
                    bar.set_postfix({k: f"{last_train[m]:.3g}" for k, m in shown.items() if m in last_train})
                    if skips.longest_run >= cfg.max_skipped_steps:
                        bar.close()
                        logger.finish({**last_train, "step": step, "diverged": True})
                        raise FloatingPointError(
                            f"{skips.longest_run} steps in a row up to step {step} had a non-finite loss or gradient "
                            f"(max_skipped_steps={cfg.max_skipped_steps}); {run_dir / 'checkpoints'} keeps the last "
                            "good state"
                        )
                if plan.evaluates_at(step):
                    evaluate_here()
                elif step % cfg.checkpoint_interval == 0:
                    save()
                if stop_reason:
                    if env.is_main:
                        bar.write(stop_reason)
                    break
                if stop.agreed(env, step, cfg.log_interval) and step < plan.last_step:
                    folder = save() if saved_at != step else run_dir / "checkpoints" / f"step_{step:08d}"
                    bar.close()
                    logger.close()
                    stop.hand_over()
                    raise Interrupted(stop.signum, f"stopped by {signal.Signals(stop.signum).name} at step {step}; "
                                      f"checkpoint {folder}: the same command resumes the run")  # fmt: skip
            if not last_eval:  # resumed at its last step (killed before the summary, or extended to evaluate again)
                evaluate_here()
        except StopDuringEvaluation:
            bar.close()
            logger.close()
            stop.hand_over()
            raise Interrupted(stop.signum, f"stopped by {signal.Signals(stop.signum).name} during the evaluation at step "
                              f"{step}; checkpoint {run_dir / 'checkpoints' / f'step_{step:08d}'} (saved before it): the "
                              "same command resumes the run and evaluates again")  # fmt: skip
    bar.close()

    elapsed = time.perf_counter() - start
    summary = {
        **last_train, **last_eval, "step": step, "total_steps": plan.total_steps, "parameters": n_params,
        "conditioner": cfg.arch.conditioner,
        "stop_reason": stop_reason or ("finished" if step >= plan.total_steps else f"max_steps={cfg.max_steps}"),
        "time/train_seconds": seconds_before + elapsed,  # every session of a resumed run
        "time/steps_per_sec": (step - start_step) / max(elapsed, 1e-9),  # this session's
    }  # fmt: skip
    logger.finish(summary)
    if env.is_main:
        print(json.dumps({k: summary[k] for k in summary if k.startswith(("eval/", "ARC/"))}, indent=2))
    return summary
