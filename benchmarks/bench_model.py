"""One MDETR training step, the reference path vs ``--fused``, side by side: forward, losses (matcher included),
backward, gradient clipping and the AdamW step, as ``python -m mdetr.train`` runs them.

Model (CUDA): the paper's transformer (d_model 256, 8 heads of 32, 6 + 6 layers, FFN 2048, dropout 0.1, 100
learned queries, contrastive alignment, auxiliary losses) on the default lite0 backbone (stride 32) and MiniLM text
encoder, everything trained. Data: shapes-world images at MDETR's train sizes (random resize to a short side of
480..800, max 1333, so every batch is padded) with their pre-training captions, through the real dataset,
transforms and collate; one fixed batch per size. bf16 autocast (the matcher and losses in fp32), B in {4, 8}.
CPU: a smoke set (B = 2, the shapes transforms, 2 + 2 layers of 128) that runs in seconds.

Providers: ``reference`` (nn.MultiheadAttention, scipy matcher, eager losses: the model without ``--fused``),
``fused`` (every op's backend as ``--fused`` picks it on this device; extra_info records them) and, on CUDA,
``fused_triton`` (the same with the Triton attention kernels, which ``auto`` does not pick: see
``detr_kernels._backend``).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks._common import bench_device, peak_memory_mb, record, run_timed, synchronize
from mdetr.config import LossConfig, OptimConfig
from mdetr.data import ModulatedDetection, collate_fn, make_transforms
from mdetr.data.synthetic import generate_shapes_dataset
from mdetr.engine import autocast, make_optimizer, to_device
from mdetr.losses.criterion import build_criterion
from mdetr.models import build_mdetr
from mdetr.pretrained import load_tokenizer
from detr_kernels import describe
from mdetr.train import choose_backends

DEVICE = bench_device()
CUDA = DEVICE.type == "cuda"
TEXT_ENCODER = "all-MiniLM-L6-v2"
if CUDA:
    ARCH = dict(d_model=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048, dropout=0.1, num_queries=100)
    BATCHES, TRANSFORMS, PRECISION, ROUNDS, WARMUP = (4, 8), "mdetr", "bf16", 10, 3
else:
    ARCH = dict(d_model=128, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=256, dropout=0.1, num_queries=20)
    BATCHES, TRANSFORMS, PRECISION, ROUNDS, WARMUP = (2,), "shapes", "fp32", 3, 1
PROVIDERS = ("reference", "fused", "fused_triton") if CUDA else ("reference", "fused")


def train_dataset(root, size: int = max(BATCHES)) -> ModulatedDetection:
    """``size`` shapes-world images with their pre-training captions under ``root``, through the train recipe."""
    generate_shapes_dataset(root, num_train=size, num_val=1, num_test=1, seed=0)
    return ModulatedDetection(root / "images", root / "annotations" / "shapes_pretrain_train.json",
                              load_tokenizer(TEXT_ENCODER), make_transforms("train", TRANSFORMS))


@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory):
    return train_dataset(tmp_path_factory.mktemp("shapes"))


def _batch(dataset, batch_size: int):
    torch.manual_seed(batch_size)  # the random resize of the train recipe
    return to_device(collate_fn([dataset[i] for i in range(batch_size)]), DEVICE)


def make_train_step(provider: str, batch, mark=None):
    """One training step of ``provider`` on ``batch`` as a closure (fresh model, seed 0), and its backends.

    ``mark(phase)``, when given, is called after each phase of the step ("forward", "loss", "backward",
    "optimizer"): the profile script synchronizes there to split the step's wall time."""
    mark = mark or (lambda phase: None)
    if provider == "fused_triton":
        backends = describe(DEVICE, {"attention": "triton"})
    else:
        backends = choose_backends(provider == "fused", DEVICE)
    torch.manual_seed(0)  # the same initial weights for every provider
    model = build_mdetr(text_encoder=TEXT_ENCODER, attention_backend=backends["attention"], **ARCH).to(DEVICE)
    model.train()
    criterion = build_criterion(LossConfig(), ARCH["dec_layers"], None, backends)
    optim_cfg = OptimConfig()
    optimizer = make_optimizer(model, optim_cfg, fused=CUDA)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(DEVICE, PRECISION):
            outputs = model(batch["images"], batch["mask"], batch["captions"])
        mark("forward")
        loss = criterion.total(criterion(outputs, batch))
        mark("loss")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_max_norm)
        optimizer.step()
        mark("optimizer")
        return loss

    return step, backends


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch_size", BATCHES)
def test_train_step(benchmark, shapes_train, batch_size, provider):
    batch = _batch(shapes_train, batch_size)
    step, backends = make_train_step(provider, batch)
    run_timed(benchmark, step, DEVICE, rounds=ROUNDS, warmup=WARMUP)
    synchronize(DEVICE)
    tokens = int((~batch["mask"][:, ::32, ::32]).sum(dim=(1, 2)).max())
    shape = (f"B{batch_size} {tuple(batch['images'].shape[-2:])} px d{ARCH['d_model']} "
             f"{ARCH['enc_layers']}+{ARCH['dec_layers']} layers")
    record(benchmark, op="train_step", provider=provider, mode="both", shape=shape, dtype=PRECISION, device=DEVICE,
           peak_mem_mb=peak_memory_mb(step, DEVICE), backends=",".join(f"{k}={v}" for k, v in backends.items()),
           image_tokens_max=tokens)
