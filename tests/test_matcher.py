"""Exactness of detr_kernels.matcher against scipy, brute force and DETR's matcher as written.

The compiled CPU op is built (or JIT-compiled) once per machine; the CUDA tests are marked ``gpu``.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment as scipy_lsa

from detr_kernels import _backend, _ext
from detr_kernels.matcher import (
    HungarianMatcher,
    HungarianMatcherReference,
    assignment_to_pairs,
    linear_sum_assignment,
    linear_sum_assignment_reference,
    matching_cost,
)

CPU_OK = _ext.status()[0]
needs_cpp = pytest.mark.skipif(not CPU_OK, reason=f"compiled op unavailable: {_ext.status()[2]}")
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not (CUDA and _ext.status()[1]), reason="needs CUDA and the compiled CUDA op")
BACKENDS = ["cpp", "scipy"]


# ------------------------------------------------------------------------------------------------ helpers
def total_cost(cost: torch.Tensor, assignment: torch.Tensor) -> np.ndarray:
    """[P] total cost of each problem's assignment (float64)."""
    c = cost.detach().double().cpu().numpy()
    a = assignment.cpu().numpy()
    out = np.zeros(len(c))
    for p in range(len(c)):
        cols = np.nonzero(a[p] >= 0)[0]
        out[p] = c[p, a[p, cols], cols].sum()
    return out


def scipy_totals(cost: torch.Tensor, num_cols: torch.Tensor | None = None) -> np.ndarray:
    c = cost.detach().double().cpu().numpy()
    cols = [c.shape[2]] * len(c) if num_cols is None else num_cols.tolist()
    return np.array([c[p, :, : cols[p]][scipy_lsa(c[p, :, : cols[p]])].sum() for p in range(len(c))])


def assert_optimal(cost, assignment, num_cols=None, unique=False):
    """Valid (one row per column at most, right count) and scipy's optimum; identical indices if ``unique``."""
    P, N, M = cost.shape
    cols = torch.full((P,), M) if num_cols is None else num_cols.cpu()
    a = assignment.cpu()
    assert a.shape == (P, M) and a.dtype == torch.long
    for p in range(P):
        k = int(cols[p])
        valid = a[p, :k]
        assert (a[p, k:] == -1).all(), f"problem {p}: columns beyond num_cols assigned"
        assigned = valid[valid >= 0]
        assert len(assigned) == min(N, k), f"problem {p}: {len(assigned)} pairs, expected {min(N, k)}"
        assert len(set(assigned.tolist())) == len(assigned), f"problem {p}: a row used twice"
    ours, ref = total_cost(cost, a), scipy_totals(cost, cols)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)
    if unique:
        torch.testing.assert_close(a, linear_sum_assignment_reference(cost.cpu(), cols), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ solver
@needs_cpp
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 100, 1), (12, 100, 50), (3, 100, 100), (4, 3, 10), (2, 113, 37)])
def test_random_costs_match_scipy(backend, dtype, shape):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    cost = torch.rand(shape, generator=g, dtype=dtype) * 10 - 3
    num_cols = torch.randint(0, shape[2] + 1, (shape[0],), generator=g)
    num_cols[0] = shape[2]
    out = linear_sum_assignment(cost, num_cols, backend=backend)
    assert_optimal(cost, out, num_cols, unique=True)


@needs_cpp
@pytest.mark.parametrize("shape", [(200, 7, 9), (200, 9, 7), (50, 30, 30), (20, 100, 40)])
def test_integer_costs_with_ties(shape):
    g = torch.Generator().manual_seed(1)
    cost = torch.randint(0, 3, shape, generator=g)
    out = linear_sum_assignment(cost, backend="cpp")
    assert_optimal(cost, out)
    # same algorithm, scan order and tie rule as scipy: identical indices even among equal optima
    assert torch.equal(out, linear_sum_assignment_reference(cost))


