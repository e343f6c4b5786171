"""detr_kernels.soft_token: the fused Triton kernel (interpreted on CPU) against a float64 reference, the
reference against hand-computed numbers and gradcheck, MDETR's awkward targets, and the argument errors."""
import math

import pytest
import torch
from test_contrastive import random_targets

from detr_kernels._backend import resolve
from detr_kernels.soft_token import soft_token_loss, soft_token_loss_reference

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def random_logits(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def targets(n_layers, batch, queries, classes, seed=0, **kw):
    """positive_map (N, B, Q, C) over the token slots 0..C-2, matched (N, B, Q)."""
    positive_map, matched, _ = random_targets(n_layers, batch, queries, classes, max_len=classes - 1, seed=seed, **kw)
    return positive_map, matched


def check_against_reference(logits, positive_map, matched, num_boxes=3.0, eos_coef=0.1):
    """Triton loss and gradient (fp32 logits) against the float64 reference, with a random grad_output."""
    x64 = logits.double().requires_grad_()
    ref = soft_token_loss_reference(x64, positive_map, matched, num_boxes, eos_coef)
    grad_out = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    ref.backward(grad_out)
    x = logits.float().requires_grad_()
    out = soft_token_loss(x, positive_map, matched, num_boxes, eos_coef, backend="triton")
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), rtol=LOSS_RTOL, atol=LOSS_RTOL / num_boxes)
    out.backward(grad_out.float())
    scale = max(x64.grad.abs().max().item(), 1e-12)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale)
    return out


# ------------------------------------------------------------------------------------------------ reference
def test_reference_hand_example():
    """B=1, Q=2, C=3: query 0 matched to a box covering slots 0 and 1 (target mass 2, MDETR's unnormalized
    binary row), query 1 unmatched (targets the no-object slot 2 with weight eos_coef)."""
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]]], dtype=torch.float64)
    positive_map = torch.tensor([[[True, True, False], [True, False, False]]])  # row 1 is ignored: unmatched
    matched = torch.tensor([[True, False]])
    z0 = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.0))
    z1 = math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(1.5))
    q0 = -((1.0 - z0) + (2.0 - z0))
    q1 = -(1.5 - z1)
    want = (1.0 * q0 + 0.25 * q1) / 2.0
    got = soft_token_loss_reference(logits, positive_map, matched, 2.0, eos_coef=0.25)
    assert got.shape == () and math.isclose(got.item(), want, rel_tol=1e-12)


def test_reference_gradcheck():
    positive_map, matched = targets(2, 2, 4, 6, seed=3)
    x = random_logits(2, 2, 4, 6, dtype=torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: soft_token_loss_reference(a, positive_map, matched, 2.0, 0.1), (x,))


def test_auto_is_reference_on_cpu():
    assert resolve("soft_token", "auto", "cpu") == "reference"
    positive_map, matched = targets(1, 2, 4, 6)
    x = random_logits(2, 4, 6)
    torch.testing.assert_close(
        soft_token_loss(x, positive_map[0], matched[0], 2.0),
        soft_token_loss_reference(x, positive_map[0], matched[0], 2.0), rtol=0, atol=0,
    )


# ------------------------------------------------------------------------------------------------ triton
@pytest.mark.parametrize(
    "n_layers,batch,queries,classes",
    [(None, 1, 1, 2), (None, 2, 5, 7), (3, 2, 5, 7), (2, 3, 11, 33), (2, 2, 13, 256)],
)
def test_triton_matches_reference(n_layers, batch, queries, classes):
    positive_map, matched = targets(n_layers or 1, batch, queries, classes, seed=queries + classes)
    lead = (n_layers,) if n_layers else ()
    logits = random_logits(*lead, batch, queries, classes, seed=2)
    if not n_layers:
        positive_map, matched = positive_map[0], matched[0]
    check_against_reference(logits, positive_map, matched, eos_coef=0.1)


@pytest.mark.parametrize("case", ["nothing_matched", "all_matched", "many_tokens", "empty_span", "eos_zero"])
def test_triton_awkward_targets(case):
    N, B, Q, C = 2, 2, 6, 9
    positive_map, matched = targets(N, B, Q, C, seed=4)
    eos_coef = 0.1
    if case == "nothing_matched":
        matched[0] = False
    elif case == "all_matched":
        matched[:] = True
    elif case == "many_tokens":  # one box spans the whole caption: target mass C - 1
        matched[:, 0, 1] = True
        positive_map[:, 0, 1, :-1] = True
    elif case == "empty_span":  # matched, but no token: zero target, zero loss for that query
        positive_map, matched = targets(N, B, Q, C, empty_span_p=0.5, seed=5)
    else:
        eos_coef = 0.0
    check_against_reference(random_logits(N, B, Q, C, seed=6), positive_map, matched, eos_coef=eos_coef)


