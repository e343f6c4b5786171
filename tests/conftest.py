"""Test set-up. Triton kernels run in the CPU interpreter when no GPU is present: the variable must be set
before any ``@triton.jit`` decorates, so it is set here, before the tests import detr_kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: on a busy 2-core machine several threads spin against each other (tiny
    forwards ran ~100x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
