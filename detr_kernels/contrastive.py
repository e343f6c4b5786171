"""MDETR's contrastive-alignment loss between decoder queries and text tokens: Triton forward + backward, and
the pure-PyTorch reference next to it.

With ``S = queries @ tokens^T / temperature`` (B, Q, L) and ``A`` the boolean positive map (query q is matched
to a box whose span covers token t):

* box-to-token: for every query row with a positive, ``-sum_{t in A} S / (n_pos + 1e-6) + logsumexp_t S``;
* token-to-box: for every token column with a positive, ``-sum_{q in A} S / (n_pos + 1e-6) + logsumexp_q S``;
* loss = (sum of both) / 2 / num_boxes, one value per decoder layer.

MDETR's quirk is kept by default: the logsumexp over tokens runs over all L positions, padding included.
``token_mask`` (B, L), True = padding, gives the clean variant: padded tokens leave the logsumexp over tokens,
they are never positives, and their columns add no token-to-box term.

The Triton path runs every layer in one call: 2 launches forward (the kernel, a sum over samples), 2 backward.
Forward: one program per (sample, layer) walks the queries in blocks, finishes each row's logsumexp inside the
block and keeps an online logsumexp per token column; it saves only per-row and per-column statistics
(N x B x 2(Q + L) floats). Backward: S is recomputed from the saved statistics rather than stored (with D = 64,
two dots cost less than writing and reading back a B x Q x L gradient, and the forward could not have produced
d queries anyway before its last column was seen). One kernel gives d queries, one program per (sample, layer,
query block); the other gives d tokens, one program per (sample, token block) summing over every layer and
query block in registers: deterministic, no atomics, no zero-fill. Extra memory: no B x Q x L buffer at all.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from detr_kernels._backend import resolve

EPS = 1e-6  # MDETR's: n_pos + 1e-6 in the mean over positives
_MAX_TOKENS = 2048  # one program holds a whole query block x all tokens

NumBoxes = Union[float, int, torch.Tensor]


# ------------------------------------------------------------------------------------------------ arguments
def check_number(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a float; ``name`` in the error when it is not a number (or not > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def check_bool(name: str, tensor: torch.Tensor, shape: Tuple[int, ...], device: torch.device) -> None:
    """``tensor`` must be a bool tensor of exactly ``shape`` on ``device``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {tensor.dtype}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")


def check_float(name: str, tensor: torch.Tensor, dims: Tuple[int, ...]) -> None:
    """``tensor`` must be a floating tensor with one of ``dims`` dimensions."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(tensor.shape)}")


def check_num_boxes(num_boxes: NumBoxes) -> None:
    if isinstance(num_boxes, torch.Tensor):
        if num_boxes.numel() != 1:
            raise ValueError(f"num_boxes must be a number or a one-element tensor, got shape {tuple(num_boxes.shape)}")
    else:
        check_number("num_boxes", num_boxes, positive=True)


def num_boxes_args(num_boxes: NumBoxes, device: torch.device) -> Tuple[torch.Tensor, float, bool]:
    """(pointer tensor, python value, read-from-pointer flag) for a kernel: a device tensor is read in the
    kernel (no host sync); a number, or a CPU tensor next to CUDA inputs, becomes a plain float argument."""
    if isinstance(num_boxes, torch.Tensor) and num_boxes.device == device:
        return num_boxes.reshape(1).to(torch.float32), 1.0, True
    value = float(num_boxes)
    return torch.empty(1, device=device, dtype=torch.float32), value, False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half inputs (autocast), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _check(queries, tokens, positive_map, num_boxes, temperature, token_mask) -> None:
    check_float("queries", queries, (3, 4))
    check_float("tokens", tokens, (3,))
    check_number("temperature", temperature, positive=True)
    check_num_boxes(num_boxes)
    B, Q, D = queries.shape[-3:]
    if tokens.shape[0] != B or tokens.shape[2] != D:
        raise ValueError(
            f"tokens must have shape (B={B}, L, D={D}) to match queries {tuple(queries.shape)}, "
            f"got {tuple(tokens.shape)}"
        )
    if tokens.device != queries.device:
        raise ValueError(f"tokens must be on {queries.device} like queries, got {tokens.device}")
    L = tokens.shape[1]
    check_bool("positive_map", positive_map, (*queries.shape[:-1], L), queries.device)
    if token_mask is not None:
        check_bool("token_mask", token_mask, (B, L), queries.device)


# ------------------------------------------------------------------------------------------------ reference
def contrastive_align_loss_reference(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    positive_map: torch.Tensor,
    num_boxes: NumBoxes,
    temperature: float = 0.07,
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MDETR's contrastive-alignment loss in plain PyTorch, every layer at once.

    queries: (B, Q, D) or (N_layers, B, Q, D), L2-normalized; tokens: (B, L, D), L2-normalized, shared by all
    layers; positive_map: bool (..., B, Q, L); num_boxes: number or one-element tensor (already clamped);
    token_mask: optional bool (B, L), True = padding (clean variant). Returns () or (N_layers,), in fp32 for
    half inputs (float64 inputs stay float64).
    """
    _check(queries, tokens, positive_map, num_boxes, temperature, token_mask)
    dtype = compute_dtype(torch.promote_types(queries.dtype, tokens.dtype))
    with torch.autocast(queries.device.type, enabled=False):  # fp32 even inside an autocast region
        return _reference_loss(queries.to(dtype), tokens.to(dtype), positive_map, num_boxes, temperature, token_mask)


