"""Tests of detr_kernels.attention: the Triton kernels (interpreted on CPU, compiled on a GPU), the SDPA and
reference backends, the nn.MultiheadAttention drop-in and the torch.library registration.

CPU (TRITON_INTERPRET=1, set by conftest): tiny shapes, fp32 and fp16, against a float64 reference.
GPU (``-m gpu``): MDETR shapes, fp16/bf16 under flash-attention's rule: the kernel's error against an fp32
reference is at most twice PyTorch's own error at the same low precision.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr_kernels._backend import triton_available, triton_interpreted
from detr_kernels.attention import FusedMultiheadAttention, attention, attention_reference, key_order

CUDA = torch.cuda.is_available()
HAS_TRITON = triton_available() and (CUDA or triton_interpreted())
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton needs CUDA or TRITON_INTERPRET=1")
needs_gpu = pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and Triton")
DEVICE = torch.device("cuda" if CUDA else "cpu")


# ------------------------------------------------------------------------------------------------ helpers

def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str,
                         max_print: int = 5) -> None:
    """allclose that says where it fails: how many entries, the worst ones, and their values."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN counts as bad
    if not bad.any():
        return
    idx = bad.nonzero()[:max_print]
    where = "\n".join(f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.6g}, expected {e[tuple(i)].item():.6g}"
                      for i in idx)
    raise AssertionError(
        f"{name}: {int(bad.sum())}/{bad.numel()} entries differ (atol={atol}, rtol={rtol}); "
        f"max abs err {torch.nan_to_num(err, nan=math.inf).max().item():.3g}\n{where}")


def make_mask(kind: str, batch: int, keys: int, gen: torch.Generator, device=DEVICE) -> torch.Tensor | None:
    """Key-padding masks (True = ignore). ``mdetr``: image tokens on a grid padded bottom/right, then text
    tokens padded at the end, as in MDETR's cross encoder."""
    if kind == "none":
        return None
    return _mask_on_cpu(kind, batch, keys, gen).to(device)


def _mask_on_cpu(kind: str, batch: int, keys: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        mask = torch.rand(batch, keys, generator=gen) < 0.35
        mask[:, torch.randint(keys, (1,), generator=gen)] = False  # keep every element non-empty
        return mask
    if kind == "all_but_one":
        mask = torch.ones(batch, keys, dtype=torch.bool)
        mask[torch.arange(batch), torch.randint(keys, (batch,), generator=gen)] = False
        return mask
    if kind == "mdetr":
        text = max(keys // 4, 1)
        h = w = int(math.isqrt(keys - text))
        text = keys - h * w
        mask = torch.zeros(batch, keys, dtype=torch.bool)
        for b in range(batch):
            img = torch.ones(h, w, dtype=torch.bool)
            img[: h - b % 2, : w - (b + 1) % 3] = False
            mask[b, : h * w] = img.flatten()
            mask[b, h * w + max(1, text - b):] = True
        return mask
    raise ValueError(kind)


def qkv(batch, heads, q_len, k_len, head_dim, dtype, device=DEVICE, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, q_len, head_dim), (batch, heads, k_len, head_dim), (batch, heads, k_len, head_dim)]
    return [(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


def run_with_grads(fn, tensors, dout):
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, dout)
    return [out, *grads]


def reference_float64(q, k, v, mask, dout, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    return run_with_grads(lambda a, b, c: attention_reference(a, b, c, mask, **kw), leaves, dout.double())


TOLERANCES = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 4e-3)}
NAMES = ("out", "dq", "dk", "dv")


# ------------------------------------------------------------------------------- Triton vs float64 (CPU)

CASES = [  # (B, H, Lq, Lk, D, mask)
    (2, 2, 37, 37, 32, "random"),
    (2, 1, 1, 113, 32, "random"),
    (1, 2, 113, 3, 64, "none"),
    (3, 1, 3, 37, 64, "all_but_one"),
    (2, 2, 16, 41, 32, "mdetr"),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}q{}k{}d{}-{}".format(*c))
def test_triton_matches_float64_reference(case, dtype):
    B, H, Lq, Lk, D, kind = case
    mask = make_mask(kind, B, Lk, torch.Generator().manual_seed(1))
    tensors = qkv(B, H, Lq, Lk, D, dtype)
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, backend="triton"), tensors, dout)
    want = reference_float64(*tensors, mask, dout)
    atol, rtol = TOLERANCES[dtype]
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype
        assert_close_verbose(g, w, atol, rtol, f"{name} {case} {dtype}")


