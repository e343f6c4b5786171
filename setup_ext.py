"""How setup.py builds the compiled assignment solver (``csrc/`` -> ``detr_kernels._C``).

* torch importable at build time (``pip install --no-build-isolation ...``): the op is built, CPU always, CUDA
  too when ``DETR_KERNELS_BUILD_CUDA=1``, or when it is ``auto`` (the default) and a GPU and the CUDA toolkit
  are visible. The extension is optional: a compiler failure leaves a warning and the JIT path of
  ``detr_kernels._ext``, never a failed install.
* torch not importable: nothing is compiled; ``detr_kernels._ext`` JIT-builds the op on first use.
* ``csrc/`` is copied into the built package (``detr_kernels/csrc``) so a non-editable install can JIT-build too.
"""
import os
import shutil
from pathlib import Path

from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _cpp_extension():
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except Exception:  # torch missing or broken at build time: leave it to the JIT path
        return None
    return cpp_extension


def _build_cuda(cpp_extension) -> bool:
    import torch

    flag = os.environ.get("DETR_KERNELS_BUILD_CUDA", "auto")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "1":
        return possible
    return flag == "auto" and possible and torch.cuda.is_available()


def extensions():
    cpp_extension = _cpp_extension()
    if cpp_extension is None:
        print("detr_kernels: torch is not importable at build time; the solver will be JIT-compiled on first use")
        return []
    openmp = ["-fopenmp"]
    args = dict(extra_compile_args={"cxx": ["-O3", *openmp], "nvcc": ["-O3"]}, extra_link_args=openmp,
                optional=True)
    cpp_sources = sorted(f"{CSRC}/{p.name}" for p in (ROOT / CSRC).glob("*.cpp"))
    if _build_cuda(cpp_extension):
        cuda_sources = sorted(f"{CSRC}/{p.name}" for p in (ROOT / CSRC).glob("*.cu"))
        return [cpp_extension.CUDAExtension("detr_kernels._C", cpp_sources + cuda_sources, **args)]
    args["extra_compile_args"] = {"cxx": args["extra_compile_args"]["cxx"]}
    return [cpp_extension.CppExtension("detr_kernels._C", cpp_sources, **args)]


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package, where ``detr_kernels._ext.csrc_dir`` looks first."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "detr_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in (ROOT / CSRC).glob("*"):
            if source.suffix in (".cpp", ".cu", ".h", ".cuh"):
                shutil.copy2(source, target / source.name)


def build_ext_cmdclass():
    cmdclass = {"build_py": BuildPyWithSources}
    cpp_extension = _cpp_extension()
    if cpp_extension is not None:
        cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return cmdclass
