"""Multi-head attention with a key-padding mask: a fused Triton flash attention (forward + backward), SDPA and
a pure-PyTorch reference behind one function, and a drop-in replacement for ``nn.MultiheadAttention``.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D), ``key_padding_mask`` (B, Lk) bool with True = ignore that key
(``nn.MultiheadAttention``'s convention). Lq may differ from Lk (DETR's decoder: 100 queries over the encoder
memory). Padded *query* rows are computed like every other row: they attend over the valid keys.

Backends (chosen only by ``detr_kernels._backend.resolve``):

- ``triton``: the kernels of ``_attention_triton`` (fp32 / fp16 / bf16, head dim 16, 32, 64 or 128, fp32
  accumulation). Key padding is skipped, not masked: keys are visited in a per-sample order with the valid ones
  first, so tiles of padding are never computed. Dropout is drawn in the kernel (Philox keyed by a seed drawn
  from PyTorch's generator on each call) and regenerated in the backward.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask (what ``backend="auto"``
  and ``--fused`` run, on CPU and on CUDA: ``detr_kernels._backend`` says why), PyTorch's dropout. On the CPU,
  bf16 / fp16 inputs (autocast) are computed in fp32 and the output cast back: PyTorch's CPU flash-attention
  kernels are slower in bf16 than in fp32 (the default model's step, 2-core AMD EPYC, torch 2.14: its 9
  attention backward calls took 97 ms per step in bf16 against 41 ms in fp32), while the matmuls around them gain 2x.
- ``reference``: ``attention_reference``, plain PyTorch math, float64-capable, PyTorch's dropout.

A batch element whose keys are ALL padded: ``triton`` and ``sdpa`` return zeros for it (and zero gradients);
``reference`` returns NaN, as ``nn.MultiheadAttention`` does (a softmax over nothing but -inf).

``attn_bias``: an additive float bias on the scores, broadcastable to (B, H, Lq, Lk), with gradients (``sdpa`` and
``reference``; the Triton kernels take key padding only, and say so). A row whose keys the bias blocks entirely
(all -inf): ``sdpa`` returns zeros for it, ``reference`` NaN.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_kernels._backend import resolve

__all__ = ["attention", "attention_reference", "FusedMultiheadAttention", "key_order", "TRITON_HEAD_DIMS"]

TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ reference

def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, dropout_keep: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None,
) -> Tensor:
    """softmax(q k^T * scale [+ attn_bias], masked) [dropout] @ v in the inputs' dtype (use float64 for an oracle).

    ``dropout_keep`` (B, H, Lq, Lk) bool replaces PyTorch's random dropout by a given keep-mask (kept entries
    scaled by 1 / (1 - dropout_p)); tests use it to replay the Triton kernel's mask. All-padded rows give NaN.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if attn_bias is not None:
        scores = scores + attn_bias
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


# ------------------------------------------------------------------------------------------ the Triton op

def key_order(key_padding_mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-sample key order with the valid keys first, (B, Lk) int32, and the number of valid keys, (B,) int32.

    Stable, so valid keys keep their relative order; computed on the mask's device without a host sync.
    """
    kv_len = (~key_padding_mask).sum(dim=1, dtype=torch.int32)
    kv_idx = torch.argsort(key_padding_mask.to(torch.int8), dim=1, stable=True).to(torch.int32)
    return kv_idx, kv_len


def _empty_in_layout_of(t: Tensor) -> Tensor:
    """An empty (B, H, L, D) tensor whose outer dims follow ``t``'s memory order, D innermost: the output of
    heads split from an (L, B, E) projection is again a view of an (L, B, E) buffer, so merging heads is free."""
    order = sorted(range(t.dim() - 1), key=lambda i: -t.stride(i)) + [t.dim() - 1]
    return torch.empty_permuted(t.shape, order, dtype=t.dtype, device=t.device)


def _unit_last_stride(t: Tensor) -> Tensor:
    """The kernels address rows through strides but need each row (the head dim) contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("detr_kernels::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, kv_idx: Optional[Tensor], kv_len: Optional[Tensor], seed: Optional[Tensor],
    dropout_p: float, softmax_scale: float,
) -> Tuple[Tensor, Tensor]:
    from detr_kernels._attention_triton import flash_attention_forward

    out = _empty_in_layout_of(q)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return flash_attention_forward(q, k, v, out, kv_idx, kv_len, seed, dropout_p, softmax_scale)


@_flash_attention_fwd.register_fake
def _(q, k, v, kv_idx, kv_len, seed, dropout_p, softmax_scale):
    B, H, Lq, _ = q.shape
    return _empty_in_layout_of(q), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("detr_kernels::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_idx: Optional[Tensor],
    kv_len: Optional[Tensor], seed: Optional[Tensor], dropout_p: float, softmax_scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    from detr_kernels._attention_triton import flash_attention_backward

    grads = tuple(_empty_in_layout_of(t) for t in (q, k, v))
    dout, q, k, v = (_unit_last_stride(t) for t in (dout, q, k, v))
    return flash_attention_backward(dout, q, k, v, out, lse, *grads, kv_idx, kv_len, seed, dropout_p, softmax_scale)


@_flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, kv_idx, kv_len, seed, dropout_p, softmax_scale):
    return tuple(_empty_in_layout_of(t) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_idx, kv_len, seed, dropout_p, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_idx, kv_len, seed)
    ctx.dropout_p = dropout_p
    ctx.softmax_scale = softmax_scale


def _backward(ctx, dout: Tensor, _dlse: Tensor):
    q, k, v, out, lse, kv_idx, kv_len, seed = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd(dout, q, k, v, out, lse, kv_idx, kv_len, seed, ctx.dropout_p,
                                      ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None


_flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_triton_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"attention(backend='triton'): q, k, v must be one of {TRITON_DTYPES}, got {q.dtype}")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"attention(backend='triton'): head dim must be one of {TRITON_HEAD_DIMS}, "
                         f"got {q.shape[-1]} (use backend='sdpa')")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"attention(backend='triton'): v's head dim must equal q's, got {v.shape[-1]} and "
                         f"{q.shape[-1]}")