@needs_triton
def test_triton_non_default_scale_and_strided_inputs():
    """softmax_scale is honoured; q/k/v as views of (L, B, E) projections (MHA's layout) need no copy."""
    B, H, L, D = 2, 2, 21, 32
    gen = torch.Generator().manual_seed(3)
    qkv_packed = torch.randn(L, B, 3 * H * D, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = (t.view(L, B, H, D).permute(1, 2, 0, 3) for t in qkv_packed.chunk(3, dim=-1))
    mask = make_mask("random", B, L, gen)
    out = attention(q, k, v, mask, softmax_scale=0.3, backend="triton")
    assert out.permute(2, 0, 1, 3).is_contiguous(), "output should follow q's (L, B, H, D) memory order"
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    (grad,) = torch.autograd.grad(out, qkv_packed, dout)
    ref_leaf = qkv_packed.detach().double().requires_grad_()
    rq, rk, rv = (t.view(L, B, H, D).permute(1, 2, 0, 3) for t in ref_leaf.chunk(3, dim=-1))
    ref = attention_reference(rq, rk, rv, mask, softmax_scale=0.3)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, dout.double())
    assert_close_verbose(out, ref, 2e-5, 1e-4, "out")
    assert_close_verbose(grad, ref_grad, 2e-5, 1e-4, "d(qkv)")


@needs_triton
def test_padded_keys_are_never_read():
    """Padding is skipped, not masked: NaN in padded keys and values changes nothing, and their gradients are
    exactly zero. A masking kernel would compute 0 * NaN = NaN in P @ V."""
    B, H, Lq, Lk, D = 2, 2, 9, 40, 32
    mask = make_mask("mdetr", B, Lk, torch.Generator().manual_seed(4))
    q, k, v = qkv(B, H, Lq, Lk, D, torch.float32)
    with torch.no_grad():
        k[mask[:, None, :, None].expand_as(k)] = float("nan")
        v[mask[:, None, :, None].expand_as(v)] = float("nan")
    dout = torch.randn(B, H, Lq, D, device=DEVICE)
    out, dq, dk, dv = run_with_grads(lambda a, b, c: attention(a, b, c, mask, backend="triton"), [q, k, v], dout)
    keep = ~mask
    for b in range(B):  # the reference sees only the valid keys of sample b
        sub = [t[b:b + 1, :, rows].detach() for t, rows in ((q, slice(None)), (k, keep[b]), (v, keep[b]))]
        ref = reference_float64(*sub, None, dout[b:b + 1])
        got = (out[b:b + 1], dq[b:b + 1], dk[b:b + 1, :, keep[b]], dv[b:b + 1, :, keep[b]])
        for name, g, w in zip(NAMES, got, ref):
            assert_close_verbose(g, w, 2e-5, 1e-4, f"{name}[{b}]")
    assert torch.all(dk[mask[:, None, :, None].expand_as(dk)] == 0)
    assert torch.all(dv[mask[:, None, :, None].expand_as(dv)] == 0)


@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=needs_triton), "sdpa"])
def test_all_padded_batch_element_gives_zeros(backend):
    """Fused backends define the output of an element with no valid key as zeros (zero gradients); the
    reference, like nn.MultiheadAttention, gives NaN."""
    B, H, Lq, Lk, D = 3, 2, 5, 19, 32
    mask = make_mask("random", B, Lk, torch.Generator().manual_seed(5))
    mask[1] = True
    tensors = qkv(B, H, Lq, Lk, D, torch.float32)
    dout = torch.randn(B, H, Lq, D, device=DEVICE)
    out, *grads = run_with_grads(lambda a, b, c: attention(a, b, c, mask, backend=backend), tensors, dout)
    assert torch.all(out[1] == 0)
    for g in grads:
        assert torch.all(g[1] == 0)
    ref = reference_float64(*tensors, mask, dout)
    assert torch.isnan(ref[0][1]).all(), "the reference is documented to give NaN here"
    for name, g, w in zip(NAMES, [out, *grads], ref):
        assert_close_verbose(g[::2], w[::2], 2e-5, 1e-4, f"{backend} {name}")  # elements 0 and 2


