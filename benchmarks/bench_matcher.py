"""Hungarian matching: DETR's matcher as written vs the batched exact solver, and solver peers.

Workload (MDETR's): 100 queries, 256 token logits, T ~ U[1, 50] targets per image, 6 decoder layers, B images,
so P = 6 B problems in {24, 96, 384}.

* op ``hungarian_matcher`` (cost building included, all 6 layers): ``detr_scipy`` = DETR's matcher as written,
  called once per layer (cross-batch cost on the device, ``.cpu()``, scipy per image); ``drop_in`` = our
  ``HungarianMatcher.forward`` called the same way; ``dense`` = one ``match_dense`` over the stacked layers
  (then one ``.cpu()``), as a training loop calls it.
* op ``lsa`` (solver only, on precomputed costs): ``scipy_blockdiag`` (scipy per image block), ``lapx_batch``,
  ``torch_linear_assignment`` (where importable), ``ours_cpp``, ``ours_cuda``.
"""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from benchmarks._common import bench_device, count_launches, record, run_timed
from detr_kernels import _ext
from detr_kernels.matcher import (
    HungarianMatcher,
    HungarianMatcherReference,
    linear_sum_assignment,
    matching_cost,
)

LAYERS, QUERIES, TOKENS, MAX_T = 6, 100, 256, 50
WEIGHTS = dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
BATCHES = [4, 16, 64]
DEVICE = bench_device()
CPU_OP, CUDA_OP = _ext.status()[:2]


