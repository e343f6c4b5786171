"""Installs the packages ``mdetr`` and ``detr_kernels``.

The compiled assignment solver (``csrc/``) is built here when torch is importable at build time (use
``pip install --no-build-isolation -e .`` so the build sees the installed torch). Where it cannot be built the
install still succeeds: ``detr_kernels._ext`` JIT-compiles the op from ``csrc`` on first use, and says so.
"""
from setuptools import find_packages, setup

from setup_ext import build_ext_cmdclass, extensions

setup(
    name="mdetr",
    version="0.1.0",
    description="MDETR (modulated detection) as a fast, verified PyTorch training stack, with fused DETR kernels",
    packages=find_packages(include=["mdetr", "mdetr.*", "detr_kernels", "detr_kernels.*"]),
    package_data={"detr_kernels": ["csrc/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # torch.serialization.safe_globals with (function, name) pairs (checkpoint loading)
        "torchvision",
        "timm>=1.0",
        "transformers>=4.40",
        "scipy",
        "numpy",
        "pillow>=10.1",  # ImageFont.load_default(size=) for the prediction panels
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "pycocotools"],
        "coco": ["pycocotools"],
    },
    ext_modules=extensions(),
    cmdclass=build_ext_cmdclass(),
)