@pytest.mark.parametrize("case", [(2, 2, 37, 113, 32, "mdetr"), (3, 1, 1, 3, 64, "all_but_one")],
                         ids=["mdetr", "tiny"])
def test_sdpa_and_reference_backends_agree(case):
    B, H, Lq, Lk, D, kind = case
    mask = make_mask(kind, B, Lk, torch.Generator().manual_seed(6))
    tensors = qkv(B, H, Lq, Lk, D, torch.float64)
    dout = torch.randn(B, H, Lq, D, dtype=torch.float64, device=DEVICE)
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, backend="sdpa"), tensors, dout)
    want = run_with_grads(lambda a, b, c: attention(a, b, c, mask, backend="reference"), tensors, dout)
    for name, g, w in zip(NAMES, got, want):
        assert_close_verbose(g, w, 1e-10, 1e-10, f"sdpa {name}")


@pytest.mark.parametrize("case", [(2, 8, 29, 29, 32, "mdetr", (1, 8, 29, 29)),
                                  (3, 2, 5, 17, 16, "all_but_one", (3, 1, 5, 17)), (2, 1, 7, 7, 32, "none", (7, 7))],
                         ids=["mdetr-per-head", "per-batch", "shared"])
def test_attn_bias_sdpa_and_reference_agree_with_gradients(case):
    """An additive bias (broadcast over batch, heads or both), key padding beside it: SDPA equals the reference
    in float64, outputs and the gradients of q, k, v and the bias."""
    B, H, Lq, Lk, D, kind, bias_shape = case
    mask = make_mask(kind, B, Lk, torch.Generator().manual_seed(3))
    *tensors, bias = qkv(B, H, Lq, Lk, D, torch.float64) + [
        (torch.randn(bias_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3)
        .to(DEVICE).requires_grad_()]
    dout = torch.randn(B, H, Lq, D, dtype=torch.float64, device=DEVICE)
    results = {}
    for backend in ("sdpa", "reference"):
        results[backend] = run_with_grads(lambda a, b, c, d: attention(a, b, c, mask, backend=backend, attn_bias=d),
                                          [*tensors, bias], dout)
    for name, g, w in zip(NAMES + ("dbias",), results["sdpa"], results["reference"]):
        assert_close_verbose(g, w, 1e-10, 1e-10, f"sdpa with bias {name}")
    # the bias is really added: a bias that is -inf off one key makes every row attend to that key alone
    q, k, v = (t.detach() for t in tensors)
    only = torch.full((Lq, Lk), float("-inf"), dtype=torch.float64, device=DEVICE)
    only[:, 0] = 0.0
    out = attention(q, k, v, backend="sdpa", attn_bias=only)
    assert_close_verbose(out, v[:, :, :1].expand_as(out), 1e-12, 0.0, "bias selects key 0")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_sdpa_on_cpu_computes_low_precision_in_fp32(dtype, autocast):
    """On the CPU, SDPA's bf16 / fp16 inputs are computed in fp32 (PyTorch's CPU flash attention is slower in bf16
    than in fp32), also under autocast (which would cast SDPA back down): the output and the gradients are those
    of the fp32 computation on the same low-precision numbers, rounded once, in the inputs' dtype."""
    B, H, Lq, Lk, D = 2, 8, 100, 41, 32
    mask = make_mask("mdetr", B, Lk, torch.Generator().manual_seed(8), device="cpu")
    *tensors, bias = qkv(B, H, Lq, Lk, D, dtype, device="cpu", seed=9) + [
        torch.randn(1, H, Lq, Lk, generator=torch.Generator().manual_seed(10)).to(dtype).requires_grad_()]
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(11)).to(dtype)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):  # the forward only, as in training
        out = attention(*tensors, mask, backend="sdpa", attn_bias=bias)
    got = [out, *torch.autograd.grad(out, [*tensors, bias], dout)]
    leaves = [t.detach().float().requires_grad_() for t in (*tensors, bias)]
    want = run_with_grads(lambda a, b, c, d: attention(a, b, c, mask, backend="sdpa", attn_bias=d), leaves,
                          dout.float())
    for name, g, w in zip(NAMES + ("dbias",), got, want):
        assert g.dtype == dtype, f"{name}: {g.dtype}"
        assert torch.equal(g, w.to(dtype)), f"{name}: not the fp32 result rounded to {dtype}"


