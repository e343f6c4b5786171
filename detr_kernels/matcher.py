"""Exact batched linear assignment and a DETR-compatible Hungarian matcher.

``linear_sum_assignment`` solves a batch of rectangular assignment problems in one call (compiled op from
``csrc/``: CPU parallel over problems, CUDA one block per problem, no host sync) and returns scipy's optimum.
``matching_cost`` builds DETR's / MDETR's matching cost for all decoder layers at once, each image against its
own targets only (softmax and class term in PyTorch, then L1, GIoU, weights and padding in one compiled pass).
``HungarianMatcher`` is a drop-in for facebookresearch/detr's matcher (same constructor,
``forward(outputs, targets)`` and return value) that also takes MDETR-style targets, and ``match_dense`` is its
sync-free form for training loops. ``HungarianMatcherReference`` is DETR's matcher as written (cross-batch cost
matrix, ``.cpu()``, scipy per image): the oracle of the tests and the baseline of the benchmarks.

Backends (the ``backend=`` argument, resolved by ``detr_kernels._backend``): "cuda" and "cpp" run the
compiled ops (``detr_kernels._ext`` loads setup.py's build or JIT-compiles ``csrc/``); "scipy" is the reference
path (pure-PyTorch cost, scipy per problem), which "auto" picks when no compiled op is available.

Converting an assignment row to scipy's ``(row_ind, col_ind)`` (``assignment_to_pairs`` does this)::

    a = linear_sum_assignment(cost)[p]          # [M]: the row of each column, -1 if none
    col_ind = (a >= 0).nonzero().squeeze(1)
    row_ind = a[col_ind]
    order = row_ind.argsort()
    row_ind, col_ind = row_ind[order], col_ind[order]   # == scipy.optimize.linear_sum_assignment(cost[p])

One-line swaps (after ``import detr_kernels.matcher``):

* facebookresearch/detr: ``models.matcher.HungarianMatcher = detr_kernels.matcher.HungarianMatcher`` before
  ``build_matcher(args)`` is called (or import it in ``models/matcher.py`` in place of the class).
* ashkamath/mdetr: the same line for its ``models.matcher``; its ``forward(outputs, targets, positive_map)``
  signature is accepted.
* Hugging Face transformers (DetrForObjectDetection and the other DETR losses):
  ``transformers.loss.loss_for_object_detection.HungarianMatcher = detr_kernels.matcher.transformers_matcher``
  (it reads ``outputs["logits"]`` and ``targets[i]["class_labels"]`` as transformers writes them).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detr_kernels._backend import resolve

__all__ = [
    "linear_sum_assignment",
    "linear_sum_assignment_reference",
    "assignment_to_pairs",
    "matching_cost",
    "HungarianMatcher",
    "HungarianMatcherReference",
    "transformers_matcher",
]

# Codes the compiled op writes over a whole problem instead of raising (so the CUDA kernel needs no sync).
_INVALID, _INFEASIBLE = -2, -3


# ----------------------------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------------------------
def _prepare(cost: Tensor, num_cols: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if cost.dim() != 3:
        raise ValueError(f"cost must be [P, N, M], got shape {tuple(cost.shape)}")
    if not (cost.is_floating_point() or cost.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                         torch.uint8, torch.bool)):
        raise TypeError(f"cost must be a real floating or integer tensor, got {cost.dtype}")
    if cost.dtype not in (torch.float32, torch.float64):
        # half precision is widened; integers go to float64, which holds them exactly up to 2**53
        cost = cost.to(torch.float32 if cost.is_floating_point() else torch.float64)
    P, _, M = cost.shape
    if num_cols is None:
        num_cols = torch.full((P,), M, dtype=torch.long, device=cost.device)
    else:
        if num_cols.shape != (P,):
            raise ValueError(f"num_cols must be [P] = [{P}], got shape {tuple(num_cols.shape)}")
        num_cols = num_cols.to(device=cost.device, dtype=torch.long)
    return cost, num_cols


def _raise_for_codes(assignment: Tensor) -> None:
    """Turn the op's per-problem error codes into an exception that names the first bad problem."""
    bad = (assignment <= _INVALID).any(dim=1)
    if not bool(bad.any()):
        return
    p = int(bad.nonzero()[0, 0])
    if bool((assignment[p] == _INVALID).any()):
        raise ValueError(f"linear_sum_assignment: cost of problem {p} contains NaN or -inf in its valid columns")
    raise ValueError(f"linear_sum_assignment: problem {p} is infeasible (no complete assignment of finite cost; "
                     f"+inf marks forbidden pairs)")


