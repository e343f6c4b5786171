"""Test set-up. Triton kernels run in the CPU interpreter when no GPU is present: the variable must be set
before any ``@triton.jit`` decorates, so it is set here, before the tests import detr_kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