def test_attn_bias_errors():
    q, k, v = (t.detach() for t in qkv(2, 2, 3, 5, 16, torch.float32))
    with pytest.raises(TypeError, match="attn_bias must be a float tensor"):
        attention(q, k, v, backend="sdpa", attn_bias=torch.zeros(3, 5, dtype=torch.bool))
    if CUDA:  # q is on the GPU
        with pytest.raises(ValueError, match="attn_bias is on cpu, q on cuda"):
            attention(q, k, v, backend="sdpa", attn_bias=torch.zeros(3, 5))
    with pytest.raises(ValueError,
                       match=r"attn_bias must broadcast to \(B, H, Lq, Lk\) = \(2, 2, 3, 5\), got \(3, 4\)"):
        attention(q, k, v, backend="sdpa", attn_bias=torch.zeros(3, 4, device=DEVICE))
    if HAS_TRITON:
        with pytest.raises(ValueError, match="backend='triton'.*attn_bias"):
            attention(q, k, v, backend="triton", attn_bias=torch.zeros(3, 5, device=DEVICE))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_module_attn_mask_matches_nn_multihead_attention(backend):
    """attn_mask as nn.MultiheadAttention takes it: float (B * H, Lq, Lk) added to the scores, bool (Lq, Lk)
    with True = not allowed; with key padding; outputs and input/bias gradients equal nn.MultiheadAttention's."""
    E, H, B, L = 64, 4, 3, 13
    torch.manual_seed(1)
    ref = nn.MultiheadAttention(E, H).double()
    fused = FusedMultiheadAttention(E, H, backend=backend).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(L, B, E, dtype=torch.float64)
    pad = make_mask("mdetr", B, L, torch.Generator().manual_seed(2), device="cpu")
    bias = torch.randn(B * H, L, L, dtype=torch.float64)
    blocked = torch.rand(L, L, generator=torch.Generator().manual_seed(5)) < 0.3
    blocked.fill_diagonal_(False)
    # float per head and batch element, bool shared, float shared, bool per head and batch element
    for attn_mask in (bias, blocked, bias[0], blocked.repeat(B * H, 1, 1)):
        grads = []
        for module in (ref, fused):
            leaf = x.clone().requires_grad_()
            leaf_mask = attn_mask.clone().requires_grad_() if attn_mask.is_floating_point() else attn_mask
            key_pad = pad
            if module is ref and attn_mask.is_floating_point():  # nn.MultiheadAttention wants both of one type
                key_pad = torch.zeros(pad.shape, dtype=torch.float64).masked_fill(pad, float("-inf"))
            out = module(leaf, leaf, leaf, key_padding_mask=key_pad, attn_mask=leaf_mask, need_weights=False)[0]
            out.pow(2).sum().backward()
            grads.append((out, leaf.grad, leaf_mask.grad if attn_mask.is_floating_point() else None))
        (want, want_dx, want_db), (got, got_dx, got_db) = grads
        assert_close_verbose(got, want, 1e-10, 1e-10, f"{backend} attn_mask {attn_mask.dtype} out")
        assert_close_verbose(got_dx, want_dx, 1e-10, 1e-10, f"{backend} attn_mask {attn_mask.dtype} dx")
        if want_db is not None:
            assert_close_verbose(got_db, want_db, 1e-10, 1e-10, f"{backend} attn_mask dbias")


