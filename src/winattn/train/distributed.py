"""Process-group set-up for ``torchrun`` (PyTorch DDP): gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device name winattn runs on, or None: the spelling only (whether
    the device exists is :func:`resolve_device`'s question)."""
    if name in ("auto", "cpu", "cuda"):
        return None
    if name.startswith("cuda:") and name[5:].isdigit():
        return None
    return f"expected {DEVICE_CHOICES}, got {name!r}"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``--device NAME`` means on this process, checked to exist.

    ``auto`` is the GPU when there is one, else the CPU; ``cuda`` is this process's GPU under
    ``torchrun`` (``LOCAL_RANK`` modulo the number of GPUs); ``cuda:N`` is GPU ``N``.

    Raises:
        ValueError: a name that is none of these, or a GPU that this machine does not have.
    """
    problem = device_problem(name)
    if problem:
        raise ValueError(f"device: {problem}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device: got {name!r} but no CUDA device is available "
                         f"(torch {torch.__version__}); use cpu or auto")
    count = torch.cuda.device_count()
    index = local_rank % count if name == "cuda" else int(name[5:])
    if index >= count:
        raise ValueError(f"device: got {name!r} but this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def setup(device: str = "auto") -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a single-process run.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op on one process); returns it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
