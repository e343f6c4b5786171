"""Contrastive-alignment and soft-token losses: eager reference vs torch.compile of it vs the Triton kernels,
forward / backward / both, all 6 decoder layers in one call.

Workload: MDETR's training batch, B in {4, 32, 64}, Q = 100 queries, L in {32, 256} tokens, D = 64, 6 layers;
the soft-token loss has C = 256 classes (255 token slots + no-object) whatever the caption length.
On CUDA: providers eager, compiled (at B = 32, L = 256 only: each shape is a fresh inductor compile), triton.
On CPU (a smoke set that runs in seconds): eager, and "fused", the public op with backend="auto", which is what
``--fused`` runs; on CPU auto resolves to the reference, so the pair shows the dispatch costs nothing. Triton is
skipped there (the interpreter is a correctness tool) and so is torch.compile, unless
DETR_BENCH_COMPILE_CPU=1.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from benchmarks._common import bench_device, count_launches, peak_memory_mb, record, synchronize
from detr_kernels._backend import resolve
from detr_kernels.contrastive import contrastive_align_loss, contrastive_align_loss_reference
from detr_kernels.soft_token import soft_token_loss, soft_token_loss_reference

DEVICE = bench_device()
CUDA = DEVICE.type == "cuda"
LAYERS, QUERIES, DIM, CLASSES, BOXES = 6, 100, 64, 256, 6
MODES = ("forward", "backward", "both")
ROUNDS = 20 if CUDA else 5

BATCHES = (4, 32, 64) if CUDA else (4,)
LENGTHS = (32, 256)
PROVIDERS = ("eager", "compiled", "triton") if CUDA else ("eager", "fused", "compiled")


def _skip_reason(provider: str, batch: int, length: int):
    if not CUDA and (batch, length) != (4, 32):
        return "CPU smoke set: B=4, L=32 only (python benchmarks/bench_losses.py times the MDETR size)"
    if provider == "compiled":
        if not CUDA and os.environ.get("DETR_BENCH_COMPILE_CPU") != "1":
            return "torch.compile on CPU takes over a minute per shape here (78 s); set DETR_BENCH_COMPILE_CPU=1"
        if CUDA and (batch != 32 or length < 256):
            return "compiled only at B = 32, L = 256 (one inductor compile per shape keeps the suite short)"
    return None


# ------------------------------------------------------------------------------------------------ workload
def workload(batch: int, length: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs of both losses for one MDETR-like batch, built without Python loops (on the CPU, then moved).

    Every sample has a caption of random length (the rest is padding) and BOXES boxes, each a contiguous token
    span of the caption; every layer matches the boxes to its own random queries.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    caption = torch.randint(max(2, length // 4), length + 1, (batch, 1), generator=g)  # (B, 1)
    start = (torch.rand(batch, BOXES, generator=g) * (caption - 1)).long()  # (B, K)
    end = torch.minimum(start + 1 + torch.randint(0, 4, (batch, BOXES), generator=g), caption)
    pos = torch.arange(length)
    box_map = (pos >= start[..., None]) & (pos < end[..., None])  # (B, K, L)
    slots = torch.rand(LAYERS, batch, QUERIES, generator=g).argsort(-1)[..., :BOXES]  # (N, B, K)
    positive_map = torch.zeros(LAYERS, batch, QUERIES, length, dtype=torch.bool)
    positive_map.scatter_(2, slots[..., None].expand(-1, -1, -1, length), box_map.expand(LAYERS, -1, -1, -1))
    matched = torch.zeros(LAYERS, batch, QUERIES, dtype=torch.bool).scatter_(2, slots, True)
    class_map = F.pad(positive_map, (0, CLASSES - length)) if length < CLASSES else positive_map[..., :CLASSES]
    data = dict(
        queries=F.normalize(torch.randn(LAYERS, batch, QUERIES, DIM, generator=g), dim=-1),
        tokens=F.normalize(torch.randn(batch, length, DIM, generator=g), dim=-1),
        positive_map=positive_map,
        token_mask=pos >= caption,
        logits=torch.randn(LAYERS, batch, QUERIES, CLASSES, generator=g),
        class_map=class_map,
        matched=matched,
        num_boxes=torch.tensor(float(batch * BOXES)),
    )
    return {k: v.to(DEVICE) for k, v in data.items()}


_compiled: Dict[Tuple[str, int, int], Callable] = {}


def _loss_fn(op: str, provider: str, batch: int, length: int) -> Callable:
    reference = contrastive_align_loss_reference if op == "contrastive" else soft_token_loss_reference
    public = contrastive_align_loss if op == "contrastive" else soft_token_loss
    if provider == "eager":
        return reference
    if provider == "compiled":
        key = (op, batch, length)
        if key not in _compiled:
            _compiled[key] = torch.compile(reference, dynamic=False)
        return _compiled[key]
    backend = "triton" if provider == "triton" else "auto"
    return lambda *args: public(*args, backend=backend)


def _call(op: str, provider: str, batch: int, length: int) -> Tuple[Callable[[], torch.Tensor], tuple]:
    """(forward thunk, differentiable inputs) of one loss call over all layers."""
    data = workload(batch, length)
    fn = _loss_fn(op, provider, batch, length)
    if op == "contrastive":
        inputs = (data["queries"].requires_grad_(), data["tokens"].requires_grad_())
        rest = (data["positive_map"], data["num_boxes"])
        return (lambda: fn(*inputs, *rest)), inputs
    inputs = (data["logits"].requires_grad_(),)
    rest = (data["class_map"], data["matched"], data["num_boxes"])
    return (lambda: fn(*inputs, *rest)), inputs


def _time(benchmark, op: str, provider: str, mode: str, batch: int, length: int) -> None:
    forward, inputs = _call(op, provider, batch, length)
    grad_out = torch.ones(LAYERS, device=DEVICE)

    def both():
        return torch.autograd.grad(forward(), inputs, grad_out)

    def setup_backward():
        return (forward(),), {}

    def backward(loss):
        return torch.autograd.grad(loss, inputs, grad_out)

    for _ in range(3):  # warm-up: compiles, autotuning, allocator
        both()
    synchronize(DEVICE)
    if mode == "backward":
        def timed(loss):
            backward(loss)
            synchronize(DEVICE)

        benchmark.pedantic(timed, setup=setup_backward, rounds=ROUNDS, iterations=1)
    else:
        work = forward if mode == "forward" else both

        def timed():
            work()
            synchronize(DEVICE)

        benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    launches = count_launches(both, DEVICE)
    if launches is not None and mode != "both":
        fwd = count_launches(forward, DEVICE)
        launches = fwd if mode == "forward" else launches - fwd
    peak = peak_memory_mb(forward if mode == "forward" else both, DEVICE)
    shape = f"N={LAYERS} B={batch} Q={QUERIES} L={length if op == 'contrastive' else CLASSES} D={DIM}"
    extra = {"backend": resolve(op, "auto", DEVICE)} if provider == "fused" else {}
    record(benchmark, op=op, provider=provider, mode=mode, shape=shape, dtype="float32", device=DEVICE,
           peak_mem_mb=peak, launches=launches, **extra)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch", BATCHES)
def test_contrastive_loss(benchmark, batch, length, provider, mode):
    reason = _skip_reason(provider, batch, length)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"contrastive B={batch} L={length} {mode}"
    _time(benchmark, "contrastive", provider, mode, batch, length)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
def test_soft_token_loss(benchmark, batch, provider, mode):
    reason = _skip_reason(provider, batch, 32 if batch == 4 else CLASSES)  # C is 256 at every B
    if reason:
        pytest.skip(reason)
    benchmark.group = f"soft_token B={batch} {mode}"
    _time(benchmark, "soft_token", provider, mode, batch, CLASSES)


def compare_fused_with_reference(batch: int = 32, length: int = 256, repeats: int = 20) -> None:
    """The CPU target, timed without pytest: forward + backward of the public op with backend="auto" (what
    ``--fused`` runs) against the reference, interleaved in alternating order (ABBA) so that a shared, noisy
    machine slows both alike; prints median and min of each."""
    import statistics
    import time

    for op in ("contrastive", "soft_token"):
        calls = {p: _call(op, p, batch, length) for p in ("eager", "fused")}
        grad_out = torch.ones(LAYERS, device=DEVICE)
        times: Dict[str, list] = {p: [] for p in calls}
        for i in range(repeats + 2):
            for provider in (("eager", "fused") if i % 2 == 0 else ("fused", "eager")):
                forward, inputs = calls[provider]
                start = time.perf_counter()
                torch.autograd.grad(forward(), inputs, grad_out)
                synchronize(DEVICE)
                if i >= 2:  # the first two rounds warm up
                    times[provider].append(time.perf_counter() - start)
        (ref_med, ref_min), (fused_med, fused_min) = (
            (statistics.median(times[p]) * 1e3, min(times[p]) * 1e3) for p in ("eager", "fused")
        )
        print(f"{op:<12} N={LAYERS} B={batch} Q={QUERIES} L={length} fwd+bwd on {DEVICE} "
              f"({torch.get_num_threads()} threads; auto -> {resolve(op, 'auto', DEVICE)}): "
              f"reference median {ref_med:.1f} ms (min {ref_min:.1f}), fused median {fused_med:.1f} ms "
              f"(min {fused_min:.1f}), ratio of medians {fused_med / ref_med:.3f}")


if __name__ == "__main__":
    compare_fused_with_reference()
