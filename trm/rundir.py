"""The run directory, and the decisions taken before anything is written into it.

``runs/<run_name>/`` (or ``run_dir``) holds ``config.yaml`` (the config the run started with),
``metrics.jsonl``, ``summary.json`` (written when the run ends), ``checkpoints/``
(:mod:`trm.checkpoint`) and, with wandb, ``wandb/`` and ``wandb_id.txt``. A directory is:

- *new*: absent, or holding no checkpoint and no metrics (what a run that failed before its first
  step may leave): it is (re)used;
- *resumed*: it holds a checkpoint, and the command's config differs from the stored one only in
  :data:`RESUMABLE_KEYS` (and, with ``extend=true``, :data:`EXTEND_KEYS`); any other difference is
  refused, each key named with its stored and its new value, and nothing is changed;
- *finished*: its ``summary.json`` and a checkpoint at its last step exist (or it was stopped early
  by an ``early_stop`` rule): rerunning the command says so and changes nothing; ``extend=true``
  trains on (a longer schedule) or evaluates again.

:func:`inspect` decides without writing; :func:`open_run` then creates what the run needs.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml

from trm import checkpoint
from trm.config import NAMES, stopped_early, upgrade, validate
from trm.errors import InputError
from trm.filelock import exclusive

# Keys that may change when a run is resumed: where it logs and how often it evaluates or saves,
# not what it trains. max_steps only moves where this invocation stops (the schedule keeps its length).
RESUMABLE_KEYS = ("run_name", "run_dir", "resume", "extend", "device", "compile", "tf32", "ddp", "max_steps", "log_interval",
                  "eval_interval", "checkpoint_interval", "keep_checkpoints", "eval", "wandb")  # fmt: skip
EXTEND_KEYS = ("epochs",)  # also with extend=true: a longer schedule
# What a run failing before step 1 may leave, and the queue runner's log (scripts/run_jobs.py).
LEFTOVERS = {"config.yaml", "wandb_id.txt", "wandb", "checkpoints", "job.log"}


class RunDirError(InputError, FileExistsError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class RunDir:
    path: Path
    status: Literal["new", "resume", "finished"]
    auto_name: bool  # the name was generated: claim a fresh one if it is taken
    checkpoint_step: int = 0
    longer: bool = False  # extend=true with a longer schedule: the new config becomes the stored one


def in_use_lock(cfg):
    """A lock beside a named run directory (``.<name>.lock``), held by rank 0 for the command's
    life: a second command on the same directory, here or on another host sharing it, is refused
    in one line while the first runs (two runs writing one folder would mix their checkpoints and
    metrics). A generated name is claimed fresh (:func:`open_run`) and needs none."""
    if cfg.run_dir is None and cfg.run_name is None:
        return contextlib.nullcontext()
    path = Path(cfg.run_dir or Path("runs") / cfg.run_name)
    return exclusive(path, f"run directory {path}", wait=False)


def default_run_name(raw: dict, suffix: str = "") -> str:
    """``<experiment>[-<preset>][-<suffix>]-<date>-<time>``."""
    parts = [p for p in (raw.get("experiment"), raw.get("preset")) if p] or ["run"]
    return "-".join(parts + ([suffix] if suffix else [])) + f"-{datetime.now():%Y%m%d-%H%M%S}"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(stored: dict, new: dict, allowed: tuple[str, ...]) -> list[str]:
    """'key: stored X, now Y' for every leaf that differs outside ``allowed`` (top-level names)."""
    a, b = flatten(stored), flatten(new)
    lines = []
    for key in sorted(a.keys() | b.keys()):
        if key.split(".")[0] in allowed:
            continue
        old, now = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old != now:
            lines.append(f"{key}: stored {old!r}, now {now!r}")
    return lines


def _holds_results(path: Path) -> list[str]:
    """What in ``path`` a new run must not overwrite."""
    found = [p.name for p in path.iterdir() if p.name not in LEFTOVERS]
    if (path / "checkpoints").is_dir() and any(not p.name.startswith(".") for p in (path / "checkpoints").iterdir()):
        found.append("checkpoints/")
    return found


def inspect(cfg, raw: dict, last_step: int) -> RunDir:
    """Decide what the command does with its run directory; writes nothing."""
    auto = cfg.run_dir is None and cfg.run_name is None
    path = Path(cfg.run_dir or Path("runs") / (cfg.run_name or default_run_name(raw)))
    if not path.exists() or auto:
        return RunDir(path, "new", auto)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} is a file")
    folders = checkpoint.checkpoints(path / "checkpoints")
    if not folders:
        found = _holds_results(path)
        if found:
            raise RunDirError(f"run directory {path} already holds files ({', '.join(sorted(found))}) and no checkpoint "
                              "to resume from: pick another +run_name=... or run_dir=..., or delete it")  # fmt: skip
        return RunDir(path, "new", auto)
    if not cfg.resume:
        raise RunDirError(f"run directory {path} holds checkpoints and resume=false: pick another +run_name=... "
                          "or run_dir=..., or delete it")  # fmt: skip
    stored = _settings(path / "config.yaml")
    new = {**{n: raw.get(n) for n in NAMES if n in raw}, **cfg.model_dump()}
    changes = changed_keys(stored, new, RESUMABLE_KEYS + (EXTEND_KEYS if cfg.extend else ()))
    if changes:
        hint = "" if cfg.extend else " (extend=true also allows: " + ", ".join(EXTEND_KEYS) + ")"
        raise RunDirError(f"cannot resume {path}: the config differs from the stored one{hint}\n  " + "\n  ".join(changes))
    step = checkpoint.step_of(folders[0])
    summary = path / "summary.json"
    ended = _read_json(summary) if summary.is_file() else {}
    early = stopped_early(ended)
    finished = bool(ended) and (step >= last_step or early) and not ended.get("diverged")
    longer = bool(changed_keys(stored, new, RESUMABLE_KEYS))  # only EXTEND_KEYS can differ here
    return RunDir(path, "finished" if finished and not cfg.extend else "resume", auto, step, longer)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} is unreadable ({e})") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path} does not hold a JSON object")
    return value


def _read_config(path: Path) -> dict:
    """The stored config a resumed run is checked against."""
    if not path.is_file():
        raise RunDirError(f"{path} is missing: cannot check that this command continues the same run")
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunDirError(f"{path} is unreadable ({e})") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path} does not hold a config mapping")
    return value


def _settings(path: Path) -> dict:
    """What a stored config.yaml sets, as the command's config is compared with it: validated (a key
    added since gets its default, as it gets in the command's config) after :func:`trm.config.upgrade`
    (a config of an earlier version in today's form), plus the experiment and preset names."""
    raw = upgrade(_read_config(path))
    try:
        cfg = validate(raw)
    except InputError as e:
        raise RunDirError(f"cannot resume {path.parent}: its stored config {path} does not validate here ({e})") from None
    return {**{n: raw.get(n) for n in NAMES if n in raw}, **cfg.model_dump()}


def finished_summary(run: RunDir) -> dict:
    return _read_json(run.path / "summary.json")


def open_run(run: RunDir, raw: dict, resume_step: int, reevaluate: bool) -> Path:
    """Create or prepare the directory (rank 0 only); returns its final path. New: the folder is
    claimed (a generated name taken meanwhile gets a suffix) and config.yaml written. Resumed:
    metrics.jsonl keeps only the rows up to the checkpoint's step (without that step's evaluation
    when it is run again, ``reevaluate``). Extended: the previous config.yaml and summary.json are
    kept under dated names and the new config written, so that the longer run is the stored one."""
    path = run.path
    if run.status == "new":
        if run.auto_name:
            path = _claim(path)
        else:
            path.mkdir(parents=True, exist_ok=True)
        raw["run_name"] = path.name
        checkpoint.write_text_atomic(path / "config.yaml", yaml.safe_dump(raw, sort_keys=False))
        return path
    truncate_metrics(path / "metrics.jsonl", resume_step, drop_eval_at_step=reevaluate)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    summary = path / "summary.json"
    if summary.is_file():
        os.replace(summary, path / f"summary.{stamp}.json")
    if run.longer:
        os.replace(path / "config.yaml", path / f"config.{stamp}.yaml")
        checkpoint.write_text_atomic(path / "config.yaml", yaml.safe_dump(raw, sort_keys=False))
    return path


def _claim(path: Path) -> Path:
    """Create ``path`` (or ``path-2``, ``path-3``, ...) atomically: two runs started in the same
    second get different folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RunDirError(f"no free run directory name next to {path}")


def truncate_metrics(path: Path, step: int, drop_eval_at_step: bool = False) -> None:
    """Keep the rows of ``path`` logged at or before ``step`` (those the checkpoint saw), except,
    with ``drop_eval_at_step``, the evaluation rows of ``step`` itself; a row cut by a kill is
    dropped."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or row.get("step", 0) > step:
            continue
        if drop_eval_at_step and row.get("step") == step and any(k.startswith(("eval/", "ARC/")) for k in row):
            continue
        kept.append(line)
    if kept != lines:
        checkpoint.write_text_atomic(path, "".join(line + "\n" for line in kept))
