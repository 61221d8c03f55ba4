"""Helpers shared by the test modules: a tiny training run's overrides and what it leaves behind."""

import json
from pathlib import Path

import torch


def tiny_overrides(tiny_dataset, run_dir, *extra):
    path, o = tiny_dataset
    return [
        "experiment=E0v2", f"data.path={path}", f"data.num_train_groups={o.num_train_groups}",
        f"data.num_eval_groups={o.num_eval_groups}", f"data.num_augmentations={o.num_augmentations}",
        f"data.max_grid_size={o.max_grid_size}", "arch.hidden_size=32", "arch.num_heads=2",
        "arch.H_cycles=2", "arch.L_cycles=1", "arch.puzzle_emb_len=2", "arch.halt_max_steps=3",
        "global_batch_size=8", "epochs=4", "eval_interval=2", "lr_warmup_steps=2", "log_interval=2",
        "eval.train_augmentations=1", "wandb.mode=disabled", "early_stop=[]", f"run_dir={run_dir}", *extra,
    ]  # fmt: skip


def final_state(run_dir):
    latest = (Path(run_dir) / "checkpoints" / "latest").read_text()
    return torch.load(Path(run_dir) / "checkpoints" / latest / "state.pt", weights_only=False)


def read_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def optimiser_tensors(state) -> list[torch.Tensor]:
    return [t for s in state["optimisers"]["dense"]["state"].values() for t in (s["exp_avg"], s["exp_avg_sq"])]


def run_forked_ranks(target, world: int, *args, timeout: float = 300) -> None:
    """``target(rank, world, *args)`` in ``world`` forked processes (what they need is inherited,
    not pickled); each must exit 0."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=target, args=(r, world, *args)) for r in range(world)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=timeout)
        assert p.exitcode == 0