def _triton_attention(q, k, v, key_padding_mask, dropout_p, softmax_scale) -> Tensor:
    _check_triton_inputs(q, k, v)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    kv_idx = kv_len = seed = None
    if key_padding_mask is not None:
        kv_idx, kv_len = key_order(key_padding_mask)
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=q.device, dtype=torch.int64)
    out, _ = _flash_attention_fwd(q, k, v, kv_idx, kv_len, seed, dropout_p, softmax_scale)
    return out


# --------------------------------------------------------------------------------------------------- SDPA

def _sdpa_attention(q, k, v, key_padding_mask, dropout_p, softmax_scale, attn_bias=None) -> Tensor:
    """SDPA with a boolean mask (a float one with ``attn_bias``); an all-padded batch element attends to its
    (padded) keys and is then zeroed, so neither its output nor its gradients are NaN."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=softmax_scale)
    empty = key_padding_mask.all(dim=1)  # (B,)
    attend = ~key_padding_mask | empty[:, None]
    mask = attend[:, None, None, :]
    if attn_bias is not None:
        mask = attn_bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return out.masked_fill(empty[:, None, None, None], 0.0)


# ------------------------------------------------------------------------------------------ the public op

def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], dropout_p: float,
                  attn_bias: Optional[Tensor] = None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: expected q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"attention: key_padding_mask must be bool (True = ignore), got {key_padding_mask.dtype}")
        if key_padding_mask.device != k.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device}, k on {k.device}")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"attention: key_padding_mask must be (B, Lk) = {(k.shape[0], k.shape[2])}, got "
                             f"{tuple(key_padding_mask.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if attn_bias is not None:
        if not attn_bias.is_floating_point():
            raise TypeError(f"attention: attn_bias must be a float tensor (added to the scores), got {attn_bias.dtype}")
        if attn_bias.device != q.device:
            raise ValueError(f"attention: attn_bias is on {attn_bias.device}, q on {q.device}")
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            fits = attn_bias.dim() <= 4 and tuple(torch.broadcast_shapes(attn_bias.shape, full)) == full
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"attention: attn_bias must broadcast to (B, H, Lq, Lk) = {full}, got "
                             f"{tuple(attn_bias.shape)}")


def attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, backend: str = "auto", attn_bias: Optional[Tensor] = None,
) -> Tensor:
    """Multi-head attention with key padding: q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D).

    ``key_padding_mask`` (B, Lk) bool, True = ignore. ``dropout_p`` is applied whenever it is > 0 (like
    ``F.scaled_dot_product_attention``: pass 0.0 in eval mode). ``softmax_scale`` defaults to D ** -0.5.
    ``backend``: "auto" (SDPA, see ``detr_kernels._backend``), "triton", "sdpa" or "reference"; see the module
    doc for what each returns for an all-padded batch element. ``attn_bias``: a float tensor broadcastable to
    (B, H, Lq, Lk) added to the scores (gradients flow to it); not with ``backend="triton"``.
    """
    _check_inputs(q, k, v, key_padding_mask, dropout_p, attn_bias)
    name = resolve("attention", backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if name == "triton":
        if attn_bias is not None:
            raise ValueError("attention(backend='triton') takes key_padding_mask only, got an attn_bias; use "
                             "backend='sdpa' (or 'auto') for biased attention")
        return _triton_attention(q, k, v, key_padding_mask, dropout_p, scale)
    if name == "sdpa" and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # autocast would cast SDPA back to its low-precision dtype
            out = _sdpa_attention(q.float(), k.float(), v.float(), key_padding_mask, dropout_p, scale,
                                  None if attn_bias is None else attn_bias.float())
        return out.to(q.dtype)
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    if name == "sdpa":
        return _sdpa_attention(q, k, v, key_padding_mask, dropout_p, scale, attn_bias)
    return attention_reference(q, k, v, key_padding_mask, dropout_p, scale, attn_bias=attn_bias)


# ------------------------------------------------------------------------------------------------ module

class FusedMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (same parameters and state-dict keys: ``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``) that runs ``attention``.

    Supported: key_padding_mask (bool, True = ignore), ``attn_mask`` as ``nn.MultiheadAttention`` takes it ((Lq, Lk)
    or (B * H, Lq, Lk); float: added to the scores, bool: True = not allowed; not with the Triton backend), dropout
    on the attention weights, batch_first. Not supported (a clear error): ``need_weights=True`` (the weights are
    never materialized), separate kdim/vdim, add_bias_kv / add_zero_attn, unbatched inputs.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, backend={self.backend!r}")

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The input projections; inputs that are the same tensor share one GEMM (self-attention, k = v)."""
        w, b, E = self.in_proj_weight, self.in_proj_bias, self.embed_dim

        def linear(x: Tensor, rows: slice) -> Tensor:
            return F.linear(x, w[rows], None if b is None else b[rows])

        if query is key and key is value:
            return linear(query, slice(0, 3 * E)).chunk(3, dim=-1)
        if query is key:
            q, k = linear(query, slice(0, 2 * E)).chunk(2, dim=-1)
            return q, k, linear(value, slice(2 * E, 3 * E))
        if key is value:
            k, v = linear(key, slice(E, 3 * E)).chunk(2, dim=-1)
            return linear(query, slice(0, E)), k, v
        return linear(query, slice(0, E)), linear(key, slice(E, 2 * E)), linear(value, slice(2 * E, 3 * E))

    def _split_heads(self, x: Tensor) -> Tensor:
        """(L, B, E) or, batch_first, (B, L, E) -> (B, H, L, D) as a view."""
        if self.batch_first:
            B, L, _ = x.shape
            return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        L, B, _ = x.shape
        return x.view(L, B, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _merge_heads(self, x: Tensor) -> Tensor:
        """(B, H, L, D) -> (L, B, E) or, batch_first, (B, L, E)."""
        B, H, L, D = x.shape
        if self.batch_first:
            return x.transpose(1, 2).reshape(B, L, H * D)
        return x.permute(2, 0, 1, 3).reshape(L, B, H * D)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None) -> Tuple[Tensor, None]:
        """query (Lq, B, E), key/value (Lk, B, E) (batch first if ``batch_first``); key_padding_mask (B, Lk)
        bool, True = ignore. Returns (output shaped like query, None)."""
        if need_weights:
            raise ValueError("FusedMultiheadAttention never materializes attention weights: call it with "
                             "need_weights=False (nn.MultiheadAttention's default is True)")
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"FusedMultiheadAttention expects batched 3-D inputs, got query {tuple(query.shape)}, "
                             f"key {tuple(key.shape)}, value {tuple(value.shape)}")
        if attn_mask is not None:
            if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
                raise TypeError(f"FusedMultiheadAttention: attn_mask must be float (added to the scores) or bool "
                                f"(True = not allowed), got {attn_mask.dtype}")
            if resolve("attention", self.backend, query.device) == "triton":
                raise ValueError("FusedMultiheadAttention(backend='triton') takes key_padding_mask only, got an "
                                 "attn_mask; use backend='sdpa' (or 'auto')")
        q, k, v = (self._split_heads(t) for t in self._project(query, key, value))
        bias = None if attn_mask is None else self._bias(attn_mask, *q.shape[:3], k.shape[2])
        out = attention(q, k, v, key_padding_mask=key_padding_mask,
                        dropout_p=self.dropout if self.training else 0.0, backend=self.backend, attn_bias=bias)
        return self.out_proj(self._merge_heads(out)), None

    @staticmethod
    def _bias(attn_mask: Tensor, B: int, H: int, Lq: int, Lk: int) -> Tensor:
        """nn.MultiheadAttention's attn_mask, (Lq, Lk) or (B * H, Lq, Lk), as a float bias (1 or B, H, Lq, Lk)."""
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(attn_mask, float("-inf"))
        if tuple(attn_mask.shape) == (Lq, Lk):
            return attn_mask[None, None]
        if tuple(attn_mask.shape) == (B * H, Lq, Lk):
            return attn_mask.view(B, H, Lq, Lk)
        raise ValueError(f"FusedMultiheadAttention: attn_mask must be (Lq, Lk) = {(Lq, Lk)} or (B * num_heads, Lq, "
                         f"Lk) = {(B * H, Lq, Lk)}, got {tuple(attn_mask.shape)}")