@needs_cpp
def test_non_contiguous_and_transposed_input():
    cost = torch.rand(6, 50, 100).transpose(1, 2)  # [6, 100, 50], column-major problems
    assert_optimal(cost, linear_sum_assignment(cost, backend="cpp"), unique=True)
    cost = torch.rand(10, 30, 40)[::2, :, ::2]
    assert_optimal(cost, linear_sum_assignment(cost, backend="cpp"), unique=True)


@needs_cpp
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_degenerate_sizes(backend):
    for shape in [(0, 5, 5), (3, 5, 0), (3, 0, 5)]:
        out = linear_sum_assignment(torch.rand(shape), backend=backend)
        assert out.shape == (shape[0], shape[2]) and (out == -1).all()
    cost = torch.rand(4, 100, 100)
    cols = torch.tensor([0, 1, 100, 0])
    assert_optimal(cost, linear_sum_assignment(cost, cols, backend=backend), cols, unique=True)


@needs_cpp
@pytest.mark.parametrize("scale", [1e-30, 1e-7, 1e7, 1e30])
def test_huge_and_tiny_magnitudes(scale):
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64):
        cost = torch.rand(8, 20, 12, generator=g, dtype=torch.float64).mul(scale).to(dtype)
        assert_optimal(cost, linear_sum_assignment(cost, backend="cpp"), unique=True)
    cost = torch.rand(8, 15, 15, generator=g, dtype=torch.float64) * 1e150
    assert_optimal(cost, linear_sum_assignment(cost, backend="cpp"), unique=True)


@needs_cpp
@pytest.mark.parametrize("shape", [(30, 8, 8), (30, 12, 6), (30, 6, 12)])
def test_inf_forbidden_pairs(shape):
    g = torch.Generator().manual_seed(3)
    P, N, M = shape
    cost = torch.rand(shape, generator=g, dtype=torch.float64)
    cost[torch.rand(shape, generator=g) < 0.4] = float("inf")
    for p in range(P):  # keep every problem feasible: a random complete matching stays finite
        rows, cols = torch.randperm(N, generator=g)[: min(N, M)], torch.randperm(M, generator=g)[: min(N, M)]
        cost[p, rows, cols] = torch.rand(len(rows), generator=g, dtype=torch.float64)
    out = linear_sum_assignment(cost, backend="cpp")
    assert_optimal(cost, out, unique=True)
    assert np.isfinite(total_cost(cost, out)).all()


@needs_cpp
@pytest.mark.parametrize("backend", BACKENDS)
def test_infeasible_names_the_problem(backend):
    cost = torch.rand(5, 4, 4)
    cost[3, :, 2] = float("inf")  # column 2 of problem 3 cannot be matched
    with pytest.raises(ValueError, match="problem 3.*infeasible"):
        linear_sum_assignment(cost, backend=backend)


@needs_cpp
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_nan_and_minus_inf_rejected_with_problem_index(backend, bad):
    cost = torch.rand(6, 5, 4)
    cost[4, 2, 1] = bad
    with pytest.raises(ValueError, match="problem 4"):
        linear_sum_assignment(cost, backend=backend)
    # outside the valid columns it is ignored, as scipy never sees it
    cols = torch.full((6,), 4)
    cols[4] = 1
    assert_optimal(cost, linear_sum_assignment(cost, cols, backend=backend), cols)


@needs_cpp
def test_unchecked_codes():
    cost = torch.rand(3, 4, 4)
    cost[1, 0, 0] = float("nan")
    cost[2, :, 0] = float("inf")
    out = linear_sum_assignment(cost, backend="cpp", check=False)
    assert (out[1] == -2).all() and (out[2] == -3).all() and (out[0] >= 0).all()


@needs_cpp
def test_brute_force_tiny():
    g = torch.Generator().manual_seed(4)
    for N, M in itertools.product(range(1, 6), range(1, 6)):
        cost = torch.randint(-5, 6, (4, N, M), generator=g).double()
        out = linear_sum_assignment(cost, backend="cpp")
        for p in range(4):
            c = cost[p].numpy()
            if N >= M:
                best = min(sum(c[r, j] for j, r in enumerate(rows)) for rows in itertools.permutations(range(N), M))
            else:
                best = min(sum(c[i, k] for i, k in enumerate(cols)) for cols in itertools.permutations(range(M), N))
            assert total_cost(cost[p : p + 1], out[p : p + 1])[0] == pytest.approx(best, abs=1e-9)