def test_auto_picks_sdpa_for_attention_on_every_device():
    """By measurement (detr_kernels._backend's doc): the Triton op is host-bound at MDETR's sizes."""
    from detr_kernels._attention_triton import tile_class
    from detr_kernels._backend import auto_choice

    assert auto_choice("attention", "cuda") == "sdpa" and auto_choice("attention", "cpu") == "sdpa"
    assert [tile_class(d, t) for d, t in ((16, torch.bfloat16), (32, torch.float16), (64, torch.bfloat16),
                                          (128, torch.float16), (32, torch.float32))] == \
        ["narrow", "narrow", "d64", "wide", "wide"]


def test_auto_backend_and_input_errors():
    q, k, v = qkv(1, 1, 4, 6, 32, torch.float32)
    mask = torch.zeros(1, 6, dtype=torch.bool, device=DEVICE)
    with pytest.raises(TypeError, match="bool"):
        attention(q, k, v, mask.float())
    with pytest.raises(ValueError, match=r"\(B, Lk\)"):
        attention(q, k, v, mask[:, :5])
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="flash")
    if HAS_TRITON:
        q48, k48, v48 = qkv(1, 1, 4, 6, 48, torch.float32)
        with pytest.raises(ValueError, match="head dim"):
            attention(q48, k48, v48, backend="triton")
        with pytest.raises(TypeError, match="float64"):
            attention(*qkv(1, 1, 4, 6, 32, torch.float64), backend="triton")


# -------------------------------------------------------------------------------------------------- dropout

def triton_keep_mask(batch, heads, q_len, k_len, mask, dropout_p, seed, device=DEVICE, chunk=32):
    """The keep-mask the Triton kernel draws for ``torch.manual_seed(seed)`` (B, H, Lq, Lk) bool.

    With q = k = 0 the attention is uniform over the valid keys; with V = a slice of the identity each output
    column is one key's (dropped or kept) weight. The kernel's Philox counter depends on the query row, the key
    and the padding mask only, not on the head dim or the tiles, so the mask read here is the one any call at
    this (B, H, Lq, Lk, mask, seed) uses."""
    keep = torch.zeros(batch, heads, q_len, k_len, dtype=torch.bool, device=device)
    q = torch.zeros(batch, heads, q_len, chunk, device=device)
    k = torch.zeros(batch, heads, k_len, chunk, device=device)
    for start in range(0, k_len, chunk):
        cols = torch.arange(start, min(start + chunk, k_len), device=device)
        v = torch.zeros(batch, heads, k_len, chunk, device=device)
        v[:, :, cols, cols - start] = 1.0
        torch.manual_seed(seed)
        out = attention(q, k, v, mask, dropout_p=dropout_p, backend="triton")
        keep[..., cols] = out[..., : len(cols)] > 0
    return keep


def check_dropout_replay(B, H, Lq, Lk, D, dtype, p, atol, rtol):
    """Forward and backward use the same mask: replaying it through the reference matches out and grads."""
    mask = make_mask("random", B, Lk, torch.Generator().manual_seed(7))
    keep = triton_keep_mask(B, H, Lq, Lk, mask, p, seed=11)
    tensors = qkv(B, H, Lq, Lk, D, dtype)
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
    torch.manual_seed(11)
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, dropout_p=p, backend="triton"), tensors, dout)
    want = reference_float64(*tensors, mask, dout, dropout_p=p, dropout_keep=keep)
    for name, g, w in zip(NAMES, got, want):
        assert_close_verbose(g, w, atol, rtol, f"dropout {name}")
    return keep, mask