def linear_sum_assignment(cost: Tensor, num_cols: Optional[Tensor] = None, backend: str = "auto",
                          check: bool = True) -> Tensor:
    """Solve ``P`` rectangular linear assignment problems exactly (minimum total cost, as scipy).

    Args:
        cost: ``[P, N, M]`` costs (float32/float64; other real dtypes are converted), on CPU or CUDA.
            ``+inf`` marks a forbidden pair; NaN and ``-inf`` are rejected.
        num_cols: ``[P]`` int64, how many leading columns of each problem are valid (default ``M``). Problem ``p``
            is ``cost[p, :, :num_cols[p]]``; with ``N >= num_cols[p]`` (the DETR case) every valid column gets a
            row, otherwise every row gets a column.
        backend: ``"auto"``, ``"cuda"``, ``"cpp"`` or ``"scipy"`` (see ``detr_kernels._backend``).
        check: raise ``ValueError`` naming the problem when one has NaN/-inf or is infeasible. On CUDA this costs
            one host sync; with ``check=False`` such a problem's row holds -2 (NaN/-inf) or -3 (infeasible).

    Returns:
        ``[P, M]`` int64 on ``cost.device``: the row assigned to each column, -1 where none (or beyond
        ``num_cols``). ``assignment_to_pairs`` converts a row to scipy's ``(row_ind, col_ind)``.
    """
    cost, num_cols = _prepare(cost, num_cols)
    name = resolve("matcher", backend, cost.device)
    if name == "scipy":
        return linear_sum_assignment_reference(cost, num_cols)
    if name == "cpp" and cost.device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, cost is on {cost.device}")
    assignment = torch.ops.detr_kernels.linear_sum_assignment(cost, num_cols)
    if check:
        _raise_for_codes(assignment)
    return assignment


def linear_sum_assignment_reference(cost: Tensor, num_cols: Optional[Tensor] = None) -> Tensor:
    """``linear_sum_assignment`` computed by ``scipy.optimize.linear_sum_assignment``, one problem at a time."""
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    cost, num_cols = _prepare(cost, num_cols)
    P, _, M = cost.shape
    host = cost.detach().cpu().double().numpy()
    cols = num_cols.cpu().clamp(0, M).tolist()
    out = torch.full((P, M), -1, dtype=torch.long)
    for p in range(P):
        try:
            rows, chosen = scipy_lsa(host[p, :, : cols[p]])
        except ValueError as err:
            raise ValueError(f"linear_sum_assignment: problem {p}: {err}") from err
        out[p, torch.from_numpy(chosen)] = torch.from_numpy(rows)
    return out.to(cost.device)


def assignment_to_pairs(assignment: Tensor) -> Tuple[Tensor, Tensor]:
    """One problem's assignment ``[M]`` -> scipy's ``(row_ind, col_ind)``, int64, sorted by row."""
    col_ind = (assignment >= 0).nonzero().squeeze(1)
    row_ind = assignment[col_ind]
    order = row_ind.argsort()
    return row_ind[order], col_ind[order]