@needs_cpp
@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 4), N=st.integers(0, 12), M=st.integers(0, 12), seed=st.integers(0, 2**31 - 1),
       integer=st.booleans())
def test_property_matches_scipy(P, N, M, seed, integer):
    g = torch.Generator().manual_seed(seed)
    cost = torch.randint(0, 4, (P, N, M), generator=g).double() if integer else torch.randn(P, N, M, generator=g)
    num_cols = torch.randint(0, M + 1, (P,), generator=g)
    assert_optimal(cost, linear_sum_assignment(cost, num_cols, backend="cpp"), num_cols)


def test_assignment_to_pairs_is_scipys_format():
    cost = torch.rand(1, 7, 4, dtype=torch.float64)
    rows, cols = assignment_to_pairs(linear_sum_assignment_reference(cost)[0])
    ref_rows, ref_cols = scipy_lsa(cost[0].numpy())
    assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()


def test_argument_errors():
    with pytest.raises(ValueError, match=r"\[P, N, M\]"):
        linear_sum_assignment(torch.rand(3, 3), backend="scipy")
    with pytest.raises(ValueError, match="num_cols"):
        linear_sum_assignment(torch.rand(2, 3, 3), torch.tensor([1]), backend="scipy")
    with pytest.raises(_backend.BackendUnavailableError):
        linear_sum_assignment(torch.rand(2, 3, 3), backend="cuda")


def test_ext_status_never_raises():
    cpu_ok, cuda_ok, how = _ext.status()
    assert isinstance(cpu_ok, bool) and isinstance(cuda_ok, bool) and isinstance(how, str)
    assert "matcher" in _backend.describe("cpu")