def check_dropout_statistics(keep, mask, p):
    valid = (~mask)[:, None, None, :].expand_as(keep)
    n = int(valid.sum())
    kept = keep[valid].double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"kept {kept:.4f} of {n}, expected {1 - p}"
    assert not keep[~valid].any(), "a padded key was kept"
    if keep.shape[1] > 1:  # heads draw independent masks
        agree = (keep[:, 0] == keep[:, 1])[valid[:, 0]].double().mean().item()
        expected = p * p + (1 - p) * (1 - p)
        assert abs(agree - expected) < 0.1, f"heads agree on {agree:.3f} of entries, independent: {expected:.3f}"


@needs_triton
def test_dropout_forward_backward_agree_and_statistics():
    p = 0.3
    keep, mask = check_dropout_replay(2, 2, 19, 30, 32, torch.float32, p, 2e-5, 1e-4)
    check_dropout_statistics(keep, mask, p)
    again = triton_keep_mask(2, 2, 19, 30, mask, p, seed=11)
    other = triton_keep_mask(2, 2, 19, 30, mask, p, seed=12)
    assert torch.equal(keep, again), "the same torch seed must give the same dropout mask"
    assert not torch.equal(keep, other), "another seed must give another dropout mask"


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_dropout_of_torch_backends_is_unbiased(backend):
    """E[dropout(P) @ V] = P @ V: the mean over many draws approaches the no-dropout output."""
    draws, H, Lq, Lk, D = 4000, 1, 4, 8, 16
    q, k, v = (t.detach().expand(draws, -1, -1, -1) for t in qkv(1, H, Lq, Lk, D, torch.float64))
    torch.manual_seed(0)
    out = attention(q, k, v, dropout_p=0.5, backend=backend)  # every batch element draws its own mask
    exact = attention(q[:1], k[:1], v[:1], backend=backend)
    assert (out.std(0) > 0).all()
    assert_close_verbose(out.mean(0, keepdim=True), exact, 0.1, 0.0, f"{backend} dropout mean")


# ---------------------------------------------------------------------------- the nn.MultiheadAttention drop-in

MODULE_CASES = [  # (backend, batch_first, self-attention kind, Lq, Lk)
    pytest.param("triton", False, "q=k!=v", 13, 13, marks=needs_triton, id="triton-encoder"),
    pytest.param("triton", True, "cross", 5, 22, marks=needs_triton, id="triton-decoder-batch_first"),
    pytest.param("sdpa", False, "q=k=v", 11, 11, id="sdpa-self"),
    pytest.param("reference", False, "k=v", 7, 17, id="reference-cross"),
]


@pytest.mark.parametrize("backend, batch_first, kind, Lq, Lk", MODULE_CASES)
def test_module_matches_nn_multihead_attention(backend, batch_first, kind, Lq, Lk):
    E, H, B = 64, 2, 3
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first).double()
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    fused = FusedMultiheadAttention(E, H, batch_first=batch_first, backend=backend)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict())

    def seq(L):
        return torch.randn((B, L, E) if batch_first else (L, B, E), dtype=torch.float64)

    query, pos = seq(Lq), seq(Lq)
    key = query if kind.startswith("q=k") else seq(Lk)
    value = {"q=k=v": query, "q=k!=v": pos, "k=v": key, "cross": seq(Lk)}[kind]
    mask = make_mask("mdetr", B, Lk, torch.Generator().manual_seed(9), device="cpu")
    want, _ = ref(query, key, value, key_padding_mask=mask, need_weights=False)

    dtype, device = (torch.float32, DEVICE) if backend == "triton" else (torch.float64, "cpu")
    fused.to(device, dtype)
    leaves = {id(t): t.detach().to(device, dtype).requires_grad_() for t in (query, key, value)}  # one per tensor
    got, weights = fused(leaves[id(query)], leaves[id(key)], leaves[id(value)],
                         key_padding_mask=mask.to(device))
    assert weights is None
    assert_close_verbose(got, want, 2e-5 if dtype == torch.float32 else 1e-10, 1e-4, f"module {backend}")
    got.sum().backward()
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves.values())


