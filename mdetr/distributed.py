"""torch.distributed helpers: start-up under torchrun, rank queries, reductions. A single process needs none of
it and every helper is a no-op there."""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_request: str) -> Tuple[torch.device, int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any.

    NCCL on CUDA, gloo on CPU. Returns (device, rank, world_size).
    """
    want_cuda = device_request == "cuda" or (device_request == "auto" and torch.cuda.is_available())
    if device_request == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch.cuda.is_available() is False")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if want_cuda:
            torch.cuda.set_device(local_rank)
        if not is_distributed():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
        return device, rank(), world_size()
    return torch.device("cuda" if want_cuda else "cpu"), 0, 1


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (the input itself on one process). Differentiable inputs are not expected."""
    if not is_distributed():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (the input itself on one process), returned on the input's device: counts kept on the CPU
    travel through the GPU under NCCL."""
    if not is_distributed():
        return value
    summed = value.to(_collective_device(), copy=True)
    dist.all_reduce(summed)
    return summed.to(value.device)


def all_gather_objects(obj: object) -> List[object]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one process."""
    if not is_distributed():
        return [obj]
    gathered: List[object] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