def test_without_compiled_op_the_matcher_says_scipy():
    """No prebuilt module and JIT forbidden: status explains, auto picks scipy, an explicit 'cpp' is refused."""
    script = (
        "import torch\n"
        "from detr_kernels import _ext, _backend\n"
        "cpu_ok, cuda_ok, how = _ext.status()\n"
        "print(cpu_ok, '|', how)\n"
        "if not cpu_ok:\n"
        "    assert _backend.available('matcher', 'cpu') == ['scipy'], _backend.available('matcher', 'cpu')\n"
        "    try:\n"
        "        _backend.resolve('matcher', 'cpp', 'cpu')\n"
        "    except _backend.BackendUnavailableError as err:\n"
        "        assert 'DETR_KERNELS_NO_JIT' in str(err), err\n"
        "    else:\n"
        "        raise AssertionError('cpp resolved without the op')\n"
    )
    env = {**os.environ, "DETR_KERNELS_NO_JIT": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cpu_ok, how = done.stdout.strip().splitlines()[-1].split(" | ")
    assert cpu_ok == "True" and "prebuilt" in how or cpu_ok == "False" and "DETR_KERNELS_NO_JIT" in how


@needs_cpp
def test_opcheck_cpu_op():
    op = torch.ops.detr_kernels.linear_sum_assignment.default
    samples = [
        (torch.rand(4, 10, 6), torch.tensor([6, 3, 0, 6])),
        (torch.rand(3, 5, 8, dtype=torch.float64), torch.tensor([8, 8, 2])),
        (torch.rand(2, 6, 4, requires_grad=True), torch.tensor([4, 1])),
    ]
    for cost, cols in samples:
        torch.library.opcheck(op, (cost, cols))


@needs_cpp
def test_op_under_torch_compile():
    fn = torch.compile(lambda c, n: linear_sum_assignment(c, n, backend="cpp", check=False) + 0, fullgraph=True)
    cost, cols = torch.rand(3, 8, 5), torch.tensor([5, 2, 0])
    assert torch.equal(fn(cost, cols), linear_sum_assignment_reference(cost, cols))


# ------------------------------------------------------------------------------------------------ cost + matcher
def make_batch(B, Q, C, sizes, layers=(), seed=0, mdetr=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*layers, B, Q, C, generator=g)
    boxes = torch.cat([torch.rand(*layers, B, Q, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(*layers, B, Q, 2, generator=g) * 0.3 + 0.05], -1)
    targets = []
    for t in sizes:
        tgt = {"boxes": torch.cat([torch.rand(t, 2, generator=g) * 0.6 + 0.2,
                                   torch.rand(t, 2, generator=g) * 0.3 + 0.05], -1)}
        if mdetr:
            pm = torch.zeros(t, C, dtype=torch.bool)
            for i in range(t):
                start = int(torch.randint(0, C - 4, (1,), generator=g))
                pm[i, start : start + int(torch.randint(1, 4, (1,), generator=g))] = True
            tgt["positive_map"] = pm
        else:
            tgt["labels"] = torch.randint(0, C, (t,), generator=g)
        targets.append(tgt)
    return logits, boxes, targets


def assert_same_indices(ours, ref):
    assert len(ours) == len(ref)
    for (i, j), (ri, rj) in zip(ours, ref):
        assert i.dtype == j.dtype == torch.int64 and i.device.type == "cpu"
        assert i.tolist() == ri.tolist() and j.tolist() == rj.tolist()


@pytest.mark.parametrize("backend", ["auto", "scipy"])
@pytest.mark.parametrize("mdetr", [True, False])
@pytest.mark.parametrize("sizes", [[3, 0, 17, 1], [0, 0], [100, 5], [120, 2]])
def test_matcher_equals_detr_reference(backend, mdetr, sizes):
    C = 256 if mdetr else 92
    logits, boxes, targets = make_batch(len(sizes), 100, C, sizes, mdetr=mdetr, seed=sum(sizes))
    ours = HungarianMatcher(1, 5, 2, backend=backend)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    ref = HungarianMatcherReference(1, 5, 2)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert_same_indices(ours, ref)


def test_matcher_accepts_mdetr_and_transformers_conventions():
    logits, boxes, targets = make_batch(3, 50, 256, [4, 0, 9], seed=5)
    ref = HungarianMatcherReference(1, 5, 2)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    posmap = torch.cat([t.pop("positive_map") for t in targets])  # MDETR: forward(outputs, targets, positive_map)
    ours = HungarianMatcher(1, 5, 2)({"pred_logits": logits, "pred_boxes": boxes}, targets, posmap)
    assert_same_indices(ours, ref)
    logits, boxes, targets = make_batch(2, 30, 92, [3, 6], mdetr=False, seed=6)
    ref = HungarianMatcherReference(1, 5, 2)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    ours = HungarianMatcher(1, 5, 2)({"logits": logits, "pred_boxes": boxes}, hf_targets)
    assert_same_indices(ours, ref)


def _dense_inputs(targets, C):
    from detr_kernels.matcher import _targets_to_dense

    return _targets_to_dense(targets, None, C, torch.device("cpu"))


@pytest.mark.parametrize("sizes", [[5, 0, 50, 1, 23, 7], [0, 0, 0]])
def test_match_dense_all_layers_in_one_call(sizes):
    logits, boxes, targets = make_batch(len(sizes), 100, 256, sizes, layers=(6,), seed=7)
    dense = _dense_inputs(targets, 256)
    matcher = HungarianMatcher(1, 5, 2)
    matched = matcher.match_dense(logits, boxes, **dense)
    assert matched.shape == (6, len(sizes), max(sizes)) and matched.dtype == torch.long
    ref = HungarianMatcherReference(1, 5, 2)
    for layer in range(6):
        expected = ref({"pred_logits": logits[layer], "pred_boxes": boxes[layer]}, targets)
        for b, (i, j) in enumerate(expected):
            row = matched[layer, b]
            assert (row[sizes[b]:] == -1).all()
            assert row[j].tolist() == i.tolist()


def test_matching_cost_is_the_diagonal_of_detrs_cross_matrix():
    sizes = [3, 0, 7]
    logits, boxes, targets = make_batch(3, 20, 256, sizes, layers=(2,), seed=8)
    dense = _dense_inputs(targets, 256)
    cost = matching_cost(logits, boxes, **dense, cost_class=1, cost_bbox=5, cost_giou=2)
    assert cost.shape == (2, 3, 20, 7)
    offsets = np.cumsum([0] + sizes)
    for layer in range(2):
        # DETR's [B*Q, sum T] matrix, built the way HungarianMatcherReference does
        prob = logits[layer].flatten(0, 1).softmax(-1)
        pm = torch.cat([t["positive_map"] for t in targets]).float()
        out_b, tgt_b = boxes[layer].flatten(0, 1), torch.cat([t["boxes"] for t in targets])
        from detr_kernels.matcher import box_cxcywh_to_xyxy, pairwise_generalized_box_iou

        cross = (-(prob @ pm.t()) + 5 * torch.cdist(out_b, tgt_b, p=1)
                 - 2 * pairwise_generalized_box_iou(box_cxcywh_to_xyxy(out_b), box_cxcywh_to_xyxy(tgt_b)))
        cross = cross.view(3, 20, -1)
        for b in range(3):
            block = cross[b, :, offsets[b] : offsets[b + 1]]
            torch.testing.assert_close(cost[layer, b, :, : sizes[b]], block, rtol=1e-5, atol=1e-5)
            assert (cost[layer, b, :, sizes[b]:] == 0).all()


@needs_cpp
@pytest.mark.parametrize("mdetr", [True, False])
def test_fused_cost_equals_pytorch_formula(mdetr):
    sizes = [4, 0, 11, 1]
    C = 256 if mdetr else 92
    logits, boxes, targets = make_batch(4, 30, C, sizes, layers=(3,), seed=13, mdetr=mdetr)
    dense = _dense_inputs(targets, C)
    fused = matching_cost(logits, boxes, **dense, cost_class=1, cost_bbox=5, cost_giou=2, backend="cpp")
    plain = matching_cost(logits, boxes, **dense, cost_class=1, cost_bbox=5, cost_giou=2, backend="scipy")
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    # no leading dims, and the op through opcheck
    torch.testing.assert_close(matching_cost(logits[0], boxes[0], **dense, backend="cpp"),
                               matching_cost(logits[0], boxes[0], **dense, backend="scipy"), rtol=1e-6, atol=1e-6)
    op = torch.ops.detr_kernels.matching_cost_boxes.default
    torch.library.opcheck(op, (torch.randn(2, 4, 30, 11), boxes[:2].contiguous(), dense["tgt_boxes"],
                               dense["num_targets"], 1.0, 5.0, 2.0))


def test_matching_cost_argument_errors():
    logits, boxes, targets = make_batch(2, 10, 256, [2, 3], seed=9)
    dense = _dense_inputs(targets, 256)
    with pytest.raises(ValueError, match="exactly one"):
        matching_cost(logits, boxes, dense["tgt_boxes"], dense["num_targets"])
    with pytest.raises(ValueError, match="positive_map"):
        matching_cost(logits, boxes, dense["tgt_boxes"], dense["num_targets"],
                      positive_map=dense["positive_map"][:, :, :10])


# ------------------------------------------------------------------------------------------------ GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_op_matches_scipy_384_problems(dtype):
    g = torch.Generator().manual_seed(10)
    cost = torch.rand(384, 100, 50, generator=g, dtype=dtype)
    num_cols = torch.randint(0, 51, (384,), generator=g)
    out = linear_sum_assignment(cost.cuda(), num_cols.cuda(), backend="cuda")
    assert out.device.type == "cuda"
    assert_optimal(cost, out.cpu(), num_cols, unique=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(64, 7, 9), (64, 9, 7), (16, 100, 100), (8, 200, 150), (8, 300, 120),
                                   (4, 600, 700), (3, 40, 1500)])
def test_cuda_op_shapes_ties_and_layouts(shape):
    g = torch.Generator().manual_seed(11)
    cost = torch.randint(0, 3, shape, generator=g).float()
    num_cols = torch.randint(0, shape[2] + 1, (shape[0],), generator=g)
    assert_optimal(cost, linear_sum_assignment(cost.cuda(), num_cols.cuda(), backend="cuda"), num_cols)
    rand = torch.rand(shape, generator=g, dtype=torch.float64)
    assert_optimal(rand, linear_sum_assignment(rand.cuda(), backend="cuda"), unique=True)
    strided = rand.transpose(1, 2).cuda()  # the kernel reads strides; cost is [P, M, N] here
    assert_optimal(strided.cpu(), linear_sum_assignment(strided, backend="cuda"), unique=True)


@gpu
@needs_cuda
def test_cuda_op_codes_inf_and_nan():
    cost = torch.rand(5, 6, 4, device="cuda")
    cost[1, 2, 3] = float("nan")
    cost[3, :, 0] = float("inf")
    out = linear_sum_assignment(cost, backend="cuda", check=False)
    assert (out[1] == -2).all() and (out[3] == -3).all()
    with pytest.raises(ValueError, match="problem 1"):
        linear_sum_assignment(cost, backend="cuda")
    forbidden = torch.rand(32, 12, 12, dtype=torch.float64)
    mask = torch.rand(32, 12, 12) < 0.3
    mask[:, torch.arange(12), torch.arange(12)] = False
    forbidden[mask] = float("inf")
    assert_optimal(forbidden, linear_sum_assignment(forbidden.cuda(), backend="cuda"), unique=True)


@gpu
@needs_cuda
def test_cuda_fused_cost_equals_pytorch_formula():
    sizes = [4, 0, 50, 1, 17]
    logits, boxes, targets = make_batch(5, 100, 256, sizes, layers=(6,), seed=14)
    dense = {k: v.cuda() for k, v in _dense_inputs(targets, 256).items()}
    fused = matching_cost(logits.cuda(), boxes.cuda(), **dense, cost_bbox=5, cost_giou=2, backend="cuda")
    plain = matching_cost(logits.cuda(), boxes.cuda(), **dense, cost_bbox=5, cost_giou=2, backend="scipy")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    op = torch.ops.detr_kernels.matching_cost_boxes.default
    torch.library.opcheck(op, (torch.randn(6, 5, 100, 50, device="cuda"), boxes.cuda(), dense["tgt_boxes"],
                               dense["num_targets"], 1.0, 5.0, 2.0))


@gpu
@needs_cuda
def test_cuda_opcheck():
    op = torch.ops.detr_kernels.linear_sum_assignment.default
    torch.library.opcheck(op, (torch.rand(4, 10, 6, device="cuda"), torch.tensor([6, 3, 0, 6], device="cuda")))


@gpu
@needs_cuda
def test_match_dense_has_no_host_sync_and_matches_cpu():
    sizes = [int(s) for s in torch.randint(1, 51, (16,), generator=torch.Generator().manual_seed(12))]
    logits, boxes, targets = make_batch(16, 100, 256, sizes, layers=(6,), seed=12)
    dense = {k: v.cuda() for k, v in _dense_inputs(targets, 256).items()}
    matcher = HungarianMatcher(1, 5, 2)
    logits_d, boxes_d = logits.cuda(), boxes.cuda()
    matcher.match_dense(logits_d, boxes_d, **dense)  # warm-up (library loading may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        matched = matcher.match_dense(logits_d, boxes_d, **dense)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = matcher.match_dense(logits, boxes, **{k: v.cpu() for k, v in dense.items()}, check=True)
    mismatched = (matched.cpu() != expected).any(-1)
    # float32 costs on two devices may differ in the last bit; a differing image must then tie in total cost
    cost = matching_cost(logits, boxes, **{k: v.cpu() for k, v in dense.items()}, cost_bbox=5, cost_giou=2)
    for layer, b in mismatched.nonzero().tolist():
        t = sizes[b]
        c = cost[layer, b, :, :t].double()
        ours, ref = matched.cpu()[layer, b, :t], expected[layer, b, :t]
        assert float(c[ours, torch.arange(t)].sum()) == pytest.approx(float(c[ref, torch.arange(t)].sum()), rel=1e-5)
