"""Tile sweep and time breakdown of the Triton attention on this GPU (bf16, head dim 32, MDETR's encoder shape).

1. Where the time goes: wall time per call of the public op (synchronized, as the benchmarks time it) against the
   GPU time of its kernels (profiler), forward (no grad) and forward + backward.
2. Each kernel (fwd, dkdv, dq) over candidate tiles, timed with CUDA-graph replay (GPU time only; dq and dkdv
   candidates time the whole backward), at B=16, L=1000 with 30% of keys padded; each candidate's output is
   checked against that of the tiles in the source.
3. A cProfile of the host side of forward + backward calls.
4. Optionally (``--bench``) the attention benchmarks and the model step, in this process, with the best tiles
   patched in, so their JSON shows what those tiles give end to end.

Usage: python benchmarks/gpu/tune_attention.py --out DIR [--bench] [--no-sweep] [--model-k EXPR]
Prints the best tiles as the ``_GPU_TILES`` entries to paste into detr_kernels/_attention_triton.py.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench_cudagraph

from benchmarks.bench_attention import mdetr_key_padding_mask
from detr_kernels import _attention_triton as kernels
from detr_kernels.attention import attention, key_order

B, H, L, D = 16, 8, 1000, 32
CANDIDATES = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages); the first: the tiles before the 2026-11-27 H200 sweep
    "fwd": [(128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3),
            (128, 128, 4, 2), (64, 32, 4, 4), (128, 64, 4, 4), (64, 64, 4, 2)],
    "dq": [(128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2),
           (64, 32, 2, 3)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 4, 3), (32, 128, 8, 3),
             (64, 128, 4, 2), (16, 64, 4, 3)],
}


def tiles(c):
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])


def inputs(pad: float, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    mask = mdetr_key_padding_mask(B, L, pad).cuda()
    return q, k, v, do, mask


def wall_ms(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def gpu_ms(fn, reps=5):
    """Sum of CUDA kernel time per call, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels_ = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name = {}
    for e in kernels_:
        per_name[e.name[:60]] = per_name.get(e.name[:60], 0.0) + e.time_range.elapsed_us() / reps / 1e3
    return sum(per_name.values()), per_name


def breakdown(report):
    for pad in (0.3, 0.0):
        q, k, v, do, mask = inputs(pad)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def fwd():
            with torch.no_grad():
                return attention(*leaves, mask, backend="triton")

        def both():
            return torch.autograd.grad(attention(*leaves, mask, backend="triton"), leaves, do)

        for name, fn in (("forward", fwd), ("both", both)):
            wall = wall_ms(fn)
            gpu, per = gpu_ms(fn)
            report.append(dict(what="breakdown", pad=pad, mode=name, wall_ms=wall, gpu_ms=gpu, kernels=per))
            print(f"pad {pad:.0%} {name:8s}: wall {wall:.3f} ms, GPU kernels {gpu:.3f} ms: "
                  + ", ".join(f"{n.split('(')[0][:40]} {t:.3f}" for n, t in sorted(per.items(), key=lambda x: -x[1])))


