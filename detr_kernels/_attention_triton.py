"""Triton kernels of ``detr_kernels.attention``: flash attention (forward, backward) with key padding.

Key padding is handled by *compaction*, not by masking: the launcher gets, per batch element, the indices of
its keys with the valid ones first (``kv_idx``, shape (B, Lk), int32) and their count (``kv_len``, (B,)). The
kernels read K and V rows through ``kv_idx`` and stop at ``kv_len``, so key tiles that would be all padding
are never loaded or computed, wherever the padding sits in the sequence (MDETR interleaves image padding,
bottom/right of the feature map, with text padding at the end of the caption). This is exact because
attention is invariant to the order of the keys (positions are added to the keys before attention).

Numerics: scores are kept in base 2 (``scale * log2(e)`` folded in), accumulation is fp32, P is cast to the
input dtype before the P @ V product (as flash attention does). The forward saves the row log-sum-exp in
base 2; the backward recomputes P from it.

Dropout uses Philox in the kernel, keyed by (seed, batch * heads + head). One Philox call yields four numbers,
used for four neighbouring keys in the compacted order: counter ``query_row * ceil(Lk / 4) + position // 4``.
The mask therefore does not depend on tile sizes, and the backward regenerates exactly the forward's mask.

A batch element with no valid key has ``kv_len == 0``: its output rows are zeros, its gradients are zeros.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from detr_kernels._backend import triton_interpreted

LOG2E = 1.4426950408889634


@triton.jit
def _dropout_uniform(seed_ptr, bh, offs_m, start_n, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Uniform [0, 1) numbers of the (BLOCK_M, BLOCK_N) tile of query rows ``offs_m`` and compacted key
    positions ``start_n + arange(BLOCK_N)`` (``start_n`` a multiple of 4): one Philox call per 4 keys."""
    seed = tl.load(seed_ptr).to(tl.int64) + (bh.to(tl.int64) << 32)
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    counter = offs_m[:, None] * ((Lk + 3) // 4) + groups[None, :]  # (BLOCK_M, BLOCK_N // 4)
    r0, r1, r2, r3 = tl.rand4x(seed, counter)
    return tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))  # column 4g + i <- r_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, KvIdx, KvLen, Seed,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, Lq, Lk, qk_scale, dropout_p,
    HAS_PADDING: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < Lq, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if HAS_PADDING:
        kv_len = tl.load(KvLen + b)
    else:
        kv_len = Lk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid_n = offs_n < kv_len
        if HAS_PADDING:
            kidx = tl.load(KvIdx + b * Lk + offs_n, mask=valid_n, other=0)
        else:
            kidx = offs_n
        k = tl.load(k_base + kidx[:, None] * stride_kn + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_uniform(Seed, bh, offs_m, start_n, Lk, BLOCK_M, BLOCK_N) >= dropout_p
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_base + kidx[:, None] * stride_vn + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    inv_l = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), 0.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)
    tl.store(Lse + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_delta_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    H, Lq,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax backward's correction term, (B, H, Lq) fp32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < Lq
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :],
                 mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Delta + bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, KvIdx, KvLen, Seed,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, Lq, Lk, qk_scale, sm_scale, dropout_p,
    HAS_PADDING: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One program owns BLOCK_N (compacted) keys of one (b, h) and sweeps all queries: dK, dV of those keys.
    Blocks past ``kv_len`` hold only padded keys: they skip the sweep and write zeros."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if HAS_PADDING:
        kv_len = tl.load(KvLen + b)
        kidx = tl.load(KvIdx + b * Lk + offs_n, mask=offs_n < Lk, other=0)
    else:
        kv_len = Lk
        kidx = offs_n
    valid_n = offs_n < kv_len
    k = tl.load(K + b * stride_kb + h * stride_kh + kidx[:, None] * stride_kn + offs_d[None, :],
                mask=valid_n[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + kidx[:, None] * stride_vn + offs_d[None, :],
                mask=valid_n[:, None], other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOut + b * stride_db + h * stride_dh

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_end = tl.where(pid_n * BLOCK_N < kv_len, Lq, 0)
    for start_m in range(0, q_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(Lse + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh * Lq + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :])
        p_t = tl.where(valid_n[:, None], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep_t = tl.trans(_dropout_uniform(Seed, bh, offs_m, pid_n * BLOCK_N, Lk, BLOCK_M, BLOCK_N)) >= dropout_p
            p_drop_t = tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0)
            dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
        else:
            p_drop_t = p_t
        dv += tl.dot(p_drop_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    store_ok = offs_n[:, None] < Lk
    tl.store(DK + b * stride_dkb + h * stride_dkh + kidx[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + b * stride_dvb + h * stride_dvh + kidx[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, KvIdx, KvLen, Seed,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_dqb, stride_dqh, stride_dqm,
    H, Lq, Lk, qk_scale, sm_scale, dropout_p,
    HAS_PADDING: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One program owns BLOCK_M queries of one (b, h) and sweeps the valid keys: dQ of those queries."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh * Lq + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if HAS_PADDING:
        kv_len = tl.load(KvLen + b)
    else:
        kv_len = Lk

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid_n = offs_n < kv_len
        if HAS_PADDING:
            kidx = tl.load(KvIdx + b * Lk + offs_n, mask=valid_n, other=0)
        else:
            kidx = offs_n
        k = tl.load(k_base + kidx[:, None] * stride_kn + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        v = tl.load(v_base + kidx[:, None] * stride_vn + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(valid_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_uniform(Seed, bh, offs_m, start_n, Lk, BLOCK_M, BLOCK_N) >= dropout_p
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------- launchers

def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only where PyTorch's own matmuls are allowed to (default: exact fp32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)

# (kernel, class) -> tiles. ``fwd`` and ``dq`` hold BLOCK_M queries and stream keys; ``dkdv`` holds BLOCK_N keys
# and streams queries. Classes: "narrow" (fp16/bf16, head dim 16 or 32: MDETR's 256 / 8 heads), "d64" (fp16/bf16,
# head dim 64) and "wide" (fp32 inputs or head dim 128: twice the register and shared-memory footprint, hence
# smaller streamed tiles and fewer pipeline stages). The narrow tiles are the fastest of a sweep on an H200
# (benchmarks/gpu/tune_attention.py: bf16, D=32, B=16, L=1000, 30% padding; GPU time, profiler: forward 0.075 ->
# 0.064 ms, backward 0.193 -> 0.167 ms, against the tiles before, which "d64" keeps: the swept forward tile would
# need ~100 KB of shared memory at head dim 64, more than some GPUs give a block). "d64" and "wide" are not tuned.
_GPU_TILES = {
    ("fwd", "narrow"): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    ("fwd", "d64"): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    ("fwd", "wide"): dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
    ("dq", "narrow"): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ("dq", "d64"): dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    ("dq", "wide"): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ("dkdv", "narrow"): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    ("dkdv", "d64"): dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3),
    ("dkdv", "wide"): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
}


def tile_class(head_dim: int, dtype: torch.dtype) -> str:
    """Which row of ``_GPU_TILES`` serves inputs of this head dim and dtype."""
    if head_dim >= 128 or dtype == torch.float32:
        return "wide"
    return "d64" if head_dim == 64 else "narrow"


def _tiles(kernel: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes of one kernel; fixed, not autotuned, so compile time stays predictable in the GPU runbook."""
    if triton_interpreted():
        return dict(_INTERPRETER_TILES)
    return dict(_GPU_TILES[kernel, tile_class(head_dim, dtype)])


def _strides3(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, kv_idx: Optional[torch.Tensor],
    kv_len: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float, softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fills ``out`` (B, H, Lq, D); returns (out, lse (B, H, Lq) fp32, base 2). Every tensor's last stride is 1."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    cfg = _tiles("fwd", D, q.dtype)
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    has_padding = kv_idx is not None
    has_dropout = dropout_p > 0.0
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, kv_idx if has_padding else q, kv_len if has_padding else q,
        seed if has_dropout else q,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        H, Lq, Lk, softmax_scale * LOG2E, dropout_p,
        HAS_PADDING=has_padding, HAS_DROPOUT=has_dropout, DOT_PRECISION=_dot_precision(q.dtype),
        HEAD_DIM=D, **cfg,
    )
    return out, lse


def flash_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, kv_idx: Optional[torch.Tensor],
    kv_len: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float, softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fills and returns (dq, dk, dv); padded keys get zero gradients."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    delta_rows = 16 if triton_interpreted() else 64
    _attn_bwd_delta_kernel[(triton.cdiv(Lq, delta_rows), B * H)](
        out, dout, delta, *_strides3(out), *_strides3(dout), H, Lq,
        BLOCK_M=delta_rows, HEAD_DIM=D, num_warps=4,
    )
    has_padding = kv_idx is not None
    has_dropout = dropout_p > 0.0
    common = dict(HAS_PADDING=has_padding, HAS_DROPOUT=has_dropout, DOT_PRECISION=_dot_precision(q.dtype),
                  HEAD_DIM=D)
    aux = (kv_idx if has_padding else q, kv_len if has_padding else q, seed if has_dropout else q)
    scales = (softmax_scale * LOG2E, softmax_scale, dropout_p)
    cfg = _tiles("dkdv", D, q.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, cfg["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, *aux,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dk), *_strides3(dv),
        H, Lq, Lk, *scales, **common, **cfg,
    )
    cfg = _tiles("dq", D, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, *aux,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dq),
        H, Lq, Lk, *scales, **common, **cfg,
    )
    return dq, dk, dv
