"""MDETR's soft-token prediction loss (``loss_ce``): fused log-softmax + weighted soft-target cross-entropy,
Triton forward + backward, and the pure-PyTorch reference next to it.

For logits (..., B, Q, C), C - 1 being the no-object slot: a matched query targets its box's binary
positive-map row with weight 1, an unmatched query targets the no-object one-hot with weight ``eos_coef``;
loss = sum_q w_q * (-sum_c T_qc * log_softmax(logits)_qc) / num_boxes, one value per layer.
MDETR's quirk is kept: the binary row is not normalized, so a query matched to a box spanning k tokens
carries target mass k.

The Triton path follows Liger-Kernel's fused cross-entropy: one launch computes the loss of every row of
every layer and, when the logits need a gradient, writes d loss / d logits for grad_output = 1 in the same
pass; the backward only scales that buffer in place by grad_output (one elementwise launch). The buffer is
the gradient itself (logits' dtype), so there is no extra memory beyond it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from detr_kernels._backend import resolve
from detr_kernels.contrastive import (
    NumBoxes,
    check_bool,
    check_float,
    check_num_boxes,
    check_number,
    compute_dtype,
    num_boxes_args,
    over_num_boxes,
)

_MAX_CLASSES = 16384  # one program holds whole rows


def _check(logits, positive_map, matched, num_boxes, eos_coef) -> None:
    check_float("logits", logits, (3, 4))
    if logits.shape[-1] < 2:
        raise ValueError(f"logits must have C >= 2 (C - 1 is the no-object slot), got shape {tuple(logits.shape)}")
    check_bool("positive_map", positive_map, tuple(logits.shape), logits.device)
    check_bool("matched", matched, tuple(logits.shape[:-1]), logits.device)
    check_number("eos_coef", eos_coef)
    check_num_boxes(num_boxes)


# ------------------------------------------------------------------------------------------------ reference
def soft_token_loss_reference(
    logits: torch.Tensor,
    positive_map: torch.Tensor,
    matched: torch.Tensor,
    num_boxes: NumBoxes,
    eos_coef: float = 0.1,
) -> torch.Tensor:
    """MDETR's soft-token loss in plain PyTorch, every layer at once.

    logits: (B, Q, C) or (N_layers, B, Q, C), C - 1 = no-object; positive_map: bool, same shape as logits (the
    target row of each matched query; ignored for unmatched ones); matched: bool (..., B, Q); num_boxes: number or
    one-element tensor. Returns () or (N_layers,), fp32 for half inputs (float64 stays float64).
    """
    _check(logits, positive_map, matched, num_boxes, eos_coef)
    dtype = compute_dtype(logits.dtype)
    with torch.autocast(logits.device.type, enabled=False):  # fp32 even inside an autocast region
        log_prob = torch.log_softmax(logits.to(dtype), -1)
    no_object = torch.arange(logits.shape[-1], device=logits.device) == logits.shape[-1] - 1  # (C,)
    target = torch.where(matched[..., None], positive_map, no_object).to(dtype)
    weight = torch.where(matched, 1.0, eos_coef).to(dtype)
    per_query = -(target * log_prob).sum(-1)  # (..., B, Q)
    return (weight * per_query).sum((-1, -2)) / num_boxes


# ------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _soft_token_fwd_kernel(
    x_ptr, pm_ptr, matched_ptr, nb_ptr, part_ptr, dx_ptr,
    R, Q, C, nb_value, eos_coef,
    sx_n, sx_b, sx_q, sx_c,
    sp_n, sp_b, sp_q, sp_c,
    sm_n, sm_b, sm_q,
    sd_n, sd_b, sd_q, sd_c,
    NB_FROM_PTR: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (block of BLOCK_R query rows, layer n): whole rows of C logits at once."""
    pid = tl.program_id(0)
    n = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # row = b * Q + q within layer n
    cols = tl.arange(0, BLOCK_C)
    r_in = rows < R
    c_in = cols < C
    inside = r_in[:, None] & c_in[None, :]
    b = rows // Q
    q = rows % Q
    x = tl.load(
        x_ptr + n * sx_n + b[:, None] * sx_b + q[:, None] * sx_q + cols[None, :] * sx_c,
        mask=inside, other=float("-inf"),
    ).to(tl.float32)
    is_matched = tl.load(matched_ptr + n * sm_n + b * sm_b + q * sm_q, mask=r_in, other=0) != 0
    pos = tl.load(
        pm_ptr + n * sp_n + b[:, None] * sp_b + q[:, None] * sp_q + cols[None, :] * sp_c,
        mask=inside, other=0,
    ) != 0
    target = tl.where(is_matched[:, None], pos, cols[None, :] == C - 1).to(tl.float32)
    target = tl.where(inside, target, 0.0)
    weight = tl.where(is_matched, 1.0, eos_coef)
    weight = tl.where(r_in, weight, 0.0)
    inv_nb = over_num_boxes(nb_ptr, nb_value, NB_FROM_PTR)

    x_max = tl.max(x, 1)
    x_max = tl.where(r_in, x_max, 0.0)  # rows past the end are all -inf
    shifted = tl.where(inside, x - x_max[:, None], 0.0)
    exp = tl.where(inside, tl.exp(shifted), 0.0)
    sum_exp = tl.where(r_in, tl.sum(exp, 1), 1.0)  # rows past the end: 1, not 0/0
    lse = tl.log(sum_exp)
    mass = tl.sum(target, 1)
    # -sum_c T_c (x_c - lse) with x_c - lse = shifted_c - log(sum exp)
    row_loss = mass * lse - tl.sum(target * shifted, 1)
    tl.store(part_ptr + n * tl.num_programs(0) + pid, tl.sum(weight * row_loss, 0) * inv_nb)
    if WRITE_GRAD:
        # d loss / d x_c = w * (mass * softmax_c - T_c) / num_boxes, for grad_output = 1
        grad = (weight * inv_nb)[:, None] * (mass[:, None] * exp / sum_exp[:, None] - target)
        tl.store(
            dx_ptr + n * sd_n + b[:, None] * sd_b + q[:, None] * sd_q + cols[None, :] * sd_c,
            grad.to(dx_ptr.dtype.element_ty), mask=inside,
        )