def _reference_loss(queries, tokens, positive_map, num_boxes, temperature, token_mask):
    dtype = queries.dtype
    sim = torch.matmul(queries / temperature, tokens.transpose(-1, -2))  # (..., B, Q, L)
    pos = positive_map
    sim_tok = sim
    if token_mask is not None:
        pad = token_mask[:, None, :]  # (B, 1, L) broadcast over layers and queries
        pos = pos & ~pad
        # a finite fill keeps logsumexp and its gradient finite even for an all-padding caption
        sim_tok = sim.masked_fill(pad, torch.finfo(dtype).min)
    pos_sim = torch.where(pos, sim, 0.0)
    n_row = pos.sum(-1, dtype=dtype)
    n_col = pos.sum(-2, dtype=dtype)
    row = -pos_sim.sum(-1) / (n_row + EPS) + torch.logsumexp(sim_tok, -1)  # (..., B, Q)
    col = -pos_sim.sum(-2) / (n_col + EPS) + torch.logsumexp(sim, -2)  # (..., B, L)
    box_to_token = torch.where(n_row > 0, row, 0.0).sum((-1, -2))
    token_to_box = torch.where(n_col > 0, col, 0.0).sum((-1, -2))
    return (box_to_token + token_to_box) / 2 / num_boxes