def test_module_rejects_unsupported_arguments():
    fused = FusedMultiheadAttention(32, 2, backend="reference")
    x = torch.randn(4, 2, 32)
    with pytest.raises(TypeError, match="attn_mask must be float .* or bool .*, got torch.int64"):
        fused(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.long))
    if HAS_TRITON:
        triton_mha = FusedMultiheadAttention(32, 2, backend="triton").to(DEVICE)
        with pytest.raises(ValueError, match=r"backend='triton'\) takes key_padding_mask only, got an attn_mask"):
            triton_mha(x.to(DEVICE), x.to(DEVICE), x.to(DEVICE), attn_mask=torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="need_weights"):
        fused(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match=r"attn_mask must be \(Lq, Lk\) = \(4, 4\) or \(B \* num_heads, Lq, Lk\) = "
                                         r"\(4, 4, 4\), got \(3, 4\)"):
        fused(x, x, x, attn_mask=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="3-D"):
        fused(x[:, 0], x[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="divisible"):
        FusedMultiheadAttention(30, 4)


def test_module_dropout_only_in_training():
    fused = FusedMultiheadAttention(32, 2, dropout=0.5, backend="reference").eval()
    x = torch.randn(6, 2, 32)
    a, _ = fused(x, x, x)
    b, _ = fused(x, x, x)
    assert torch.equal(a, b)
    fused.train()
    c, _ = fused(x, x, x)
    assert not torch.allclose(a, c)


# ----------------------------------------------------------------------------------------- torch.library

@needs_triton
def test_op_passes_opcheck():
    q, k, v = qkv(1, 2, 5, 7, 16, torch.float32)
    mask = make_mask("random", 1, 7, torch.Generator().manual_seed(10))
    kv_idx, kv_len = key_order(mask)
    seed = torch.tensor([123], dtype=torch.int64, device=DEVICE)
    for args in [(q, k, v, kv_idx, kv_len, None, 0.0, 0.25), (q, k, v, None, None, seed, 0.2, 0.25)]:
        torch.library.opcheck(torch.ops.detr_kernels.flash_attention_fwd.default, args)


@needs_triton
def test_torch_compile_traces_the_module_without_graph_breaks():
    torch._dynamo.reset()
    fused = FusedMultiheadAttention(32, 2, dropout=0.1, backend="triton", device=DEVICE)
    x = torch.randn(9, 2, 32, device=DEVICE, requires_grad=True)
    pos = torch.randn(9, 2, 32, device=DEVICE)
    mask = make_mask("random", 2, 9, torch.Generator().manual_seed(11))

    def layer(src):
        return fused(src + pos, src + pos, src, key_padding_mask=mask)[0]

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert out.shape == x.shape and torch.isfinite(x.grad).all()
    fused.eval()
    assert_close_verbose(compiled(x), layer(x), 1e-6, 1e-6, "compiled eval")


# -------------------------------------------------------------------------------------------------- GPU

def mdetr_shape_mask(batch, keys, device, seed=0):
    """~30% padded keys, image padding bottom/right on a 3:4 grid interleaved with text padding at the end."""
    gen = torch.Generator().manual_seed(seed)
    text = 32
    w = int(math.sqrt((keys - text) * 4 / 3))
    h = (keys - text) // w
    text = keys - h * w
    mask = torch.zeros(batch, keys, dtype=torch.bool)
    for b in range(batch):
        f = 0.6 + 0.4 * torch.rand((), generator=gen).item() if b else 1.0
        img = torch.ones(h, w, dtype=torch.bool)
        img[: max(1, int(h * f ** 0.5)), : max(1, int(w * f ** 0.5))] = False
        mask[b, : h * w] = img.flatten()
        mask[b, h * w + int(torch.randint(4, text, (), generator=gen)):] = True
    return mask.to(device)


def flash_rule(B, H, Lq, Lk, D, dtype):
    """Kernel error <= 2x PyTorch's low-precision error (+ a tiny floor), both against fp32."""
    mask = mdetr_shape_mask(B, Lk, "cuda")
    tensors = qkv(B, H, Lq, Lk, D, dtype, device="cuda")
    dout = torch.randn(B, H, Lq, D, device="cuda", dtype=dtype)
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, backend="triton"), tensors, dout)
    low = run_with_grads(lambda a, b, c: attention_reference(a, b, c, mask), tensors, dout)
    leaves = [t.detach().float().requires_grad_() for t in tensors]
    exact = run_with_grads(lambda a, b, c: attention_reference(a, b, c, mask), leaves, dout.float())
    for name, g, lo, ex in zip(NAMES, got, low, exact):
        err = (g.float() - ex).abs().max().item()
        base = (lo.float() - ex).abs().max().item()
        print(f"{name}: kernel err {err:.3g}, PyTorch {dtype} err {base:.3g}")
        assert err <= 2 * base + 1e-5, f"{name} ({B},{H},{Lq},{Lk},{D}) {dtype}: {err:.3g} > 2 x {base:.3g}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape, dtype", [
    pytest.param((16, 8, 1000, 1000, 32), torch.bfloat16, id="encoder-bf16"),
    pytest.param((16, 8, 1000, 1000, 32), torch.float16, id="encoder-fp16"),
    pytest.param((16, 8, 100, 1000, 32), torch.bfloat16, id="decoder-bf16"),
    pytest.param((16, 8, 100, 1000, 32), torch.float16, id="decoder-fp16"),
    pytest.param((4, 8, 1400, 1400, 32), torch.bfloat16, id="encoder-L1400-bf16"),
    pytest.param((2, 4, 333, 517, 64), torch.bfloat16, id="d64-odd-bf16"),
])
def test_gpu_flash_rule(shape, dtype):
    flash_rule(*shape, dtype)


