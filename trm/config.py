"""Typed configuration: the schema every composed Hydra config is validated against at start-up,
and the values derived from it (steps, per-rank batch) in one place.

An unknown key, a wrong type or a value out of range fails with :class:`ConfigError`, which names
the key, before any data is built or model created.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, field_validator

from trm.data.build import BuildOptions
from trm.errors import InputError
from trm.model.config import ArchConfig, Strict, validate_arch


class ConfigError(InputError, ValueError):
    """The composed configuration does not fit the schema; the message names each key at fault."""


class DataConfig(BuildOptions):
    """What the dataset is built from (see trm.data.build) and where it lives. ``path`` defaults to
    ``<root>/<name derived from the options>``, so changed options give a new folder."""

    root: str = Field("data", description="folder of built datasets")
    path: str | None = Field(None, description="the dataset folder (None: <root>/<name from the options>)")

    def build_options(self) -> BuildOptions:
        return BuildOptions(**self.model_dump(exclude={"root", "path"}))

    def resolved_path(self) -> Path:
        return Path(self.path) if self.path else Path(self.root) / self.build_options().folder_name()


class AdaptConfig(Strict):
    """Test-time adaptation at evaluation (trm/adapt.py), off by default."""

    target: Literal["none", "context", "latent", "encoder", "all"] = Field(
        "none", description="none; context: refine each example's context, weights frozen; latent: refine the "
        "conditioner's pair representations, leave-one-out; encoder / all: fine-tune the conditioner's (or every) "
        "weights per task, leave-one-out")  # fmt: skip
    steps: int = Field(0, ge=0, description="optimiser steps on the demonstration objective (0: as computed)")
    lr: float = Field(0.01, gt=0, description="learning rate of those steps")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam, or plain sgd")
    act_steps: int | None = Field(
        None, ge=1, description="ACT steps per objective evaluation, gradient through the last (None: halt_max_steps)")
    augmentations: int = Field(
        1, ge=1, description="encoder / all: copies of each task's demonstrations fine-tuned on, the first as "
        "given, the others under a random dihedral transform and colour permutation")  # fmt: skip
    tasks_per_batch: int = Field(8, ge=1, description="encoder / all: tasks fine-tuned at once (each its own weights)")

    @property
    def enabled(self) -> bool:
        return self.target != "none"

    @property
    def of_weights(self) -> bool:
        return self.target in ("encoder", "all")


class EvalConfig(Strict):
    batch_size: int | None = Field(None, ge=1, description="global evaluation batch (default: global_batch_size)")
    on_train: bool = Field(True, description="also evaluate the training examples (eval/train/...)")
    train_augmentations: int | None = Field(
        None, ge=1, description="augmented versions per task evaluated on train (None: all)")
    train_groups: int | None = Field(
        None, ge=1, description="training tasks evaluated, spread evenly over the split (None: all)")
    test_augmentations: int | None = Field(None, ge=1, description="augmented versions voted on test (None: all)")
    pass_ks: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 100, 1000], description="k of the pass@k reported")
    reliance: bool = Field(
        True, description="also evaluate every example with another task's context and with the empty "
        "task's (..._wrong_context, ..._null_context, context_reliance): two more passes")
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)


class WandbConfig(Strict):
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when credentials exist, else offline")
    project: str = Field("mmi-714-debug", description="wandb project")
    entity: str | None = Field(None, description="wandb entity (None: the account's default)")
    tags: list[str] = Field(default_factory=list, description="wandb tags of the run")


class EarlyStopRule(Strict):
    """Stop a run that is clearly failing: from ``at_fraction`` of its schedule on, an evaluation
    whose ``metric`` is below ``below`` ends it (a checkpoint is saved; summary.json says why)."""

    metric: str = Field(description="a metric of the evaluation, e.g. eval/train/exact_accuracy")
    below: float = Field(description="stop when the metric is below this")
    at_fraction: float = Field(gt=0, le=1, description="checked at evaluations from this fraction of the steps on")


def load_conditioners() -> None:
    """Register the built-in conditioners: the puzzle embedding and the demonstration conditioners
    of the package ``encoders``. A conditioner defined elsewhere registers itself when its module
    is imported."""
    import encoders  # noqa: F401
    import trm.model.puzzle_embedding  # noqa: F401


class TrainConfig(Strict):
    arch: SerializeAsAny[ArchConfig] = Field(default_factory=ArchConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    run_name: str | None = Field(None, description="default: <experiment>[-<preset>]-<date>-<time>")
    run_dir: str | None = Field(None, description="default: runs/<run_name>")
    seed: int = Field(0, description="initial weights, data order, halting exploration")

    global_batch_size: int = Field(768, ge=1, description="examples per step over all ranks")
    epochs: int = Field(100000, ge=1, description="passes over the examples an epoch draws (one version per task group)")
    eval_interval: int | None = Field(10000, ge=1, description="epochs between evaluations (None: only at the end)")
    max_steps: int | None = Field(
        None, ge=0, description="stop after this many steps (schedules keep the full length); 0 with init_from: "
        "evaluate the given weights only")

    lr: float = Field(1e-4, gt=0, description="learning rate of the core (and encoder)")
    lr_scale: float = Field(
        1.0, gt=0, description="multiplies every learning rate; presets of other model sizes set it, so that "
        "an experiment's own lr change (lr=3e-5) keeps its meaning relative to the default")
    lr_min_ratio: float = Field(1.0, ge=0, le=1, description="cosine decay floor; 1.0 keeps the lr flat")
    lr_warmup_steps: int = Field(2000, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay of the dense weights")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam beta2")
    puzzle_emb_lr: float = Field(1e-2, ge=0, description="learning rate of the puzzle embedding (sign SGD)")
    puzzle_emb_weight_decay: float = Field(0.1, ge=0, description="weight decay of the puzzle embedding")
    grad_clip_norm: float | None = Field(None, gt=0, description="global gradient norm clip (None: off)")

    ema: bool = Field(True, description="keep an exponential moving average of the weights (evaluated and saved)")
    ema_rate: float = Field(0.999, gt=0, lt=1, description="EMA decay per step")

    log_interval: int = Field(10, ge=1, description="steps between logged metrics")
    checkpoint_interval: int = Field(
        500, ge=1, description="steps between checkpoints (also written at each evaluation, at the end and on "
        "SIGINT/SIGTERM)")
    keep_checkpoints: int = Field(2, ge=1, description="the newest checkpoints kept")
    max_skipped_steps: int = Field(
        10, ge=1, description="stop after this many updates in a row skipped for a non-finite gradient")
    early_stop: list[EarlyStopRule] = Field(
        default_factory=list, description="rules that end a failing run at an evaluation (the plan's experiments: "
        "eval/train/exact_accuracy below 0.2 at half the steps)")
    resume: bool = Field(True, description="continue from run_dir's checkpoint when there is one")
    init_from: str | None = Field(
        None, description="start a new run from these model weights: a checkpoint (folder or state.pt) of this "
        "framework, or a state dict saved by the published TRM")
    extend: bool = Field(
        False, description="continue a finished run: with more epochs or max_steps, train on; with the same "
        "length, evaluate its last checkpoint again")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the recursive core and the demonstration encoder (auto: on CUDA)")
    tf32: bool = Field(True, description="TF32 matrix products on CUDA where float32 remains (outside bf16 autocast)")
    ddp: bool = Field(
        False, description="with several ranks, reduce dense gradients with DistributedDataParallel (bucketed, "
        "overlapped with the backward pass) instead of one all-reduce after it")

    @field_validator("arch", mode="before")
    @classmethod
    def _arch_of_its_conditioner(cls, value):
        """``arch`` is validated by the schema of the conditioner it names (its keys and the core's)."""
        load_conditioners()
        return validate_arch(value)


EARLY_STOP = "early stop"  # how an early_stop rule's stop reason begins


def stopped_early(summary: dict) -> bool:
    """Whether a run's summary says an ``early_stop`` rule ended it."""
    return str(summary.get("stop_reason", "")).startswith(EARLY_STOP)


def early_stop_reason(rules: list[EarlyStopRule], metrics: dict[str, float], step: int, total_steps: int) -> str | None:
    """Why the evaluation ``metrics`` at ``step`` of ``total_steps`` end the run, or None. A rule
    whose metric the evaluation lacks is an error (a misspelt name would never stop anything)."""
    for rule in rules:
        if step < rule.at_fraction * total_steps:
            continue
        if rule.metric not in metrics:
            raise InputError(f"early_stop: metric {rule.metric!r} is not among the evaluation's metrics "
                             f"(e.g. {', '.join(sorted(metrics)[:5])}, ...)")  # fmt: skip
        value = metrics[rule.metric]
        if value < rule.below:
            return (f"{EARLY_STOP}: {rule.metric} = {value:.4g} < {rule.below} at step {step} "
                    f"({step / total_steps:.0%} of {total_steps}, rule from {rule.at_fraction:.0%})")
    return None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


NAMES = ("hydra", "experiment", "preset")  # in a run's config.yaml, names of what was chosen, not settings


def validate(raw: dict[str, Any]) -> TrainConfig:
    """Validate a plain dict (a resolved Hydra config, or a stored one after :func:`upgrade`)."""
    try:
        return TrainConfig.model_validate({k: v for k, v in raw.items() if k not in NAMES})
    except ValidationError as e:
        raise ConfigError(f"invalid configuration:\n{_format_errors(e)}") from None


def conditioner_of(raw: dict[str, Any]) -> str:
    """The conditioner a plain config names (``arch.conditioner``, or the schema's default)."""
    return (raw.get("arch") or {}).get("conditioner", ArchConfig.model_fields["conditioner"].default)


# Keys of the demonstration encoders that were top-level before they moved into arch.
_MOVED_INTO_ARCH = ("encoder_lr_scale", "encoder_lr_warmup_steps")


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A config stored before ``arch.conditioner`` existed (a run's config.yaml, a checkpoint's
    config), in today's form: the conditioner named as the entry point that wrote it chose it
    (``demo_encoder`` where ``arch`` holds the encoder's keys, else ``puzzle_embedding``), and the
    encoder's learning-rate keys moved from the top level into ``arch``. A config of today comes
    back unchanged (a copy)."""
    raw = {**raw, "arch": dict(raw.get("arch") or {})}
    if "conditioner" not in raw["arch"]:
        raw["arch"]["conditioner"] = "demo_encoder" if "encoder_type" in raw["arch"] else "puzzle_embedding"
    for key in _MOVED_INTO_ARCH:
        if key in raw:
            raw["arch"][key] = raw.pop(key)
    return raw


@dataclass(frozen=True)
class RunPlan:
    """Values derived from the config and the dataset, computed once."""

    world_size: int
    local_batch_size: int
    examples_per_epoch: int
    total_steps: int  # length of the lr schedule: epochs of examples / global batch
    last_step: int  # where training stops (max_steps may cut it short)
    eval_interval_examples: int  # examples drawn between evaluations; 0: evaluate only at the end
    global_batch_size: int
    local_eval_batch_size: int

    def evaluates_at(self, step: int) -> bool:
        """Whether training evaluates after ``step``: at the last step, and where each further
        ``eval_interval`` epochs of examples end (step ``k * interval examples // global batch``,
        k = 1, 2, ...), so the end of the last interval is the final evaluation, not a second one
        a few steps before it (rounding each interval down would drift by a step per interval)."""
        if step >= self.last_step or not self.eval_interval_examples:
            return step == self.last_step
        # k: the last interval whose end, k * examples / batch, lies before step + 1
        k = ((step + 1) * self.global_batch_size - 1) // self.eval_interval_examples
        return k >= 1 and k * self.eval_interval_examples // self.global_batch_size == step


def plan_run(cfg: TrainConfig, examples_per_epoch: int, world_size: int) -> RunPlan:
    if cfg.global_batch_size % world_size:
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by {world_size} ranks")
    eval_batch = cfg.eval.batch_size or cfg.global_batch_size
    if eval_batch % world_size:
        raise ConfigError(f"eval.batch_size {eval_batch} is not divisible by {world_size} ranks")
    # Steps come from the examples an epoch draws (not from the number of groups).
    total = max(1, (cfg.epochs * examples_per_epoch) // cfg.global_batch_size)
    interval_examples = 0
    if cfg.eval_interval is not None and cfg.eval_interval < cfg.epochs:
        interval_examples = cfg.eval_interval * examples_per_epoch
    return RunPlan(
        world_size=world_size,
        local_batch_size=cfg.global_batch_size // world_size,
        examples_per_epoch=examples_per_epoch,
        total_steps=total,
        last_step=total if cfg.max_steps is None else min(total, cfg.max_steps),
        eval_interval_examples=interval_examples,
        global_batch_size=cfg.global_batch_size,
        local_eval_batch_size=eval_batch // world_size,
    )