# ------------------------------------------------------------------------------------------------ kernels
def _dot_precision(device: torch.device) -> str:
    """fp32 accuracy for the dots on S (plain TF32 would cost ~1e-3 relative): three TF32 tensor-core products
    on Hopper; FMA ("ieee") elsewhere, where the split operands of the L = 256 forward (~180 KB of shared memory)
    would not fit (A100: 163 KB)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return "tf32x3"
    return "ieee"


@triton.jit
def _tile(ptr, rows, rows_in, offs_d, d_in, s_row, s_d):
    """A (rows, BLOCK_D) tile of vectors in fp32, zero outside; ``ptr`` already points at the (layer, sample)."""
    return tl.load(
        ptr + rows[:, None] * s_row + offs_d[None, :] * s_d, mask=rows_in[:, None] & d_in[None, :], other=0.0,
    ).to(tl.float32)


@triton.jit
def _real_tokens(mask_ptr, b, offs_l, l_in, sm_b, sm_l, HAS_MASK: tl.constexpr):
    """Token positions that exist and, with a padding mask, are not padding."""
    if HAS_MASK:
        pad = tl.load(mask_ptr + b * sm_b + offs_l * sm_l, mask=l_in, other=1)
        return l_in & (pad == 0)
    return l_in


@triton.jit
def over_num_boxes(nb_ptr, nb_value, NB_FROM_PTR: tl.constexpr):
    """1 / num_boxes, read on the device when it came as a device tensor (no host sync)."""
    if NB_FROM_PTR:
        return 1.0 / tl.load(nb_ptr).to(tl.float32)
    return 1.0 / nb_value


@triton.jit
def _contrastive_fwd_kernel(
    q_ptr, t_ptr, pm_ptr, mask_ptr, nb_ptr,
    part_ptr, row_lse_ptr, row_inv_ptr, col_lse_ptr, col_inv_ptr,
    Q, L, D, nb_value, inv_temp,
    sq_n, sq_b, sq_q, sq_d,
    st_b, st_l, st_d,
    sp_n, sp_b, sp_q, sp_l,
    sm_b, sm_l,
    HAS_MASK: tl.constexpr, NB_FROM_PTR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (sample b, layer n): all of S[n, b] in query blocks, every token at once."""
    b = tl.program_id(0)
    n = tl.program_id(1)
    B = tl.num_programs(0)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_q = tl.arange(0, BLOCK_Q)
    l_in = offs_l < L
    d_in = offs_d < D
    tok_ok = _real_tokens(mask_ptr, b, offs_l, l_in, sm_b, sm_l, HAS_MASK)
    t = _tile(t_ptr + b * st_b, offs_l, l_in, offs_d, d_in, st_l, st_d)

    col_max = tl.full((BLOCK_L,), float("-inf"), tl.float32)
    col_sum = tl.zeros((BLOCK_L,), tl.float32)
    col_pos = tl.zeros((BLOCK_L,), tl.float32)
    col_cnt = tl.zeros((BLOCK_L,), tl.float32)
    row_total = tl.zeros((BLOCK_Q,), tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        rows = q0 + offs_q
        q_in = rows < Q
        qt = _tile(q_ptr + n * sq_n + b * sq_b, rows, q_in, offs_d, d_in, sq_q, sq_d)
        s = tl.dot(qt, tl.trans(t), input_precision=PRECISION) * inv_temp  # (BLOCK_Q, BLOCK_L)
        a = tl.load(
            pm_ptr + n * sp_n + b * sp_b + rows[:, None] * sp_q + offs_l[None, :] * sp_l,
            mask=q_in[:, None] & tok_ok[None, :], other=0,
        ) != 0
        pos_s = tl.where(a, s, 0.0)
        # box-to-token: the whole row is in this block
        s_row = tl.where(tok_ok[None, :], s, float("-inf"))
        r_max = tl.max(s_row, 1)
        r_max = tl.where(r_max == float("-inf"), 0.0, r_max)  # all tokens padded: keep exp finite
        r_sum = tl.sum(tl.exp(s_row - r_max[:, None]), 1)
        r_lse = r_max + tl.log(tl.where(r_sum > 0, r_sum, 1.0))
        n_row = tl.sum(a.to(tl.float32), 1)
        has_row = n_row > 0
        row_term = -tl.sum(pos_s, 1) / (n_row + 1e-6) + r_lse
        row_total += tl.where(has_row, row_term, 0.0)
        # +inf marks a row without positives: its softmax term vanishes in the backward
        stat = (n * B + b) * Q + rows
        tl.store(row_lse_ptr + stat, tl.where(has_row, r_lse, float("inf")), mask=q_in)
        tl.store(row_inv_ptr + stat, 1.0 / (n_row + 1e-6), mask=q_in)
        # token-to-box: online logsumexp down each column
        s_col = tl.where(q_in[:, None], s, float("-inf"))
        new_max = tl.maximum(col_max, tl.max(s_col, 0))
        col_sum = col_sum * tl.exp(col_max - new_max) + tl.sum(tl.exp(s_col - new_max[None, :]), 0)
        col_max = new_max
        col_pos += tl.sum(pos_s, 0)
        col_cnt += tl.sum(a.to(tl.float32), 0)

    c_lse = col_max + tl.log(col_sum)
    has_col = (col_cnt > 0) & tok_ok
    col_term = tl.where(has_col, -col_pos / (col_cnt + 1e-6) + c_lse, 0.0)
    stat = (n * B + b) * L + offs_l
    tl.store(col_lse_ptr + stat, tl.where(has_col, c_lse, float("inf")), mask=l_in)
    tl.store(col_inv_ptr + stat, 1.0 / (col_cnt + 1e-6), mask=l_in)
    scale = 0.5 * over_num_boxes(nb_ptr, nb_value, NB_FROM_PTR)
    tl.store(part_ptr + n * B + b, (tl.sum(row_total, 0) + tl.sum(col_term, 0)) * scale)


@triton.jit
def _score_grad(
    qt, t, pm_ptr, row_lse_ptr, row_inv_ptr, col_lse_ptr, col_inv_ptr,
    rows, q_in, offs_l, l_in, tok_ok, n, b, B, Q, L, coef, inv_temp,
    sp_n, sp_b, sp_q, sp_l,
    PRECISION: tl.constexpr,
):
    """d loss_n / d S for one (query block, token block) tile, times coef (grad_output / 2 / num_boxes /
    temperature, which also serves the chain rule through S = q t^T / temperature)."""
    s = tl.dot(qt, tl.trans(t), input_precision=PRECISION) * inv_temp
    a = (tl.load(
        pm_ptr + n * sp_n + b * sp_b + rows[:, None] * sp_q + offs_l[None, :] * sp_l,
        mask=q_in[:, None] & tok_ok[None, :], other=0,
    ) != 0).to(tl.float32)
    stat = (n * B + b) * Q + rows
    r_lse = tl.load(row_lse_ptr + stat, mask=q_in, other=float("inf"))
    r_inv = tl.load(row_inv_ptr + stat, mask=q_in, other=0.0)
    col = (n * B + b) * L + offs_l
    c_lse = tl.load(col_lse_ptr + col, mask=l_in, other=float("inf"))
    c_inv = tl.load(col_inv_ptr + col, mask=l_in, other=0.0)
    p_row = tl.where(tok_ok[None, :], tl.exp(s - r_lse[:, None]), 0.0)
    p_col = tl.exp(s - c_lse[None, :])
    ds = p_row + p_col - a * (r_inv[:, None] + c_inv[None, :])
    return tl.where(q_in[:, None] & l_in[None, :], ds, 0.0) * coef


@triton.jit
def _contrastive_bwd_queries_kernel(
    q_ptr, t_ptr, pm_ptr, mask_ptr, nb_ptr, go_ptr,
    row_lse_ptr, row_inv_ptr, col_lse_ptr, col_inv_ptr, dq_ptr,
    Q, L, D, nb_value, inv_temp, s_go,
    sq_n, sq_b, sq_q, sq_d,
    st_b, st_l, st_d,
    sp_n, sp_b, sp_q, sp_l,
    sm_b, sm_l,
    sdq_n, sdq_b, sdq_q, sdq_d,
    HAS_MASK: tl.constexpr, NB_FROM_PTR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d queries: one program per (sample, layer, query block), every token at once."""
    b = tl.program_id(0)
    n = tl.program_id(1)
    B = tl.num_programs(0)
    rows = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = rows < Q
    l_in = offs_l < L
    d_in = offs_d < D
    tok_ok = _real_tokens(mask_ptr, b, offs_l, l_in, sm_b, sm_l, HAS_MASK)
    grad_n = tl.load(go_ptr + n * s_go).to(tl.float32)
    coef = 0.5 * over_num_boxes(nb_ptr, nb_value, NB_FROM_PTR) * grad_n * inv_temp
    t = _tile(t_ptr + b * st_b, offs_l, l_in, offs_d, d_in, st_l, st_d)
    qt = _tile(q_ptr + n * sq_n + b * sq_b, rows, q_in, offs_d, d_in, sq_q, sq_d)
    ds = _score_grad(qt, t, pm_ptr, row_lse_ptr, row_inv_ptr, col_lse_ptr, col_inv_ptr,
                     rows, q_in, offs_l, l_in, tok_ok, n, b, B, Q, L, coef, inv_temp,
                     sp_n, sp_b, sp_q, sp_l, PRECISION)
    dq = tl.dot(ds, t, input_precision=PRECISION)
    tl.store(
        dq_ptr + n * sdq_n + b * sdq_b + rows[:, None] * sdq_q + offs_d[None, :] * sdq_d,
        dq.to(dq_ptr.dtype.element_ty), mask=q_in[:, None] & d_in[None, :],
    )


@triton.jit
def _contrastive_bwd_tokens_kernel(
    q_ptr, t_ptr, pm_ptr, mask_ptr, nb_ptr, go_ptr,
    row_lse_ptr, row_inv_ptr, col_lse_ptr, col_inv_ptr, dt_ptr,
    N, Q, L, D, nb_value, inv_temp, s_go,
    sq_n, sq_b, sq_q, sq_d,
    st_b, st_l, st_d,
    sp_n, sp_b, sp_q, sp_l,
    sm_b, sm_l,
    sdt_b, sdt_l, sdt_d,
    HAS_MASK: tl.constexpr, NB_FROM_PTR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d tokens: one program per (sample, token block) sums over every layer and query block in registers:
    deterministic, no atomics."""
    b = tl.program_id(0)
    B = tl.num_programs(0)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_q = tl.arange(0, BLOCK_Q)
    l_in = offs_l < L
    d_in = offs_d < D
    tok_ok = _real_tokens(mask_ptr, b, offs_l, l_in, sm_b, sm_l, HAS_MASK)
    half_over_nb = 0.5 * over_num_boxes(nb_ptr, nb_value, NB_FROM_PTR)
    t = _tile(t_ptr + b * st_b, offs_l, l_in, offs_d, d_in, st_l, st_d)
    dt = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    for n in range(N):
        coef = tl.load(go_ptr + n * s_go).to(tl.float32) * half_over_nb * inv_temp
        for q0 in range(0, Q, BLOCK_Q):
            rows = q0 + offs_q
            q_in = rows < Q
            qt = _tile(q_ptr + n * sq_n + b * sq_b, rows, q_in, offs_d, d_in, sq_q, sq_d)
            ds = _score_grad(qt, t, pm_ptr, row_lse_ptr, row_inv_ptr, col_lse_ptr, col_inv_ptr,
                             rows, q_in, offs_l, l_in, tok_ok, n, b, B, Q, L, coef, inv_temp,
                             sp_n, sp_b, sp_q, sp_l, PRECISION)
            dt += tl.dot(tl.trans(ds), qt, input_precision=PRECISION)
    tl.store(
        dt_ptr + b * sdt_b + offs_l[:, None] * sdt_l + offs_d[None, :] * sdt_d,
        dt.to(dt_ptr.dtype.element_ty), mask=l_in[:, None] & d_in[None, :],
    )


# ------------------------------------------------------------------------------------------------ launcher
def _blocks(Q: int, L: int, D: int) -> Tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_L, BLOCK_D, num_warps): all tokens in one tile, ~8K fp32 elements of S per block."""
    block_l = max(16, triton.next_power_of_2(L))
    block_d = max(16, triton.next_power_of_2(D))
    block_q = max(16, min(triton.next_power_of_2(Q), 8192 // block_l))
    num_warps = 8 if block_q * block_l >= 8192 else 4
    return block_q, block_l, block_d, num_warps


_TOKEN_BLOCK = 64  # token block of the d tokens kernel: B x L/64 programs


class _ContrastiveAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, tokens, positive_map, token_mask, num_boxes, temperature):
        N, B, Q, D = queries.shape
        L = tokens.shape[1]
        dev = queries.device
        nb_ptr, nb_value, nb_from_ptr = num_boxes_args(num_boxes, dev)
        pm = positive_map.view(torch.uint8)
        mask = token_mask.view(torch.uint8) if token_mask is not None else pm
        block_q, block_l, block_d, warps = _blocks(Q, L, D)
        part = torch.empty((N, B), device=dev, dtype=torch.float32)
        row_stats = torch.empty((2, N, B, Q), device=dev, dtype=torch.float32)  # logsumexp, 1 / (n_pos + eps)
        col_stats = torch.empty((2, N, B, L), device=dev, dtype=torch.float32)
        _contrastive_fwd_kernel[(B, N)](
            queries, tokens, pm, mask, nb_ptr,
            part, row_stats[0], row_stats[1], col_stats[0], col_stats[1],
            Q, L, D, nb_value, 1.0 / temperature,
            *queries.stride(), *tokens.stride(), *pm.stride(), *_mask_strides(token_mask),
            HAS_MASK=token_mask is not None, NB_FROM_PTR=nb_from_ptr, PRECISION=_dot_precision(dev),
            BLOCK_Q=block_q, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps,
        )
        ctx.save_for_backward(queries, tokens, pm, mask, nb_ptr, row_stats, col_stats)
        ctx.args = (nb_value, nb_from_ptr, temperature, token_mask is not None)
        return part.sum(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        queries, tokens, pm, mask, nb_ptr, row_stats, col_stats = ctx.saved_tensors
        nb_value, nb_from_ptr, temperature, has_mask = ctx.args
        N, B, Q, D = queries.shape
        L = tokens.shape[1]
        block_q, block_l, block_d, warps = _blocks(Q, L, D)
        block_t = min(_TOKEN_BLOCK, block_l)
        block_qt = max(16, min(triton.next_power_of_2(Q), 8192 // block_t))  # taller query blocks: fewer steps
        need_dq, need_dt = ctx.needs_input_grad[:2]
        dq = torch.empty_like(queries) if need_dq else None
        dt = torch.empty_like(tokens) if need_dt else None
        common = (
            queries, tokens, pm, mask, nb_ptr, grad_out,
            row_stats[0], row_stats[1], col_stats[0], col_stats[1],
        )
        strides = (*queries.stride(), *tokens.stride(), *pm.stride(), *_mask_strides(mask if has_mask else None))
        flags = dict(HAS_MASK=has_mask, NB_FROM_PTR=nb_from_ptr, PRECISION=_dot_precision(queries.device),
                     BLOCK_D=block_d)
        if need_dq:
            _contrastive_bwd_queries_kernel[(B, N, triton.cdiv(Q, block_q))](
                *common, dq, Q, L, D, nb_value, 1.0 / temperature, grad_out.stride(0), *strides, *dq.stride(),
                BLOCK_Q=block_q, BLOCK_L=block_l, num_warps=warps, **flags,
            )
        if need_dt:
            _contrastive_bwd_tokens_kernel[(B, triton.cdiv(L, block_t))](
                *common, dt, N, Q, L, D, nb_value, 1.0 / temperature, grad_out.stride(0), *strides, *dt.stride(),
                BLOCK_Q=block_qt, BLOCK_L=block_t, num_warps=8 if block_qt * block_t >= 8192 else 4, **flags,
            )
        return dq, dt, None, None, None, None


def _mask_strides(mask: Optional[torch.Tensor]) -> Tuple[int, int]:
    return mask.stride() if mask is not None else (0, 0)


# ------------------------------------------------------------------------------------------------ public op
def contrastive_align_loss(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    positive_map: torch.Tensor,
    num_boxes: NumBoxes,
    temperature: float = 0.07,
    token_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """MDETR's contrastive-alignment loss for one or all decoder layers in one call.

    queries: (B, Q, D) or (N_layers, B, Q, D), L2-normalized; tokens: (B, L, D), L2-normalized, shared by all
    layers; positive_map: bool (..., B, Q, L) matching queries' leading dims; num_boxes: number or one-element
    tensor, already clamped (a device tensor is read on the device, no host sync); temperature > 0;
    token_mask: optional bool (B, L), True = padding (clean variant, see the module docstring);
    backend: "auto", "triton" or "reference" (see ``detr_kernels._backend``).
    Returns the loss, shape () or (N_layers,), fp32 for half (autocast) inputs.
    """
    _check(queries, tokens, positive_map, num_boxes, temperature, token_mask)
    name = resolve("contrastive", backend, queries.device)
    if name == "reference":
        return contrastive_align_loss_reference(queries, tokens, positive_map, num_boxes, temperature, token_mask)
    if tokens.shape[1] > _MAX_TOKENS:
        raise ValueError(f"tokens: the triton backend takes at most {_MAX_TOKENS} tokens, got L={tokens.shape[1]}")
    layered = queries.dim() == 4
    out = _ContrastiveAlign.apply(
        queries if layered else queries.unsqueeze(0),
        tokens,
        positive_map if layered else positive_map.unsqueeze(0),
        token_mask,
        num_boxes,
        float(temperature),
    )
    return out if layered else out.squeeze(0)