# ----------------------------------------------------------------------------------------------------------------
# Matching cost
# ----------------------------------------------------------------------------------------------------------------
def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def pairwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of every pair: ``boxes1 [..., Q, 4]`` x ``boxes2 [..., T, 4]`` (xyxy) -> ``[..., Q, T]``.

    Leading dims broadcast. The arithmetic is DETR's ``generalized_box_iou`` operation for operation (so costs
    agree to the bit), written per coordinate so every op runs on a contiguous ``[..., Q, T]`` plane.
    """
    x0, y0, x1, y1 = (c.unsqueeze(-1) for c in boxes1.unbind(-1))  # [..., Q, 1]
    u0, v0, u1, v1 = (c.unsqueeze(-2) for c in boxes2.unbind(-1))  # [..., 1, T]
    area1, area2 = (x1 - x0) * (y1 - y0), (u1 - u0) * (v1 - v0)
    inter = (torch.minimum(x1, u1) - torch.maximum(x0, u0)).clamp_(min=0)  # [..., Q, T]
    inter.mul_((torch.minimum(y1, v1) - torch.maximum(y0, v0)).clamp_(min=0))
    union = (area1 + area2).sub_(inter)
    iou = inter.div_(union)
    area_c = (torch.maximum(x1, u1) - torch.minimum(x0, u0)).clamp_(min=0)
    area_c.mul_((torch.maximum(y1, v1) - torch.minimum(y0, v0)).clamp_(min=0))
    return iou.sub_((area_c - union).div_(area_c))


@functools.lru_cache(maxsize=None)
def _fused_cost_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("detr_kernels::matching_cost_boxes", dispatch_key)


def _fused_cost_available(backend: str, device: torch.device) -> bool:
    """The compiled cost op runs for this backend and device (``resolve`` has loaded the library by now)."""
    if (backend, device.type) not in (("cpp", "cpu"), ("cuda", "cuda")):
        return False
    return _fused_cost_kernel("CUDA" if device.type == "cuda" else "CPU")


def matching_cost(pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: Tensor, num_targets: Tensor, *,
                  positive_map: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                  cost_class: float = 1.0, cost_bbox: float = 1.0, cost_giou: float = 1.0,
                  backend: str = "auto") -> Tensor:
    """DETR/MDETR matching cost of every query against its own image's targets, for any leading dims.

    Args:
        pred_logits: ``[..., B, Q, C]`` class (DETR) or token (MDETR, C = 256) logits; ``...`` e.g. decoder layers.
        pred_boxes: ``[..., B, Q, 4]`` predicted boxes, normalized cxcywh.
        tgt_boxes: ``[B, T, 4]`` target boxes, cxcywh, padded to ``T`` per image.
        num_targets: ``[B]`` int, valid targets per image.
        positive_map: ``[B, T, C]`` (bool or float), MDETR's class cost ``-(softmax(logits) @ positive_map^T)``.
        labels: ``[B, T]`` int, DETR's class cost ``-softmax(logits)[labels]``. Exactly one of the two.
        cost_class, cost_bbox, cost_giou: weights of the class, L1 (cxcywh) and -GIoU terms.
        backend: as the solver's. With the compiled op ("cpp", "cuda"), the box terms, weights and padding are one
            fused pass (``detr_kernels::matching_cost_boxes``); "scipy" keeps the pure-PyTorch formula.

    Returns:
        ``[..., B, Q, T]`` float32 cost; padded target columns are 0.
    """
    if (positive_map is None) == (labels is None):
        raise ValueError("matching_cost needs exactly one of positive_map (MDETR) or labels (DETR)")
    if pred_logits.shape[:-1] != pred_boxes.shape[:-1] or pred_boxes.shape[-1] != 4:
        raise ValueError(f"pred_logits [..., B, Q, C] and pred_boxes [..., B, Q, 4] disagree: "
                         f"{tuple(pred_logits.shape)} vs {tuple(pred_boxes.shape)}")
    if tgt_boxes.dim() != 3 or tgt_boxes.shape[0] != pred_boxes.shape[-3] or tgt_boxes.shape[-1] != 4:
        raise ValueError(f"tgt_boxes must be [B, T, 4] with B = {pred_boxes.shape[-3]}, got {tuple(tgt_boxes.shape)}")
    B, T = tgt_boxes.shape[:2]
    prob = pred_logits.float().softmax(-1)  # [..., B, Q, C]
    if positive_map is not None:
        if positive_map.shape != (B, T, prob.shape[-1]):
            raise ValueError(f"positive_map must be [B, T, C] = {(B, T, prob.shape[-1])}, "
                             f"got {tuple(positive_map.shape)}")
        class_cost = -(prob @ positive_map.to(prob.dtype).transpose(-1, -2))  # [..., B, Q, T]
    else:
        if labels.shape != (B, T):
            raise ValueError(f"labels must be [B, T] = {(B, T)}, got {tuple(labels.shape)}")
        index = labels.long().clamp(0, prob.shape[-1] - 1).unsqueeze(-2)  # [B, 1, T]; padding -> any class
        class_cost = -prob.gather(-1, index.expand(*prob.shape[:-1], T))
    out_boxes = pred_boxes.float()
    tgt = tgt_boxes.float().to(out_boxes.device)
    if _fused_cost_available(resolve("matcher", backend, out_boxes.device), out_boxes.device):
        lead, Q = class_cost.shape[:-3], class_cost.shape[-2]
        layers = math.prod(lead)
        cost = torch.ops.detr_kernels.matching_cost_boxes(
            class_cost.reshape(layers, B, Q, T).contiguous(), out_boxes.reshape(layers, B, Q, 4).contiguous(),
            tgt.contiguous(), num_targets.to(device=out_boxes.device, dtype=torch.long),
            float(cost_class), float(cost_bbox), float(cost_giou))
        return cost.reshape(*lead, B, Q, T)
    bbox_cost = torch.cdist(out_boxes, tgt.expand(*out_boxes.shape[:-2], T, 4), p=1)
    giou_cost = -pairwise_generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt))
    cost = (cost_bbox * bbox_cost).add_(cost_class * class_cost).add_(cost_giou * giou_cost)
    valid = torch.arange(T, device=cost.device) < num_targets.to(cost.device).unsqueeze(-1)  # [B, T]
    return torch.where(valid.unsqueeze(-2), cost, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# The matcher module
# ----------------------------------------------------------------------------------------------------------------
def _pad(rows: Sequence[Tensor], width: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Stack per-image ``[T_i, *width]`` tensors into ``[B, max T_i, *width]`` (zeros as padding)."""
    longest = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), longest, *width, dtype=dtype, device=device)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def _targets_to_dense(targets: List[Dict[str, Tensor]], positive_map: Optional[Tensor], num_classes: int,
                      device: torch.device) -> Dict[str, Tensor]:
    """DETR / MDETR / transformers target dicts -> padded ``tgt_boxes``, ``num_targets`` and the class input."""
    sizes = [len(t["boxes"]) for t in targets]
    dense = {
        "tgt_boxes": _pad([t["boxes"] for t in targets], (4,), torch.float32, device),
        "num_targets": torch.tensor(sizes, dtype=torch.long, device=device),
    }
    if positive_map is not None:  # MDETR's forward(outputs, targets, positive_map): [sum T, C]
        maps = positive_map.split(sizes)
        dense["positive_map"] = _pad(maps, (positive_map.shape[-1],), torch.float32, device)
    elif targets and "positive_map" in targets[0]:
        dense["positive_map"] = _pad([t["positive_map"] for t in targets], (num_classes,), torch.float32, device)
    else:
        key = "labels" if not targets or "labels" in targets[0] else "class_labels"
        dense["labels"] = _pad([t[key] for t in targets], (), torch.long, device)
    return dense


