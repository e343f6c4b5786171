"""detr_kernels.contrastive: the Triton kernels (interpreted on CPU) against a float64 reference, the reference
against hand-computed numbers and gradcheck, the awkward cases of MDETR batches, and the argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from detr_kernels._backend import resolve
from detr_kernels.contrastive import contrastive_align_loss, contrastive_align_loss_reference

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def random_targets(n_layers, batch, queries, length, *, max_boxes=3, max_len=None, empty_span_p=0.0, seed=0):
    """MDETR-like targets: per sample a caption of random length (the rest padding) and up to ``max_boxes``
    boxes, each a contiguous token span; every layer matches the boxes to its own random queries.
    Returns positive_map (N, B, Q, L) bool, matched (N, B, Q) bool, token_mask (B, L) bool (True = padding)."""
    g = torch.Generator().manual_seed(seed)
    max_len = max_len or length
    positive_map = torch.zeros(n_layers, batch, queries, length, dtype=torch.bool)
    matched = torch.zeros(n_layers, batch, queries, dtype=torch.bool)
    token_mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        caption = int(torch.randint(1, max_len + 1, (1,), generator=g))
        token_mask[b, caption:] = True
        n_boxes = int(torch.randint(1, min(max_boxes, queries) + 1, (1,), generator=g))
        spans = []
        for _ in range(n_boxes):
            start = int(torch.randint(0, caption, (1,), generator=g))
            end = int(torch.randint(start + 1, caption + 1, (1,), generator=g))
            if float(torch.rand((), generator=g)) < empty_span_p:
                end = start
            spans.append((start, end))
        for n in range(n_layers):
            slots = torch.randperm(queries, generator=g)[:n_boxes]
            for q, (start, end) in zip(slots.tolist(), spans):
                matched[n, b, q] = True
                positive_map[n, b, q, start:end] = True
    return positive_map, matched, token_mask


def unit_vectors(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def check_against_reference(queries, tokens, positive_map, num_boxes=3.0, token_mask=None, temperature=0.07):
    """Triton loss and gradients (fp32 inputs) against the float64 reference, with a random grad_output."""
    q64 = queries.double().requires_grad_()
    t64 = tokens.double().requires_grad_()
    ref = contrastive_align_loss_reference(q64, t64, positive_map, num_boxes, temperature, token_mask)
    grad_out = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    ref.backward(grad_out)

    q = queries.float().requires_grad_()
    t = tokens.float().requires_grad_()
    out = contrastive_align_loss(q, t, positive_map, num_boxes, temperature, token_mask, backend="triton")
    assert out.shape == ref.shape and out.dtype == torch.float32
    # atol: one similarity's size; a loss made of a few cancelling terms (one query, one token) keeps only that
    torch.testing.assert_close(out.double(), ref.detach(), rtol=LOSS_RTOL, atol=LOSS_RTOL / temperature / num_boxes)
    out.backward(grad_out.float())
    # dS entries are probabilities and 1/n_pos, O(1): one entry's gradient is ~ grad_out / temperature / num_boxes
    unit = grad_out.max().item() / temperature / num_boxes
    for got, want in ((q.grad, q64.grad), (t.grad, t64.grad)):
        scale = max(want.abs().max().item(), unit)
        torch.testing.assert_close(got.double(), want, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale)
    return out


# ------------------------------------------------------------------------------------------------ reference
def test_reference_hand_example():
    """B=1, Q=2, L=3, D=2, temperature 0.5; query 0 covers tokens 0 and 2, query 1 has no positive."""
    r = 1 / math.sqrt(2)
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [r, r]]], dtype=torch.float64)
    positive_map = torch.tensor([[[True, False, True], [False, False, False]]])
    # S = q.t / 0.5: row 0 = [2, 0, 2r], row 1 = [0, 2, 2r]
    s2 = 2 * r
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    row0 = -(2 + s2) / (2 + 1e-6) + lse(2, 0, s2)
    col0 = -2 / (1 + 1e-6) + lse(2, 0)
    col2 = -s2 / (1 + 1e-6) + lse(s2, s2)
    want = (row0 + col0 + col2) / 2 / 1.5
    got = contrastive_align_loss_reference(queries, tokens, positive_map, 1.5, temperature=0.5)
    assert got.shape == () and math.isclose(got.item(), want, rel_tol=1e-12)

    # clean variant: token 2 is padding, so it leaves the row's logsumexp, the positives and the columns
    mask = torch.tensor([[False, False, True]])
    row0 = -2 / (1 + 1e-6) + lse(2, 0)
    want = (row0 + col0) / 2 / 1.5
    got = contrastive_align_loss_reference(queries, tokens, positive_map, 1.5, temperature=0.5, token_mask=mask)
    assert math.isclose(got.item(), want, rel_tol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_reference_gradcheck(masked):
    positive_map, _, token_mask = random_targets(2, 2, 4, 5, seed=3)
    q = unit_vectors(2, 2, 4, 3, dtype=torch.float64, seed=1).requires_grad_()
    t = unit_vectors(2, 5, 3, dtype=torch.float64, seed=2).requires_grad_()
    mask = token_mask if masked else None
    assert torch.autograd.gradcheck(
        lambda a, b: contrastive_align_loss_reference(a, b, positive_map, 2.0, 0.3, mask), (q, t)
    )


def test_auto_is_reference_on_cpu():
    assert resolve("contrastive", "auto", "cpu") == "reference"
    positive_map, _, _ = random_targets(1, 2, 4, 5)
    q, t = unit_vectors(2, 4, 8), unit_vectors(2, 5, 8, seed=1)
    torch.testing.assert_close(
        contrastive_align_loss(q, t, positive_map[0], 2.0),
        contrastive_align_loss_reference(q, t, positive_map[0], 2.0), rtol=0, atol=0,
    )


# ------------------------------------------------------------------------------------------------ triton
@pytest.mark.parametrize(
    "n_layers,batch,queries,length,dim",
    [
        (None, 1, 1, 1, 16),  # single query, single token
        (None, 2, 5, 7, 16),  # (B, Q, D) input
        (3, 2, 5, 7, 16),
        (2, 1, 17, 33, 8),  # D < 16: padded dot tile
        (2, 2, 40, 300, 16),  # several query blocks: online column logsumexp
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_triton_matches_reference(n_layers, batch, queries, length, dim, masked):
    positive_map, _, token_mask = random_targets(n_layers or 1, batch, queries, length, seed=queries + length)
    lead = (n_layers,) if n_layers else ()
    q = unit_vectors(*lead, batch, queries, dim, seed=1)
    t = unit_vectors(batch, length, dim, seed=2)
    pm = positive_map if n_layers else positive_map[0]
    check_against_reference(q, t, pm, token_mask=token_mask if masked else None)


@pytest.mark.parametrize(
    "case", ["no_positives", "one_query_many_tokens", "tokens_shared", "empty_span", "mostly_padding", "all_padding"]
)
def test_triton_awkward_batches(case):
    N, B, Q, L, D = 2, 2, 6, 9, 16
    q, t = unit_vectors(N, B, Q, D, seed=4), unit_vectors(B, L, D, seed=5)
    positive_map, _, token_mask = random_targets(N, B, Q, L, seed=6)
    mask = None
    if case == "no_positives":  # no query of sample 1 is matched; nothing at all in layer 0
        positive_map[:, 1] = False
        positive_map[0] = False
    elif case == "one_query_many_tokens":
        positive_map[:, 0, 2, :] = True
    elif case == "tokens_shared":  # tokens 1..3 belong to three boxes at once
        positive_map[:, 1, :3, 1:4] = True
    elif case == "empty_span":  # a matched box whose span found no token: an all-False row
        positive_map, _, _ = random_targets(N, B, Q, L, empty_span_p=0.5, seed=7)
    elif case == "mostly_padding":
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[:, :2] = False
    else:  # sample 0's caption is padding everywhere
        mask = token_mask.clone()
        mask[0] = True
    out = check_against_reference(q, t, positive_map, token_mask=mask)
    assert torch.isfinite(out).all()
    if case == "no_positives":
        assert out[0].item() == 0.0


def test_layers_at_once_equal_per_layer_calls():
    N, B, Q, L, D = 3, 2, 5, 6, 16
    positive_map, _, token_mask = random_targets(N, B, Q, L, seed=8)
    queries = unit_vectors(N, B, Q, D, seed=9).requires_grad_()
    tokens = unit_vectors(B, L, D, seed=10).requires_grad_()
    for mask in (None, token_mask):
        all_layers = contrastive_align_loss(queries, tokens, positive_map, 4.0, token_mask=mask, backend="triton")
        g_all = torch.autograd.grad(all_layers.sum(), (queries, tokens))
        per_layer = torch.stack([
            contrastive_align_loss(queries[n], tokens, positive_map[n], 4.0, token_mask=mask, backend="triton")
            for n in range(N)
        ])
        g_per = torch.autograd.grad(per_layer.sum(), (queries, tokens))
        torch.testing.assert_close(all_layers, per_layer, rtol=1e-6, atol=1e-6)
        for a, b in zip(g_all, g_per):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_padding_mask_equals_no_mask_and_num_boxes_tensor():
    positive_map, _, _ = random_targets(2, 2, 5, 6, seed=11)
    q, t = unit_vectors(2, 2, 5, 16, seed=12), unit_vectors(2, 6, 16, seed=13)
    base = contrastive_align_loss(q, t, positive_map, 2.0, backend="triton")
    no_pad = torch.zeros(2, 6, dtype=torch.bool)
    no_pad_loss = contrastive_align_loss(q, t, positive_map, 2.0, token_mask=no_pad, backend="triton")
    torch.testing.assert_close(no_pad_loss, base)
    torch.testing.assert_close(contrastive_align_loss(q, t, positive_map, torch.tensor(2.0), backend="triton"), base)
    torch.testing.assert_close(contrastive_align_loss(q, t, positive_map, torch.tensor([2.0]), backend="triton"), base)


def test_gradient_of_one_input_only():
    """Frozen text side (tokens without grad), as when the text encoder is frozen; and the other way round."""
    positive_map, _, _ = random_targets(2, 2, 5, 6, seed=17)
    q, t = unit_vectors(2, 2, 5, 16, seed=18), unit_vectors(2, 6, 16, seed=19)
    for wants in ((True, False), (False, True)):
        args = [x.clone().requires_grad_(w) for x, w in zip((q, t), wants)]
        out = contrastive_align_loss(*args, positive_map, 2.0, backend="triton").sum()
        ref_args = [x.clone().requires_grad_(w) for x, w in zip((q, t), wants)]
        ref = contrastive_align_loss_reference(*ref_args, positive_map, 2.0).sum()
        (got,) = torch.autograd.grad(out, [a for a in args if a.requires_grad])
        (want,) = torch.autograd.grad(ref, [a for a in ref_args if a.requires_grad])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_half_inputs_compute_in_fp32(dtype, backend):
    positive_map, _, token_mask = random_targets(2, 2, 5, 7, seed=14)
    q = unit_vectors(2, 2, 5, 16, dtype=dtype, seed=15).requires_grad_()
    t = unit_vectors(2, 7, 16, dtype=dtype, seed=16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = contrastive_align_loss(q, t, positive_map, 3.0, token_mask=token_mask, backend=backend)
    want = contrastive_align_loss_reference(q.detach().double(), t.detach().double(), positive_map, 3.0,
                                            token_mask=token_mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert q.grad.dtype == dtype and t.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


# ------------------------------------------------------------------------------------------------ errors
def _bad_inputs():
    pm = torch.zeros(2, 3, 4, dtype=torch.bool)
    q, t = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    return [
        (dict(queries=q[0]), ValueError, "queries must have 3 or 4 dimensions"),
        (dict(queries=q.long()), TypeError, "queries must be a floating-point tensor"),
        (dict(tokens=t[:1]), ValueError, r"tokens must have shape \(B=2, L, D=8\)"),
        (dict(tokens=torch.randn(2, 4, 5)), ValueError, "tokens must have shape"),
        (dict(positive_map=pm.float()), TypeError, "positive_map must be a bool tensor, got dtype torch.float32"),
        (dict(positive_map=pm[..., :3]), ValueError, r"positive_map must have shape \(2, 3, 4\), got \(2, 3, 3\)"),
        (dict(positive_map=pm[None]), ValueError, "positive_map must have shape"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0, got 0.0"),
        (dict(temperature=-1), ValueError, "temperature must be > 0"),
        (dict(token_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, r"token_mask must have shape \(2, 4\)"),
        (dict(token_mask=torch.zeros(2, 4)), TypeError, "token_mask must be a bool tensor"),
        (dict(num_boxes=torch.ones(2)), ValueError, "num_boxes must be a number or a one-element tensor"),
        (dict(num_boxes=0), ValueError, "num_boxes must be > 0"),
        (dict(backend="cuda"), ValueError, "backend for contrastive must be"),
    ]


@pytest.mark.parametrize("override,error,match", _bad_inputs())
def test_bad_inputs(override, error, match):
    args = dict(queries=torch.randn(2, 3, 8), tokens=torch.randn(2, 4, 8),
                positive_map=torch.zeros(2, 3, 4, dtype=torch.bool), num_boxes=1.0)
    args.update(override)
    with pytest.raises(error, match=match):
        contrastive_align_loss(**args)


# ------------------------------------------------------------------------------------------------ GPU
def mdetr_sized(dtype, device, masked, seed=0):
    """B=32, Q=100, L=256, D=64, 6 layers, like MDETR's training batch."""
    positive_map, _, token_mask = random_targets(6, 32, 100, 256, max_boxes=8, max_len=40, seed=seed)
    q = unit_vectors(6, 32, 100, 64, dtype=dtype, seed=seed + 1)
    t = unit_vectors(32, 256, 64, dtype=dtype, seed=seed + 2)
    return q.to(device), t.to(device), positive_map.to(device), token_mask.to(device) if masked else None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_mdetr_shapes(dtype, masked):
    q, t, pm, mask = mdetr_sized(dtype, "cuda", masked)
    num_boxes = torch.tensor(150.0, device="cuda")
    q64, t64 = q.double().requires_grad_(), t.double().requires_grad_()
    ref = contrastive_align_loss_reference(q64, t64, pm, num_boxes, token_mask=mask)
    ref.sum().backward()
    qa, ta = q.clone().requires_grad_(), t.clone().requires_grad_()
    out = contrastive_align_loss(qa, ta, pm, num_boxes, token_mask=mask)  # auto: triton on CUDA
    out.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=LOSS_RTOL, atol=0)
    grad_tol = GRAD_RTOL if dtype == torch.float32 else 1e-2
    for got, want in ((qa.grad, q64.grad), (ta.grad, t64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=grad_tol, atol=grad_tol * want.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_launches_and_memory():
    from benchmarks._common import count_launches, peak_memory_mb

    q, t, pm, _ = mdetr_sized(torch.float32, "cuda", masked=False)
    q.requires_grad_()
    t.requires_grad_()
    grad_out = torch.ones(6, device="cuda")

    def step():
        out = contrastive_align_loss(q, t, pm, 150.0, backend="triton")
        return torch.autograd.grad(out, (q, t), grad_out)

    assert count_launches(step, torch.device("cuda")) <= 4
    # beyond the gradients themselves, at most one B x Q x L fp32 buffer
    grads_mb = (q.numel() + t.numel()) * 4 / 2**20
    assert peak_memory_mb(step, torch.device("cuda")) <= grads_mb + 32 * 100 * 256 * 4 / 2**20
