"""Attention with key padding: the Triton flash attention vs SDPA (bool mask; PyTorch's pick and each backend
forced), FlexAttention with a padding block mask, and flash-attn varlen / xformers where they import.

Workload: MDETR's cross encoder, H = 8, D = 32, bf16, B in {4, 16, 32}, L in {600, 1000, 1400} image + text
tokens with about 30% of the keys padded (image padding bottom/right of the feature map, interleaved with
text padding at the end of each caption); the decoder's cross-attention (100 queries over that memory); the
same encoder shapes without padding (the target: 30% padding costs <= 0.8x of no padding); training dropout
0.1 at the headline shape. Modes: forward (no grad), backward (grad of a retained graph), both.
TFLOP/s count useful work only: padded keys are excluded. A bf16 GEMM row gives the card's ceiling.

On CUDA the baseline of each group is ``sdpa_bool``. Peers get packed (varlen) inputs prepared outside the
timed region, with every query row kept (MDETR reads outputs at padded text positions). FlexAttention is
compiled once per shape (tens of seconds each), so it runs at the headline encoder shape only; its block mask
is built outside the timed region.
On CPU a smoke set runs in seconds: reference vs sdpa_bool vs ``fused`` (the public op with backend="auto",
which is SDPA there); Triton is skipped (the interpreter is a correctness tool).
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from benchmarks._common import bench_device, peak_memory_mb, record, run_timed, synchronize
from detr_kernels.attention import attention, attention_reference

DEVICE = bench_device()
CUDA = DEVICE.type == "cuda"
HEADS, HEAD_DIM, TEXT_TOKENS, DECODER_QUERIES = 8, 32, 32, 100
DTYPE = torch.bfloat16 if CUDA else torch.float32
MODES = ("forward", "backward", "both")
ROUNDS, WARMUP = (10, 2) if CUDA else (3, 1)
HEADLINE = (16, 1000)

SDPA_FORCED = {"sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
PEERS = {"flash_varlen": "flash_attn", "xformers": "xformers"}


def _workloads() -> List[Tuple[str, int, int, int, float, float]]:
    """(kind, B, Lq, Lk, padded fraction, dropout_p) of every benchmarked shape."""
    if not CUDA:
        return [("encoder", 2, 64, 64, 0.3, 0.0)]
    encoder = [("encoder", b, n, n, 0.3, 0.0) for b in (4, 16, 32) for n in (600, 1000, 1400)]
    decoder = [("decoder", b, DECODER_QUERIES, 1000, 0.3, 0.0) for b in (4, 16, 32)]
    unpadded = [("encoder", 16, n, n, 0.0, 0.0) for n in (600, 1000, 1400)]
    dropout = [("encoder", *HEADLINE, HEADLINE[1], 0.3, 0.1)]
    return encoder + decoder + unpadded + dropout


def _providers() -> Tuple[str, ...]:
    if not CUDA:
        return ("reference", "sdpa_bool", "fused")
    return ("triton", "sdpa_bool", *SDPA_FORCED, "flex", *PEERS)


def _shape_name(kind: str, batch: int, q_len: int, k_len: int, pad: float, dropout_p: float) -> str:
    name = f"{kind} B{batch} Lq{q_len} Lk{k_len} pad{round(pad * 100)}%"
    return name + (f" drop{dropout_p}" if dropout_p else "")


# ------------------------------------------------------------------------------------------------ workload

@functools.lru_cache(maxsize=None)
def mdetr_key_padding_mask(batch: int, keys: int, pad_fraction: float, seed: int = 0) -> torch.Tensor:
    """(B, Lk) bool, True = padded: an image feature map (3:4 grid) padded bottom/right to the batch's largest
    image, followed by TEXT_TOKENS caption tokens padded at the end. Image sizes are drawn so that about
    ``pad_fraction`` of all keys are padding; sample 0 is the batch's largest image (no image padding)."""
    mask = torch.zeros(batch, keys, dtype=torch.bool)
    if pad_fraction == 0.0:
        return mask
    g = torch.Generator().manual_seed(seed)
    width = int(math.sqrt((keys - TEXT_TOKENS) * 4 / 3))
    height = (keys - TEXT_TOKENS) // width
    image = height * width
    spread = 2 * pad_fraction * batch / max(batch - 1, 1)  # samples 1.. make up for sample 0's full image
    for b in range(batch):
        area = 1.0 if b == 0 else max(0.05, 1.0 - spread * torch.rand((), generator=g).item())
        h = max(1, round(height * math.sqrt(area)))
        w = max(1, round(width * math.sqrt(area)))
        grid = torch.ones(height, width, dtype=torch.bool)
        grid[:h, :w] = False
        mask[b, :image] = grid.flatten()
        caption = int(torch.randint(TEXT_TOKENS // 3, keys - image + 1, (), generator=g))
        mask[b, image + caption:] = True
    return mask


def _inputs(batch: int, q_len: int, k_len: int, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)  # drawn on the device: no host-side randn of 10^7 values
    return [torch.randn(batch, HEADS, n, HEAD_DIM, generator=g, device=DEVICE, dtype=DTYPE).requires_grad_()
            for n in (q_len, k_len, k_len)]


def useful_flops(q_len: int, valid_keys: int, mode: str) -> float:
    """Forward: two GEMMs, 4 * Lq * valid keys * D per head (summed over the batch); backward 2.5x that."""
    fwd = 4.0 * HEADS * HEAD_DIM * q_len * valid_keys
    return {"forward": fwd, "backward": 2.5 * fwd, "both": 3.5 * fwd}[mode]


# ----------------------------------------------------------------------------------------------- providers

_flex_compiled: Dict[str, Callable] = {}


def _unavailable(provider: str) -> Optional[str]:
    if provider in PEERS and importlib.util.find_spec(PEERS[provider]) is None:
        return f"{PEERS[provider]} is not installed"
    if provider == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return "FlexAttention needs torch >= 2.5"
    return None


def _pack(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, H, L, D) -> (rows kept, H, D), a leaf for the varlen peers."""
    rows = x.detach().transpose(1, 2)
    rows = rows.reshape(-1, *rows.shape[2:]) if keep is None else rows[keep]
    return rows.contiguous().requires_grad_()


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def make_call(provider: str, q, k, v, mask: torch.Tensor, dropout_p: float):
    """(fn, leaves): ``fn(*leaves)`` runs one attention of ``provider`` on the workload."""
    attend = ~mask[:, None, None, :]
    if provider == "triton":
        return (lambda a, b, c: attention(a, b, c, mask, dropout_p=dropout_p, backend="triton")), [q, k, v]
    if provider == "fused":
        return (lambda a, b, c: attention(a, b, c, mask, dropout_p=dropout_p)), [q, k, v]
    if provider == "reference":
        return (lambda a, b, c: attention_reference(a, b, c, mask, dropout_p=dropout_p)), [q, k, v]
    if provider == "sdpa_bool":
        return (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=attend, dropout_p=dropout_p)), \
            [q, k, v]
    if provider in SDPA_FORCED:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_FORCED[provider])

        def forced(a, b, c):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(a, b, c, attn_mask=attend, dropout_p=dropout_p)
        return forced, [q, k, v]
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        fn = _flex_compiled.setdefault("flex", torch.compile(flex_attention, dynamic=False))
        block_mask = create_block_mask(lambda b, h, qi, ki: ~mask[b, ki], B, None, Lq, Lk, device=DEVICE)
        return (lambda a, b, c: fn(a, b, c, block_mask=block_mask)), [q, k, v]
    keep = ~mask
    lengths = keep.sum(1)
    leaves = [_pack(q, None), _pack(k, keep), _pack(v, keep)]
    if provider == "flash_varlen":
        from flash_attn import flash_attn_varlen_func

        cu_q = _cu_seqlens(torch.full((B,), Lq, device=DEVICE))
        cu_k = _cu_seqlens(lengths)
        max_k = int(lengths.max())
        return (lambda a, b, c: flash_attn_varlen_func(a, b, c, cu_q, cu_k, Lq, max_k, dropout_p=dropout_p)), leaves
    if provider == "xformers":
        from xformers.ops import fmha

        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_seqlen=[Lq] * B, kv_seqlen=lengths.tolist())
        return (lambda a, b, c: fmha.memory_efficient_attention(a[None], b[None], c[None], attn_bias=bias,
                                                                 p=dropout_p)[0]), leaves
    raise ValueError(provider)


def mode_call(mode: str, fn: Callable, leaves: Sequence[torch.Tensor]) -> Callable[[], object]:
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return fn(*leaves)
        return forward
    out = fn(*leaves)
    dout = torch.randn_like(out)
    if mode == "backward":
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, dout)


# -------------------------------------------------------------------------------------------- benchmarks

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("work", _workloads(), ids=lambda w: _shape_name(*w).replace(" ", "-"))
def test_attention(benchmark, work, provider, mode):
    kind, batch, q_len, k_len, pad, dropout_p = work
    reason = _unavailable(provider)
    if reason:
        pytest.skip(reason)
    if provider == "flex" and (kind, batch, k_len) != ("encoder", *HEADLINE):
        pytest.skip("FlexAttention compiles per shape: the headline encoder shape (B=16, L=1000) only")
    if dropout_p and provider not in ("triton", "sdpa_bool", "flash_varlen"):
        pytest.skip("dropout rows: triton vs sdpa_bool (and flash-attn)")
    if pad == 0.0 and provider not in ("triton", "sdpa_bool"):
        pytest.skip("no-padding rows: triton vs sdpa_bool")
    mask = mdetr_key_padding_mask(batch, k_len, pad).to(DEVICE)
    q, k, v = _inputs(batch, q_len, k_len)
    fn, leaves = make_call(provider, q, k, v, mask, dropout_p)
    try:
        call = mode_call(mode, fn, leaves)
        call()
        synchronize(DEVICE)
    except RuntimeError as err:  # e.g. a forced SDPA backend that cannot take this mask on this card
        pytest.skip(f"{provider} cannot run this workload: {str(err).splitlines()[0][:200]}")
    run_timed(benchmark, call, DEVICE, rounds=ROUNDS, warmup=WARMUP)
    valid = int((~mask).sum())
    record(benchmark, op="attention", provider=provider, mode=mode, shape=_shape_name(*work),
           dtype=str(DTYPE).replace("torch.", ""), device=DEVICE, flops=useful_flops(q_len, valid, mode),
           peak_mem_mb=peak_memory_mb(call, DEVICE), padded_fraction=round(1 - valid / mask.numel(), 3))


@pytest.mark.skipif(not CUDA, reason="the GEMM ceiling is measured on CUDA only")
def test_bf16_gemm_ceiling(benchmark):
    """The card's practical bf16 tensor-core rate in this run: one 8192^3 matmul."""
    n = 8192
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    run_timed(benchmark, lambda: a @ b, DEVICE, rounds=ROUNDS, warmup=WARMUP)
    record(benchmark, op="gemm_ceiling", provider="torch_bf16", mode="forward", shape=f"{n}x{n}x{n}",
           dtype="bfloat16", device=DEVICE, flops=2.0 * n ** 3)