def sweep(report):
    q, k, v, do, mask = inputs(0.3, seed=1)
    kv_idx, kv_len = key_order(mask)
    scale = D ** -0.5
    out = torch.empty_like(q)
    _, lse = kernels.flash_attention_forward(q, k, v, out, kv_idx, kv_len, None, 0.0, scale)
    ref_out = out.clone()
    grads = [torch.empty_like(t) for t in (q, k, v)]
    kernels.flash_attention_backward(do, q, k, v, out, lse, *grads, kv_idx, kv_len, None, 0.0, scale)
    ref_grads = [g.clone() for g in grads]
    best = {}
    for kernel, cands in CANDIDATES.items():
        rows = []
        for c in cands:
            saved = dict(kernels._GPU_TILES)
            kernels._GPU_TILES[(kernel, "narrow")] = tiles(c)
            try:
                if kernel == "fwd":
                    o = torch.full_like(q, float("nan"))
                    fn = lambda: kernels.flash_attention_forward(q, k, v, o, kv_idx, kv_len, None, 0.0, scale)
                    fn()
                    err = (o.float() - ref_out.float()).abs().max().item()
                else:
                    gs = [torch.full_like(t, float("nan")) for t in (q, k, v)]
                    fn = lambda: kernels.flash_attention_backward(do, q, k, v, out, lse, *gs, kv_idx, kv_len, None,
                                                                  0.0, scale)
                    fn()
                    err = max((gs[i].float() - ref_grads[i].float()).abs().max().item()
                              for i in ((0,) if kernel == "dq" else (1, 2)))
                ms = do_bench_cudagraph(fn, rep=100, return_mode="median")  # dq / dkdv: the whole backward's time
                ok = err < 0.05
            except Exception as exc:  # a tile that does not compile or fit (shared memory) on this card
                ms, err, ok = float("inf"), float("nan"), False
                print(f"  {kernel} {c}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            finally:
                kernels._GPU_TILES.clear()
                kernels._GPU_TILES.update(saved)
            rows.append((ms, c, err, ok))
            report.append(dict(what="sweep", kernel=kernel, tiles=c, ms=ms if ok else None,
                               max_err=err if err == err else None, ok=ok))  # JSON has no inf / nan
            print(f"  {kernel:5s} {str(c):18s} {ms:.4f} ms  max|diff| {err:.3g}{'' if ok else '  REJECTED'}")
        good = [r for r in rows if r[3]]
        if not good:
            best[kernel] = tuple(kernels._GPU_TILES[kernel, "narrow"][key] for key in
                                 ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
            print(f"best {kernel}: no candidate passed; keeping the tiles in the source {best[kernel]}")
            continue
        best[kernel] = min(good)[1]
        print(f"best {kernel}: {best[kernel]} ({min(good)[0]:.4f} ms; first candidate {rows[0][0]:.4f} ms)")
    return best


def host_profile(report, calls=50):
    """cProfile of forward + backward calls of the public op: where the host time goes."""
    import cProfile
    import io
    import pstats

    q, k, v, do, mask = inputs(0.3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    step = lambda: torch.autograd.grad(attention(*leaves, mask, backend="triton"), leaves, do)  # noqa: E731
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    report.append(dict(what="host_profile", calls=calls, text=text.getvalue()))
    print(f"host profile of {calls} forward + backward calls (tottime):")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:3500])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/gpu/out")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--model-k", default="train_step", help="pytest -k of the model benchmarks to run")
    ap.add_argument("--no-sweep", action="store_true", help="only the time breakdown (and --bench) at the tiles "
                    "in the source")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    breakdown(report)
    if args.no_sweep:
        best = {kernel: tuple(kernels._GPU_TILES[kernel, "narrow"][key] for key in
                              ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")) for kernel in CANDIDATES}
    else:
        best = sweep(report)
        for kernel, c in best.items():
            kernels._GPU_TILES[(kernel, "narrow")] = tiles(c)
        print("best tiles:", {k: tiles(c) for k, c in best.items()})
        breakdown(report)
    host_profile(report)
    (out / "tune_attention.json").write_text(json.dumps(dict(best=best, report=report), indent=1))
    print("tiles:", {k: tiles(c) for k, c in best.items()})
    if args.bench:
        import pytest

        for name, target in (("attention_b16_tuned", ["benchmarks/bench_attention.py", "-k", "B16"]),
                             ("model_tuned", ["benchmarks/bench_model.py", "-k", args.model_k]),
                             ("attention_rest_tuned", ["benchmarks/bench_attention.py", "-k", "not B16"])):
            pytest.main([*target, "--benchmark-only", "-q", "-p", "no:cacheprovider",
                         "--benchmark-json", str(out / f"bench_{name}.json")])


if __name__ == "__main__":
    main()