def _blocks(C: int):
    """(BLOCK_R, BLOCK_C, num_warps): whole rows, ~4K elements per program."""
    block_c = max(16, triton.next_power_of_2(C))
    block_r = max(1, min(16, 4096 // block_c))
    num_warps = 4 if block_r * block_c <= 4096 else 8
    return block_r, block_c, num_warps


class _SoftToken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, positive_map, matched, num_boxes, eos_coef):
        N, B, Q, C = logits.shape
        R = B * Q
        dev = logits.device
        nb_ptr, nb_value, nb_from_ptr = num_boxes_args(num_boxes, dev)
        block_r, block_c, warps = _blocks(C)
        grid = (triton.cdiv(R, block_r), N)
        write_grad = ctx.needs_input_grad[0]
        part = torch.empty((N, grid[0]), device=dev, dtype=torch.float32)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if write_grad else part
        sd = grad.stride() if write_grad else (0, 0, 0, 0)
        pm = positive_map.view(torch.uint8)
        mt = matched.view(torch.uint8)
        _soft_token_fwd_kernel[grid](
            logits, pm, mt, nb_ptr, part, grad,
            R, Q, C, nb_value, float(eos_coef),
            *logits.stride(), *pm.stride(), *mt.stride(), *sd,
            NB_FROM_PTR=nb_from_ptr, WRITE_GRAD=write_grad,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )
        ctx.grad = grad if write_grad else None
        return part.sum(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "soft_token_loss (triton) keeps one precomputed gradient and supports a single backward pass; "
                "compute the loss again to differentiate it again"
            )
        ctx.grad = None
        # the buffer holds the gradient for grad_output = 1: scale each layer in place
        grad.mul_(grad_out.view(-1, 1, 1, 1))
        return grad, None, None, None, None


# ------------------------------------------------------------------------------------------------ public op
def soft_token_loss(
    logits: torch.Tensor,
    positive_map: torch.Tensor,
    matched: torch.Tensor,
    num_boxes: NumBoxes,
    eos_coef: float = 0.1,
    backend: str = "auto",
) -> torch.Tensor:
    """MDETR's soft-token loss for one or all decoder layers in one call.

    logits: (B, Q, C) or (N_layers, B, Q, C), C - 1 = no-object, any float dtype (computed in fp32);
    positive_map: bool, logits' shape: each matched query's binary target row; matched: bool (..., B, Q);
    num_boxes: number or one-element tensor, already clamped (a device tensor is read on the device);
    eos_coef: weight of unmatched queries; backend: "auto", "triton" or "reference".
    Returns the loss, shape () or (N_layers,), fp32 for half inputs.
    """
    _check(logits, positive_map, matched, num_boxes, eos_coef)
    name = resolve("soft_token", backend, logits.device)
    if name == "reference":
        return soft_token_loss_reference(logits, positive_map, matched, num_boxes, eos_coef)
    if logits.shape[-1] > _MAX_CLASSES:
        raise ValueError(f"logits: the triton backend takes at most C={_MAX_CLASSES}, got C={logits.shape[-1]}")
    layered = logits.dim() == 4
    out = _SoftToken.apply(
        logits if layered else logits.unsqueeze(0),
        positive_map if layered else positive_map.unsqueeze(0),
        matched if layered else matched.unsqueeze(0),
        num_boxes,
        float(eos_coef),
    )
    return out if layered else out.squeeze(0)