@pytest.mark.gpu
@needs_gpu
def test_gpu_fp32_against_float64():
    B, H, Lq, Lk, D = 2, 8, 300, 301, 32
    mask = mdetr_shape_mask(B, Lk, "cuda")
    tensors = qkv(B, H, Lq, Lk, D, torch.float32, device="cuda")
    dout = torch.randn(B, H, Lq, D, device="cuda")
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, backend="triton"), tensors, dout)
    want = reference_float64(*tensors, mask, dout)
    tol = 2e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
    for name, g, w in zip(NAMES, got, want):
        assert_close_verbose(g, w, tol, tol, f"gpu fp32 {name}")


@pytest.mark.gpu
@needs_gpu
def test_gpu_dropout_and_empty_elements():
    p = 0.1
    keep, mask = check_dropout_replay(2, 8, 150, 200, 32, torch.float32, p, 1e-4, 1e-4)
    check_dropout_statistics(keep, mask, p)
    B, H, L, D = 3, 8, 257, 32
    mask = mdetr_shape_mask(B, L, "cuda")
    mask[1] = True
    tensors = qkv(B, H, L, L, D, torch.bfloat16, device="cuda")
    out, *grads = run_with_grads(lambda a, b, c: attention(a, b, c, mask, dropout_p=p, backend="triton"),
                                 tensors, torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16))
    assert torch.all(out[1] == 0) and all(torch.all(g[1] == 0) for g in grads)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_attn_bias_bf16_against_fp32():
    """SDPA with a per-head bias and key padding in bf16 on the GPU (the fused kernels cuDNN / efficient attention
    pick): outputs and the gradients of q, k, v and the bias within bf16 rounding of an fp32 reference."""
    B, H, L, D = 2, 8, 300, 32
    mask = mdetr_shape_mask(B, L, "cuda")
    q, k, v = qkv(B, H, L, L, D, torch.bfloat16, device="cuda", seed=11)
    bias = (torch.randn(1, H, L, L, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    dout = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    got = run_with_grads(lambda a, b, c, d: attention(a, b, c, mask, backend="sdpa", attn_bias=d), [q, k, v, bias],
                         dout)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, bias)]
    want = run_with_grads(lambda a, b, c, d: attention_reference(a, b, c, mask, attn_bias=d), leaves, dout.float())
    for name, g, w in zip(NAMES + ("dbias",), got, want):
        scale = w.abs().max().item()
        assert_close_verbose(g.float(), w, 0.02 * scale + 1e-3, 0.0, f"bf16 sdpa with bias {name}")
