"""Checkpoints: one folder per save, ``checkpoints/step_<step>/``, holding the shared training state
(``state.pt``, written by rank 0: model, EMA, optimisers, sampler position, step, resolved config,
format version) and each rank's own part (``rank_<r>.pt``: its ACT carry and random-number states).

Durability: every file is written and fsynced inside a hidden temporary folder that is then renamed
into place (and the parent fsynced), so a kill at any instant leaves every earlier checkpoint
loadable; ``latest`` names the newest for people and tools. The newest ``keep`` checkpoints are
kept. Loading walks from the newest down: an unreadable one is reported with its path and the
previous one is used.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from trm.distributed import DistEnv, barrier, on_main
from trm.errors import InputError
from trm.model.published import from_published, is_published

FORMAT_VERSION = 1
_FOLDER = re.compile(r"step_(\d{8})")


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names its file (and tensor)."""


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader (or a kill) sees the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_of(folder: Path) -> int:
    return int(_FOLDER.fullmatch(folder.name).group(1))


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _FOLDER.fullmatch(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=step_of, reverse=True)


def save(root: Path, step: int, shared: dict, own: dict, env: DistEnv, keep: int) -> Path:
    """Every rank calls this; returns the checkpoint folder. Keeps the newest ``keep``."""
    name = f"step_{step:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    _write(own, tmp / f"rank_{env.rank}.pt")
    if env.is_main:
        _write({**shared, "world_size": env.world_size, "format_version": FORMAT_VERSION}, tmp / "state.pt")
    barrier()
    if env.is_main:
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a signal right after an evaluation's save)
            os.replace(final, root / f".{name}.old")
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(root / f".{name}.old", ignore_errors=True)
        write_text_atomic(root / "latest", name)
        for old in checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in root.glob(".step_*"):  # temporary folders of saves that were killed
            shutil.rmtree(leftover, ignore_errors=True)
    barrier()
    return final


def _read(path: Path, device) -> dict:
    state = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(state, dict):
        raise ValueError("not a checkpoint dictionary")
    return state


def _newest_readable(root: Path, device, log) -> tuple[Path, dict] | None:
    """(folder, shared state) of the newest readable checkpoint; an unreadable one is reported and
    set aside as ``<name>.unreadable`` (kept for inspection, out of the rotation)."""
    folders = checkpoints(root)
    for folder in folders:
        try:
            return folder, _read(folder / "state.pt", device)
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            aside = folder.with_name(f"{folder.name}.unreadable")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            log(f"checkpoint {folder / 'state.pt'} is unreadable ({type(e).__name__}: {e}); moved to {aside}, "
                "using the previous one")  # fmt: skip
    if folders:
        raise CheckpointError(f"no readable checkpoint in {root} (tried {', '.join(f.name for f in folders)})")
    return None


def load_latest(root: Path, env: DistEnv, log=print) -> tuple[Path, dict, dict | None] | None:
    """The newest readable checkpoint under ``root``: (folder, shared state, this rank's own part or
    None when the world size changed or its file is unreadable). None when there is none. Rank 0
    chooses the folder, so every rank resumes from the same step."""
    kept = {}

    def choose() -> Path | None:  # rank 0; only the folder's name travels to the other ranks
        found = _newest_readable(root, env.device, log)
        if found is None:
            return None
        kept["shared"] = found[1]
        return found[0]

    chosen = on_main(choose)
    if chosen is None:
        return None
    shared = kept["shared"] if env.is_main else _read(chosen / "state.pt", env.device)
    version = shared.get("format_version", 1)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{chosen / 'state.pt'} has checkpoint format {version}; this code reads {FORMAT_VERSION}")
    own, own_file = None, chosen / f"rank_{env.rank}.pt"
    if shared["world_size"] == env.world_size and own_file.is_file():
        try:
            own = _read(own_file, env.device)
        except Exception as e:  # noqa: BLE001
            log(f"{own_file} is unreadable ({type(e).__name__}); this rank restarts its ACT carry and random streams")
    return chosen, shared, own


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state)``, failing with the name and both shapes of each tensor that
    does not fit, and the names of missing and unexpected ones."""
    own = module.state_dict()
    problems = [f"{k}: {tuple(v.shape)} in {source}, {tuple(own[k].shape)} in the model"
                for k, v in state.items() if k in own and v.shape != own[k].shape]  # fmt: skip
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing:
        problems.append(f"missing from {source}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected)}")
    if problems:
        raise CheckpointError(f"weights of {source} do not fit the configured model:\n  " + "\n  ".join(problems))
    module.load_state_dict(state)


def read_weights_file(path: str | Path) -> tuple[Path, object]:
    """The file behind ``path`` (a run directory: its latest checkpoint; a checkpoint folder: its
    ``state.pt``; a file) and what it holds."""
    folder = Path(path)
    if (folder / "checkpoints" / "latest").is_file():  # a run directory
        folder = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
    file = folder / "state.pt" if folder.is_dir() else folder
    if not file.is_file():
        raise CheckpointError(f"init_from {path}: no such file")
    try:
        return file, torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"init_from {file}: unreadable ({type(e).__name__}: {e})") from None


def initial_weights(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Model weights to start a run from (``init_from``): a run directory (its latest checkpoint),
    a checkpoint folder of this framework or its ``state.pt``, or a state dict saved by the
    published TRM (:mod:`trm.model.published`). Returns the state dict and, for a checkpoint of
    this framework, its EMA state (None otherwise)."""
    file, state = read_weights_file(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state["model"], state.get("ema")
    if isinstance(state, dict) and is_published(state):
        try:
            return from_published(state), None
        except KeyError as e:
            raise CheckpointError(f"init_from {file}: tensor {e.args[0]} has no counterpart in this model") from None
    raise CheckpointError(f"init_from {file}: neither a checkpoint of this framework nor a published TRM state dict")


def start_from(model: torch.nn.Module, path: str) -> None:
    """Load ``path``'s weights (:func:`initial_weights`) into ``model`` (:func:`apply_weights`)."""
    weights, averaged = initial_weights(path)
    apply_weights(model, weights, averaged, path)


def apply_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], averaged: dict | None, source: str) -> None:
    """``weights`` into ``model``; where the checkpoint has EMA weights (``averaged``), those (the
    weights its evaluations used)."""
    from trm.ema import EMA

    load_weights(model, weights, source)
    if averaged is not None:
        averaging = EMA(model, averaged["rate"])
        try:
            averaging.load_state_dict(averaged)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"init_from {source}: its EMA weights do not fit the configured model ({e})") from None
        averaging.copy_to_model()
