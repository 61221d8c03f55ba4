"""Checkpoints: one folder per save holding the shared training state (``state.pt``, written by
rank 0) and each rank's own part (``rank_<r>.pt``: its ACT carry and random-number states).
Folders are written under a temporary name and renamed, and ``latest`` names the newest complete
one, so an interrupted save never replaces a good checkpoint."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from trm.distributed import DistEnv, barrier


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_root: Path, step: int, shared: dict, own: dict, env: DistEnv, keep_previous: bool = False) -> Path:
    """Every rank calls this; returns the checkpoint folder."""
    name = f"step_{step:08d}"
    tmp = ckpt_root / f".{name}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(own, tmp / f"rank_{env.rank}.pt")
    if env.is_main:
        torch.save({**shared, "world_size": env.world_size}, tmp / "state.pt")
    barrier()
    final = ckpt_root / name
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        previous = latest(ckpt_root)
        (ckpt_root / "latest.tmp").write_text(name)
        os.replace(ckpt_root / "latest.tmp", ckpt_root / "latest")
        if previous is not None and previous != final and not keep_previous:
            shutil.rmtree(previous, ignore_errors=True)
    barrier()
    return final


def latest(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    folder = ckpt_root / pointer.read_text().strip()
    return folder if (folder / "state.pt").is_file() else None


def load(folder: Path, env: DistEnv) -> tuple[dict, dict | None]:
    """(shared state, this rank's own part or None when the world size changed)."""
    shared = torch.load(folder / "state.pt", map_location=env.device, weights_only=False)
    own_file = folder / f"rank_{env.rank}.pt"
    own = None
    if shared["world_size"] == env.world_size and own_file.is_file():
        own = torch.load(own_file, map_location=env.device, weights_only=False)
    return shared, own