def test_layers_at_once_equal_per_layer_calls():
    N, B, Q, C = 3, 2, 5, 10
    positive_map, matched = targets(N, B, Q, C, seed=7)
    logits = random_logits(N, B, Q, C, seed=8).requires_grad_()
    all_layers = soft_token_loss(logits, positive_map, matched, 4.0, backend="triton")
    (g_all,) = torch.autograd.grad(all_layers.sum(), logits)
    per_layer = torch.stack([
        soft_token_loss(logits[n], positive_map[n], matched[n], 4.0, backend="triton") for n in range(N)
    ])
    (g_per,) = torch.autograd.grad(per_layer.sum(), logits)
    torch.testing.assert_close(all_layers, per_layer, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_all, g_per, rtol=1e-6, atol=1e-7)


def test_num_boxes_tensor_and_non_contiguous_logits():
    positive_map, matched = targets(2, 2, 5, 8, seed=9)
    logits = random_logits(2, 2, 8, 5, seed=10).transpose(-1, -2)  # (N, B, Q=5, C=8), strided
    base = soft_token_loss_reference(logits, positive_map, matched, 2.0)
    for num_boxes in (2.0, torch.tensor(2.0), torch.tensor([2.0])):
        got = soft_token_loss(logits, positive_map, matched, num_boxes, backend="triton")
        torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-6)


def test_single_backward_pass():
    positive_map, matched = targets(1, 1, 3, 4, seed=11)
    logits = random_logits(1, 1, 3, 4).requires_grad_()
    out = soft_token_loss(logits, positive_map, matched, 1.0, backend="triton").sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward pass"):
        out.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_half_inputs_compute_in_fp32(dtype, backend):
    positive_map, matched = targets(2, 2, 5, 12, seed=12)
    logits = random_logits(2, 2, 5, 12, dtype=dtype, seed=13).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_token_loss(logits, positive_map, matched, 3.0, backend=backend)
    want = soft_token_loss_reference(logits.detach().double(), positive_map, matched, 3.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad.float()).all()


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "override,error,match",
    [
        (dict(logits=torch.randn(3, 4)), ValueError, "logits must have 3 or 4 dimensions"),
        (dict(logits=torch.randn(2, 3, 4).long()), TypeError, "logits must be a floating-point tensor"),
        (dict(logits=torch.randn(2, 3, 1)), ValueError, "logits must have C >= 2"),
        (dict(positive_map=torch.zeros(2, 3, 4)), TypeError, "positive_map must be a bool tensor"),
        (dict(positive_map=torch.zeros(2, 3, 5, dtype=torch.bool)), ValueError,
         r"positive_map must have shape \(2, 3, 4\), got \(2, 3, 5\)"),
        (dict(matched=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "matched must be a bool tensor"),
        (dict(matched=torch.zeros(2, 4, dtype=torch.bool)), ValueError, r"matched must have shape \(2, 3\)"),
        (dict(eos_coef=-0.1), ValueError, "eos_coef must be >= 0"),
        (dict(num_boxes=torch.ones(3)), ValueError, "num_boxes must be a number or a one-element tensor"),
        (dict(backend="sdpa"), ValueError, "backend for soft_token must be"),
    ],
)
def test_bad_inputs(override, error, match):
    args = dict(logits=torch.randn(2, 3, 4), positive_map=torch.zeros(2, 3, 4, dtype=torch.bool),
                matched=torch.zeros(2, 3, dtype=torch.bool), num_boxes=1.0)
    args.update(override)
    with pytest.raises(error, match=match):
        soft_token_loss(**args)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_mdetr_shapes(dtype):
    """6 layers x B=32 x Q=100 x C=256, like MDETR's training batch; auto picks triton on CUDA."""
    positive_map, matched = targets(6, 32, 100, 256, max_boxes=8, seed=14)
    positive_map, matched = positive_map.cuda(), matched.cuda()
    logits = random_logits(6, 32, 100, 256, dtype=dtype, seed=15).cuda()
    num_boxes = torch.tensor(150.0, device="cuda")
    x64 = logits.double().requires_grad_()
    ref = soft_token_loss_reference(x64, positive_map, matched, num_boxes)
    ref.sum().backward()
    x = logits.clone().requires_grad_()
    out = soft_token_loss(x, positive_map, matched, num_boxes)
    out.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=LOSS_RTOL, atol=0)
    grad_tol = GRAD_RTOL if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=grad_tol, atol=grad_tol * x64.grad.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_launches():
    from benchmarks._common import count_launches

    positive_map, matched = targets(6, 32, 100, 256, seed=16)
    logits = random_logits(6, 32, 100, 256, seed=17).cuda().requires_grad_()
    pm, mt, grad_out = positive_map.cuda(), matched.cuda(), torch.ones(6, device="cuda")

    def step():
        return torch.autograd.grad(soft_token_loss(logits, pm, mt, 150.0, backend="triton"), logits, grad_out)

    assert count_launches(step, torch.device("cuda")) <= 4
