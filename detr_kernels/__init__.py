"""Fused ops for DETR-family detectors: attention with key padding, exact batched Hungarian matching,
contrastive-alignment and soft-token losses. Each op has a pure-PyTorch ``*_reference`` next to it.

Depends on torch (and triton, and the compiled ``csrc`` solver where available); never on ``mdetr``.
Submodules are imported on first use, so ``import detr_kernels`` is cheap and does not import triton.
"""
from __future__ import annotations

import importlib
from typing import Any

from detr_kernels._backend import REFERENCE_BACKENDS, BackendUnavailableError, auto_choice, describe, report, resolve

__version__ = "0.1.0"

_EXPORTS = {
    "attention": "detr_kernels.attention",
    "attention_reference": "detr_kernels.attention",
    "FusedMultiheadAttention": "detr_kernels.attention",
    "linear_sum_assignment": "detr_kernels.matcher",
    "linear_sum_assignment_reference": "detr_kernels.matcher",
    "HungarianMatcher": "detr_kernels.matcher",
    "contrastive_align_loss": "detr_kernels.contrastive",
    "contrastive_align_loss_reference": "detr_kernels.contrastive",
    "soft_token_loss": "detr_kernels.soft_token",
    "soft_token_loss_reference": "detr_kernels.soft_token",
}

__all__ = ["REFERENCE_BACKENDS", "BackendUnavailableError", "auto_choice", "describe", "report", "resolve", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'detr_kernels' has no attribute {name!r}")
