"""One logger for every metric: a local ``metrics.jsonl`` (one JSON object per logged step) and,
when enabled, wandb. Only rank 0 writes. wandb never prompts for a login: without credentials it
runs offline (``wandb sync <run_dir>/wandb/offline-run-*`` uploads later)."""

from __future__ import annotations

import json
import math
import netrc
import os
import uuid
from pathlib import Path

from trm.checkpoint import write_text_atomic
from trm.config import WandbConfig


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if _has_wandb_credentials() else "offline"


class RunLogger:
    def __init__(self, run_dir: Path, run_name: str, config: dict, wandb_cfg: WandbConfig, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb = None
        if not enabled:
            return
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        mode = resolve_wandb_mode(wandb_cfg)
        if mode != "disabled":
            self.wandb = self._init_wandb(mode, run_name, config, wandb_cfg)

    def _init_wandb(self, mode: str, run_name: str, config: dict, cfg: WandbConfig):
        import wandb

        # A stable id per run directory, so a resumed run continues the same wandb run.
        id_file = self.run_dir / "wandb_id.txt"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        kwargs = dict(
            project=cfg.project, entity=cfg.entity, name=run_name, tags=cfg.tags, config=config,
            dir=str(self.run_dir), id=id_file.read_text().strip(), resume="allow",
            settings=wandb.Settings(console="off", quiet=True),
        )  # fmt: skip
        try:
            return wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - a network failure must not stop training
            if mode != "online":
                raise
            print(f"wandb online failed ({e}); logging offline instead")
            return wandb.init(mode="offline", **kwargs)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps({"step": step, **clean}) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self, summary: dict[str, float]) -> None:
        """Write ``summary.json`` (the run is over) and close."""
        if self.enabled:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            if self.wandb is not None:
                self.wandb.summary.update(summary)
        self.close()

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