class HungarianMatcher(nn.Module):
    """Drop-in for DETR's ``HungarianMatcher``: one batched exact assignment per call, every image at once.

    ``forward(outputs, targets)`` takes DETR's ``outputs`` (``pred_logits`` [B, Q, C] or transformers'
    ``logits``, ``pred_boxes`` [B, Q, 4]) and per-image ``targets`` with ``boxes`` [T_i, 4] and either ``labels``
    / ``class_labels`` [T_i] (DETR) or ``positive_map`` [T_i, C] (MDETR; or MDETR's third argument
    ``positive_map`` [sum T_i, C]). It returns DETR's list of ``(index_i, index_j)`` int64 CPU tensors, index_i
    (queries) ascending.

    ``match_dense`` is the training-loop form: all decoder layers in one solver call, no host sync on CUDA.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1, backend: str = "auto"):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.backend = backend

    @torch.no_grad()
    def match_dense(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: Tensor, num_targets: Tensor,
                    positive_map: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                    check: Optional[bool] = None) -> Tensor:
        """Index of the query matched to each target, for every leading (decoder layer) dim at once.

        Args: as ``matching_cost`` (``pred_logits [..., B, Q, C]``, ``tgt_boxes [B, T, 4]``, ``num_targets [B]``,
            one of ``positive_map [B, T, C]`` / ``labels [B, T]``). ``check``: raise on NaN/infeasible costs
            (default: on CPU only, where it is free; on CUDA an unchecked bad problem comes back all -1).

        Returns:
            ``[..., B, T]`` int64 on the predictions' device: the matched query, -1 for padded targets (and for
            targets left over when an image has more targets than queries).
        """
        device = pred_boxes.device
        lead, (Q, T) = pred_boxes.shape[:-2], (pred_boxes.shape[-2], tgt_boxes.shape[1])
        if T == 0:
            return torch.full((*lead, 0), -1, dtype=torch.long, device=device)
        cost = matching_cost(pred_logits, pred_boxes, tgt_boxes, num_targets, positive_map=positive_map,
                             labels=labels, cost_class=self.cost_class, cost_bbox=self.cost_bbox,
                             cost_giou=self.cost_giou, backend=self.backend)
        problems = math.prod(lead)
        cols = num_targets.to(device=device, dtype=torch.long).expand(lead).reshape(problems)
        if check is None:
            check = device.type == "cpu"
        matched = linear_sum_assignment(cost.reshape(problems, Q, T), cols, backend=self.backend, check=check)
        return matched.clamp(min=-1).reshape(*lead, T)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]],
                positive_map: Optional[Tensor] = None) -> List[Tuple[Tensor, Tensor]]:
        logits = outputs["pred_logits"] if "pred_logits" in outputs else outputs["logits"]
        pred_boxes = outputs["pred_boxes"]
        dense = _targets_to_dense(targets, positive_map, logits.shape[-1], pred_boxes.device)
        matched = self.match_dense(logits, pred_boxes, **dense).cpu()  # [B, T]: the one host sync
        return [assignment_to_pairs(row[: len(t["boxes"])]) for row, t in zip(matched, targets)]

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"backend={self.backend!r}")


def transformers_matcher(class_cost: float = 1, bbox_cost: float = 1, giou_cost: float = 1) -> HungarianMatcher:
    """Constructor with transformers' argument names, for ``loss_for_object_detection.HungarianMatcher``."""
    return HungarianMatcher(cost_class=class_cost, cost_bbox=bbox_cost, cost_giou=giou_cost)


class HungarianMatcherReference(nn.Module):
    """DETR's matcher as written: one [B*Q, sum T] cost over the whole batch, moved to CPU, scipy per image.

    Same interface and targets as ``HungarianMatcher.forward`` (DETR ``labels``, or MDETR ``positive_map``).
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]],
                positive_map: Optional[Tensor] = None) -> List[Tuple[Tensor, Tensor]]:
        from scipy.optimize import linear_sum_assignment as scipy_lsa

        logits = outputs["pred_logits"] if "pred_logits" in outputs else outputs["logits"]
        bs, num_queries = logits.shape[:2]
        out_prob = logits.flatten(0, 1).float().softmax(-1)  # [B*Q, C]
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()  # [B*Q, 4]
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).float()  # [sum T, 4]
        if positive_map is None and targets and "positive_map" in targets[0]:
            positive_map = torch.cat([t["positive_map"] for t in targets])
        if positive_map is not None:
            cost_class = -(out_prob @ positive_map.float().t())
        else:
            key = "labels" if "labels" in targets[0] else "class_labels"
            cost_class = -out_prob[:, torch.cat([t[key] for t in targets])]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -pairwise_generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(bs, num_queries, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        indices = [scipy_lsa(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]
