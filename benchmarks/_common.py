"""Shared helpers of the benchmark suites: where to run, how to time, what to record.

Every benchmark records ``benchmark.extra_info`` with the keys ``op``, ``provider``, ``mode`` (forward,
backward, both), ``shape`` (a short string), ``dtype`` and, where it applies, ``flops`` (useful floating-point
operations of one call), ``peak_mem_mb`` and ``launches``. ``benchmarks/gpu/summarize.py`` reads them back.
"""
from __future__ import annotations

import platform
from typing import Callable, Dict, Optional

import torch


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak extra device memory (MiB) of one call of ``fn`` above what was allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def count_launches(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Number of device kernels one call of ``fn`` launches (CUDA only, via the profiler)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run_timed(benchmark, fn: Callable[[], object], device: torch.device, rounds: int = 20, warmup: int = 3):
    """Time ``fn`` with device synchronisation inside the timed region."""

    def call():
        out = fn()
        synchronize(device)
        return out

    for _ in range(warmup):
        call()
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)


def record(benchmark, *, op: str, provider: str, mode: str, shape: str, dtype: str, device: torch.device,
           flops: Optional[float] = None, peak_mem_mb: Optional[float] = None,
           launches: Optional[int] = None, **extra) -> None:
    info: Dict[str, object] = dict(op=op, provider=provider, mode=mode, shape=shape, dtype=dtype,
                                   device=device_name(device), torch=torch.__version__)
    if flops is not None:
        info["flops"] = flops
    if peak_mem_mb is not None:
        info["peak_mem_mb"] = round(peak_mem_mb, 2)
    if launches is not None:
        info["launches"] = launches
    info.update(extra)
    benchmark.extra_info.update(info)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
