"""Process-group setup and the few collectives training needs. Works with and without torchrun:
NCCL on CUDA, gloo on CPU; a single process needs no process group at all."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trm.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_scheduler() -> None:
    """Inside a submitit job of several tasks (``hydra/launcher=slurm_4gpu``: one task per GPU),
    set torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) from the job's environment, so that everything after sees what torchrun gives.
    Nothing happens under torchrun, in a plain process, or without submitit installed."""
    if "WORLD_SIZE" in os.environ:
        return
    try:
        import submitit

        job = submitit.JobEnvironment()
    except (ImportError, RuntimeError):
        return
    if job.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(device: str = "auto") -> DistEnv:
    """Read torchrun's environment, pick the device and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available (device=auto or device=cpu runs here)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if local_world > 1:  # share the cores between the ranks of this machine
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn):
    """``fn()`` run by rank 0 alone (file-system decisions), its result on every rank. When it
    raises, every rank raises: rank 0 its own exception, the others the same one (or a
    RuntimeError naming it), so that no rank waits for a broadcast that never comes."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    if dist.is_initialized():
        try:
            result, error_box = broadcast_object((result, error))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            result, error_box = broadcast_object((None, RuntimeError(f"rank 0 failed: {error!r}")))
        if error is None and error_box is not None:
            error = error_box
    if error is not None:
        raise error
    return result


def all_reduce_max(value: float, device) -> float:
    """The largest ``value`` over ranks (one collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over ranks in place, in one flat collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    for t, reduced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(reduced)