@functools.lru_cache(maxsize=None)
def workload(batch: int, device: str):
    """Decoder outputs of 6 layers, MDETR targets (per image and padded) and the precomputed costs."""
    g = torch.Generator().manual_seed(batch)
    sizes = torch.randint(1, MAX_T + 1, (batch,), generator=g)
    logits = torch.randn(LAYERS, batch, QUERIES, TOKENS, generator=g)
    boxes = torch.cat([torch.rand(LAYERS, batch, QUERIES, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(LAYERS, batch, QUERIES, 2, generator=g) * 0.3 + 0.05], -1)
    t_max = int(sizes.max())
    tgt_boxes = torch.cat([torch.rand(batch, t_max, 2, generator=g) * 0.6 + 0.2,
                           torch.rand(batch, t_max, 2, generator=g) * 0.3 + 0.05], -1)
    positive_map = torch.zeros(batch, t_max, TOKENS, dtype=torch.bool)
    starts = torch.randint(0, TOKENS - 4, (batch, t_max), generator=g)
    for k in range(3):
        positive_map.scatter_(2, (starts + k).unsqueeze(-1), True)
    targets = [{"boxes": tgt_boxes[b, : sizes[b]].to(device), "positive_map": positive_map[b, : sizes[b]].to(device)}
               for b in range(batch)]
    dense = dict(tgt_boxes=tgt_boxes.to(device), num_targets=sizes.to(device), positive_map=positive_map.to(device))
    logits, boxes = logits.to(device), boxes.to(device)
    cost = matching_cost(logits, boxes, **dense, **WEIGHTS).reshape(LAYERS * batch, QUERIES, t_max)
    num_cols = sizes.to(device).repeat(LAYERS)
    return dict(logits=logits, boxes=boxes, targets=targets, dense=dense, cost=cost, num_cols=num_cols,
                sizes=sizes.tolist())


def _rounds(device: torch.device, batch: int, provider: str = "") -> int:
    """Keeps the CPU run short: DETR's path takes seconds per call at B = 64 on a 2-core machine."""
    if device.type == "cuda":
        return 20
    if provider == "detr_scipy":
        return {4: 5, 16: 3}.get(batch, 2)
    return 3 if batch == 64 else 5


def _shape(batch: int) -> str:
    return f"P={LAYERS * batch} (B={batch} x {LAYERS} layers) Q={QUERIES} T~U[1,{MAX_T}]"


# ------------------------------------------------------------------------------------------------ end to end
MATCHER_PROVIDERS = ["detr_scipy", "drop_in", "dense"]


@pytest.mark.parametrize("provider", MATCHER_PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
def test_hungarian_matcher(benchmark, batch, provider):
    device = DEVICE
    if provider != "detr_scipy" and not (CUDA_OP if device.type == "cuda" else CPU_OP):
        pytest.skip(f"compiled op unavailable: {_ext.status()[2]}")
    w = workload(batch, str(device))
    if provider == "dense":
        matcher = HungarianMatcher(**WEIGHTS)

        def fn():
            return matcher.match_dense(w["logits"], w["boxes"], **w["dense"]).cpu()
    else:
        matcher = (HungarianMatcherReference if provider == "detr_scipy" else HungarianMatcher)(**WEIGHTS)

        def fn():
            return [matcher({"pred_logits": w["logits"][layer], "pred_boxes": w["boxes"][layer]}, w["targets"])
                    for layer in range(LAYERS)]

    warmup = 0 if device.type == "cpu" and provider == "detr_scipy" and batch == 64 else 1
    run_timed(benchmark, fn, device, rounds=_rounds(device, batch, provider), warmup=warmup)
    launches = count_launches(fn, device) if provider == "dense" else None
    record(benchmark, op="hungarian_matcher", provider=provider, mode="forward", shape=_shape(batch),
           dtype="float32", device=device, launches=launches)


# ------------------------------------------------------------------------------------------------ solver only
def _scipy_blocks(w):
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    blocks = [c[:, :n].numpy() for c, n in zip(w["cost"].double().cpu(), w["num_cols"].tolist())]
    return lambda: [scipy_lsa(b) for b in blocks]


def _lapx(w):
    if importlib.util.find_spec("lap") is None:
        pytest.skip("lapx not installed")
    import lap

    # padded target columns hold cost 0: with more queries than targets that leaves the optimum unchanged
    padded = w["cost"].double().cpu().numpy()
    return lambda: lap.lapjvx_batch(padded, extend_cost=True, return_cost=False, n_threads=torch.get_num_threads())


def _torch_linear_assignment(w, device):
    if importlib.util.find_spec("torch_linear_assignment") is None:
        pytest.skip("torch-linear-assignment not installed")
    from torch_linear_assignment import batch_linear_assignment

    workers_first = w["cost"].transpose(1, 2).contiguous().to(device)  # [P, T, Q]: each target picks a query
    return lambda: batch_linear_assignment(workers_first)


SOLVER_PROVIDERS = ["scipy_blockdiag", "lapx_batch", "torch_linear_assignment", "ours_cpp", "ours_cuda"]


@pytest.mark.parametrize("provider", SOLVER_PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
def test_lsa(benchmark, batch, provider):
    w = workload(batch, str(DEVICE))
    device = torch.device("cuda") if provider in ("ours_cuda", "torch_linear_assignment") else torch.device("cpu")
    if device.type == "cuda" and DEVICE.type != "cuda":
        pytest.skip("needs CUDA")
    if provider == "scipy_blockdiag":
        fn = _scipy_blocks(w)
    elif provider == "lapx_batch":
        fn = _lapx(w)
    elif provider == "torch_linear_assignment":
        fn = _torch_linear_assignment(w, device)
    else:
        if not (CUDA_OP if device.type == "cuda" else CPU_OP):
            pytest.skip(f"compiled op unavailable: {_ext.status()[2]}")
        cost, num_cols = w["cost"].to(device), w["num_cols"].to(device)
        backend = "cuda" if device.type == "cuda" else "cpp"

        def fn():
            return linear_sum_assignment(cost, num_cols, backend=backend, check=False)

    run_timed(benchmark, fn, device, rounds=_rounds(device, batch) * 2, warmup=1)
    record(benchmark, op="lsa", provider=provider, mode="forward", shape=_shape(batch), dtype="float32",
           device=device)
