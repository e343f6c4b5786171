"""Finds, or builds, the compiled assignment solver ``detr_kernels::linear_sum_assignment`` (sources in ``csrc/``).

Order: the module ``detr_kernels._C`` that setup.py built; otherwise a JIT build of ``csrc`` with
``torch.utils.cpp_extension.load`` (said once, on one line, on stderr; ninja caches it under
``TORCH_EXTENSIONS_DIR``, so later processes only load it). When the prebuilt module has no CUDA kernel but
this process has a GPU and a CUDA toolkit, only the ``csrc/*.cu`` files are JIT-built and register their kernels
on the same ops. ``status()`` never raises: a failure is reported in its third field and the matcher falls back
to scipy through ``detr_kernels._backend`` (which says so).

Environment: ``DETR_KERNELS_NO_JIT=1`` forbids JIT builds (prebuilt module or nothing).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch

OP = "detr_kernels::linear_sum_assignment"
_lock = threading.Lock()
_status: Optional[Tuple[bool, bool, str]] = None


def csrc_dir() -> Optional[Path]:
    """The folder holding the C++/CUDA sources: inside the installed package, or the checkout's top level."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "matcher.cpp").is_file():  # one of the sources; all *.cpp / *.cu there are built
            return candidate
    return None


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(OP, dispatch_key)
    except RuntimeError:  # the op is not defined (yet)
        return False


def _cuda_buildable() -> bool:
    """A GPU is visible and the CUDA toolkit torch would compile with is there."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    cuda_home = _cpp_extension().CUDA_HOME
    return cuda_home is not None and (Path(cuda_home) / "bin" / "nvcc").exists()


def _cpp_extension():
    # torch warns at import when no CUDA runtime is visible; irrelevant to a CPU build, so keep it quiet
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


def _jit(name: str, sources: List[Path]) -> None:
    kinds = "+".join(sorted({"CUDA" if s.suffix == ".cu" else "CPU" for s in sources}))
    print(f"detr_kernels: assignment solver ({kinds}) JIT-built from {sources[0].parent} (compiled on first use, "
          "then cached)", file=sys.stderr, flush=True)
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    _cpp_extension().load(name=name, sources=[str(s) for s in sources], extra_cflags=["-O3", *openmp],
                          extra_ldflags=openmp, extra_cuda_cflags=["-O3"], is_python_module=False, verbose=False)


def _prebuilt_is_stale(src: Optional[Path]) -> bool:
    """An editable install's ``_C`` older than the sources it was built from (edited since the last build)."""
    spec = importlib.util.find_spec("detr_kernels._C")
    if spec is None or not spec.origin or src is None:
        return False
    built = Path(spec.origin).stat().st_mtime
    return any(p.stat().st_mtime > built for p in src.iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh"))


def load() -> Tuple[bool, bool, str]:
    """Load (or build) the op; returns ``(cpu_ok, cuda_ok, how)``. May raise on a failed build."""
    how = []
    no_jit = os.environ.get("DETR_KERNELS_NO_JIT", "0") == "1"
    src = csrc_dir()
    if not _has_kernel("CPU"):
        if not no_jit and _prebuilt_is_stale(src):
            how.append("setup.py build older than csrc, ignored")
        else:
            try:
                importlib.import_module("detr_kernels._C")
                how.append("prebuilt by setup.py")
            except ImportError:
                pass
    if not _has_kernel("CPU"):
        if no_jit or src is None:
            why = "DETR_KERNELS_NO_JIT=1" if no_jit else "csrc sources not found"
            return False, False, f"not built by setup.py and not JIT-compiled ({why})"
        want_cuda = _cuda_buildable()
        sources = sorted(src.glob("*.cpp")) + (sorted(src.glob("*.cu")) if want_cuda else [])
        _jit("detr_kernels_ops_cuda" if want_cuda else "detr_kernels_ops_cpu", sources)
        how.append("JIT-compiled from csrc")
    if not _has_kernel("CUDA") and not no_jit and src is not None and _cuda_buildable():
        _jit("detr_kernels_cuda_kernels", sorted(src.glob("*.cu")))
        how.append("CUDA kernel JIT-compiled from csrc")
    if not how:
        how.append("already registered")
    return _has_kernel("CPU"), _has_kernel("CUDA"), ", ".join(how)


def status() -> Tuple[bool, bool, str]:
    """``(cpu_ok, cuda_ok, how)`` of the compiled op, loading or building it on the first call; never raises."""
    global _status
    if _status is not None:  # lock-free once known (also keeps torch.compile tracing through this call)
        return _status
    with _lock:
        if _status is None:
            try:
                _status = load()
            except Exception as err:  # a compiler error must not take the scipy fallback down with it
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                _status = _has_kernel("CPU"), _has_kernel("CUDA"), f"build failed: {first[:300]}"
        return _status
