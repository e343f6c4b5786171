"""Where the time of one MDETR training step goes, per provider of benchmarks/bench_model.py (the same model, batch
and step): wall time per synchronized step (median of N), GPU busy time per step (the sum of the kernels'
durations under torch.profiler), kernel launches per step, and the top GPU kernels and host ops. A step whose
wall time is far above its GPU time is host-bound: faster kernels do not shorten it.

    PYTHONPATH=. python benchmarks/gpu/profile_step.py [--batch 4] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import benchmarks.bench_model as bm
from mdetr.data import ModulatedDetection, make_transforms
from mdetr.data.synthetic import generate_shapes_dataset
from mdetr.pretrained import load_tokenizer


def build_step(provider: str, batch):
    backends = (bm.describe(bm.DEVICE, {"attention": "triton"}) if provider == "fused_triton"
                else bm.choose_backends(provider == "fused", bm.DEVICE))
    torch.manual_seed(0)
    model = bm.build_mdetr(text_encoder=bm.TEXT_ENCODER, attention_backend=backends["attention"], **bm.ARCH)
    model = model.to(bm.DEVICE).train()
    criterion = bm.build_criterion(bm.LossConfig(), bm.ARCH["dec_layers"], None, backends)
    optim_cfg = bm.OptimConfig()
    optimizer = bm.make_optimizer(model, optim_cfg, fused=bm.CUDA)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with bm.autocast(bm.DEVICE, bm.PRECISION):
            outputs = model(batch["images"], batch["mask"], batch["captions"])
        loss = criterion.total(criterion(outputs, batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_max_norm)
        optimizer.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=max(bm.BATCHES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    generate_shapes_dataset(root, num_train=args.batch, num_val=1, num_test=1, seed=0)
    ds = ModulatedDetection(root / "images", root / "annotations" / "shapes_pretrain_train.json",
                            load_tokenizer(bm.TEXT_ENCODER), make_transforms("train", bm.TRANSFORMS))
    batch = bm._batch(ds, args.batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bm.CUDA else [])
    for provider in bm.PROVIDERS:
        step = build_step(provider, batch)
        for _ in range(3):
            step()
        bm.synchronize(bm.DEVICE)
        walls = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            bm.synchronize(bm.DEVICE)
            walls.append(time.perf_counter() - t)
        n_prof = 5
        with profile(activities=activities) as prof:
            for _ in range(n_prof):
                step()
            bm.synchronize(bm.DEVICE)
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / n_prof
        launches = sum(e.count for e in kernels) / n_prof
        print(f"\n## {provider}, B={args.batch}: wall {statistics.median(walls) * 1e3:.1f} ms median "
              f"(min {min(walls) * 1e3:.1f}, {args.steps} steps); GPU busy {gpu_ms:.1f} ms/step; "
              f"{launches:.0f} kernels/step")
        if kernels:
            print("top GPU kernels (ms/step, calls/step):")
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:args.top]:
                print(f"  {e.self_device_time_total / 1e3 / n_prof:7.2f}  {e.count / n_prof:5.0f}  {e.key[:90]}")
        print("top host ops by self CPU time (ms/step, calls/step):")
        host = [e for e in events if e.device_type.name == "CPU"]
        for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {e.self_cpu_time_total / 1e3 / n_prof:7.2f}  {e.count / n_prof:5.0f}  {e.key[:90]}")
        del step
        if bm.CUDA:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
