"""The one place that decides which backend each op of ``detr_kernels`` runs on.

Every public op takes ``backend="auto"`` or an explicit name. ``resolve`` turns that into a concrete backend
for the tensors' device and refuses, with a message that names the op, what was asked and what is available,
when the request cannot run here. Nothing falls back silently: ``describe``/``report`` say what ``auto`` picks.

Backends per op (in ``auto``'s order of preference):

=============  ===========================================  ===============================
op             on CUDA                                      on CPU
=============  ===========================================  ===============================
attention      sdpa, triton, reference                      sdpa, reference (+ triton when
                                                            ``TRITON_INTERPRET=1``, explicit)
matcher        cuda (compiled op), scipy                    cpp (compiled op), scipy
contrastive    triton, reference                            reference (+ triton interpreted)
soft_token     triton, reference                            reference (+ triton interpreted)
=============  ===========================================  ===============================

Attention on CUDA prefers SDPA to the Triton kernels by measurement (benchmarks/RESULTS.md, H200, bf16, MDETR's
shapes, three runs). The Triton op's kernels take 0.26 ms of GPU time for forward + backward at B=16, L=1000, but
a call costs ~1 ms of host time (key compaction, four launches, autograd): 0.75-2.2 ms of wall time at every
benchmarked shape. So at MDETR's per-GPU batches (B <= 16) SDPA is 1.1x to 4x faster in wall time, the Triton op
wins only at the largest shape (B=32, L=1400: 1.09-1.42x), and a training step of the paper's model with the
Triton attention was 0.84-0.91x as fast as the reference. ``backend="triton"`` still selects the kernels.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Dict, Iterable, List, Tuple

import torch

logger = logging.getLogger("detr_kernels")

OPS: Tuple[str, ...] = ("attention", "matcher", "contrastive", "soft_token")

_ALL_BACKENDS: Dict[str, Tuple[str, ...]] = {
    "attention": ("sdpa", "triton", "reference"),
    "matcher": ("cuda", "cpp", "scipy"),
    "contrastive": ("triton", "reference"),
    "soft_token": ("triton", "reference"),
}

# the pure-PyTorch (scipy for the solver) backend of each op: the oracle of tests and the non-fused path
REFERENCE_BACKENDS: Dict[str, str] = {"attention": "reference", "matcher": "scipy", "contrastive": "reference",
                                      "soft_token": "reference"}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or device."""


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package is installed (checked once, at import)."""
    return _TRITON_AVAILABLE


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def matcher_extension_status() -> Tuple[bool, bool, str]:
    """(cpu op loaded, cuda op loaded, how it was found) for the compiled assignment solver."""
    try:
        from detr_kernels import _ext
    except ImportError as err:  # the extension loader itself is missing: a broken install
        return False, False, f"loader missing ({err})"
    return _ext.status()


def available(op: str, device: torch.device | str) -> List[str]:
    """Concrete backends of ``op`` that can run on ``device``, best first."""
    if op not in _ALL_BACKENDS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    out: List[str] = []
    if op == "attention":
        out.append("sdpa")  # best first, on CUDA too: see the module doc
        if triton_available() and (cuda or triton_interpreted()):
            out.append("triton")
        out.append("reference")
    elif op == "matcher":
        cpu_ok, cuda_ok, _ = matcher_extension_status()
        if cuda and cuda_ok:
            out.append("cuda")
        if cpu_ok and not cuda:  # the C++ op takes CPU tensors; CUDA costs without the CUDA op go to scipy
            out.append("cpp")
        out.append("scipy")
    else:
        if triton_available() and (cuda or triton_interpreted()):
            out.append("triton")
        out.append("reference")
    return out


def auto_choice(op: str, device: torch.device | str) -> str:
    """What ``backend="auto"`` picks for ``op`` on ``device``.

    The interpreter is a correctness tool, never a speed choice: on CPU ``auto`` does not pick Triton even when
    ``TRITON_INTERPRET=1``.
    """
    device = torch.device(device)
    for name in available(op, device):
        if name == "triton" and device.type != "cuda":
            continue
        return name
    raise AssertionError("unreachable: every op has a pure-PyTorch backend")


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """Turn ``backend`` (``"auto"`` or a name) into the concrete backend that will run ``op`` on ``device``."""
    if backend == "auto":
        return auto_choice(op, device)
    if backend not in _ALL_BACKENDS[op]:
        raise ValueError(
            f"backend for {op} must be 'auto' or one of {_ALL_BACKENDS[op]}, got {backend!r}"
        )
    names = available(op, device)
    if backend not in names:
        why = ""
        if backend == "triton":
            why = " (Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import)"
        elif backend in ("cpp", "cuda"):
            why = f" (compiled op: {matcher_extension_status()[2]})"
        raise BackendUnavailableError(
            f"backend {backend!r} for {op} is not available on {torch.device(device)}{why}; available: {names}"
        )
    return backend


def describe(device: torch.device | str, requested: Dict[str, str] | None = None) -> Dict[str, str]:
    """The concrete backend each op gets on ``device`` for the requested backends (default: all ``auto``)."""
    requested = requested or {}
    return {op: resolve(op, requested.get(op, "auto"), device) for op in OPS}


_reported: set = set()


def report(choices: Dict[str, str], device: torch.device | str, printer=print) -> None:
    """Say once per process which backend every op got (``choices`` as returned by ``describe``)."""
    key = (str(device), tuple(sorted(choices.items())))
    if key in _reported:
        return
    _reported.add(key)
    width = max(len(op) for op in choices)
    lines = [f"detr_kernels backends on {torch.device(device)}:"]
    for op, name in choices.items():
        extra = ""
        if op == "matcher" and name in ("cpp", "cuda"):
            extra = f"  [compiled op: {matcher_extension_status()[2]}]"
        elif op == "attention" and name == "sdpa" and torch.device(device).type == "cpu":
            extra = "  [bf16 / fp16 inputs computed in fp32: faster on the CPU]"
        lines.append(f"  {op:<{width}}  {name}{extra}")
    printer("\n".join(lines))

