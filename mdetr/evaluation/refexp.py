"""Referring-expression precision@k (RefCOCO/+/g protocol as the reference computes it).

For each expression the predicted boxes are ranked by score (1 - p(no-object)); the expression is a hit at k when
the best of the top-k boxes overlaps the single ground-truth box by at least 0.5. The reference measures the
overlap with **GIoU** (a quirk, ``iou_type="giou"``, the default); ``iou_type="iou"`` gives the usual IoU, which
is never lower, so its precision is never lower either.

Counts (``hits``, ``count``) are kept rather than rates: in distributed runs every rank updates with its own
samples and ``synchronize()`` sums the counts over ranks once, before ``summarize()``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from mdetr import distributed as dist_utils
from mdetr.boxes import elementwise_box_iou, elementwise_generalized_box_iou

OVERLAPS = {"giou": elementwise_generalized_box_iou, "iou": elementwise_box_iou}


class RefExpEvaluator:
    """precision@k for k in ``ks``; ``iou_type`` "giou" (the reference) or "iou". ``use_giou`` is the older
    spelling of the same choice (True = "giou") and wins when given."""

    def __init__(self, ks: Sequence[int] = (1, 5, 10), threshold: float = 0.5, iou_type: str = "giou",
                 use_giou: Optional[bool] = None):
        if use_giou is not None:
            iou_type = "giou" if use_giou else "iou"
        if iou_type not in OVERLAPS:
            raise ValueError(f"iou_type must be one of {sorted(OVERLAPS)}, got {iou_type!r}")
        self.ks = tuple(ks)
        self.threshold = threshold
        self.iou_type = iou_type
        self.hits = torch.zeros(len(self.ks), dtype=torch.long)
        self.count = 0
        self.without_box = 0  # expressions whose box the transforms clipped away: counted, as misses

    @property
    def use_giou(self) -> bool:
        return self.iou_type == "giou"

    def update(self, pred_boxes: Tensor, scores: Tensor, gt_boxes: Tensor) -> None:
        """pred_boxes [B, Q, 4] xyxy, scores [B, Q], gt_boxes [B, 4] xyxy (same coordinate frame as the preds)."""
        if pred_boxes.dim() != 3 or gt_boxes.shape != (pred_boxes.shape[0], 4):
            raise ValueError(f"expected pred_boxes [B, Q, 4] and gt_boxes [B, 4], got {tuple(pred_boxes.shape)} "
                             f"and {tuple(gt_boxes.shape)}")
        kmax = min(max(self.ks), pred_boxes.shape[1])
        order = scores.topk(kmax, dim=1).indices  # [B, kmax]
        top = torch.gather(pred_boxes, 1, order.unsqueeze(-1).expand(-1, -1, 4)).float()
        overlap = OVERLAPS[self.iou_type](top, gt_boxes.float()[:, None, :])  # [B, kmax]
        hit = overlap >= self.threshold
        self.hits += torch.stack([hit[:, : min(k, kmax)].any(1).sum() for k in self.ks]).cpu()  # one host copy
        self.count += pred_boxes.shape[0]

    def add_misses(self, n: int) -> None:
        """``n`` expressions without a box to compare with (the image's crop or clip left none). The reference
        compares its predictions with the file's box whatever the image holds, and counts such an expression as a
        miss; so do we."""
        self.count += n
        self.without_box += n

    def synchronize(self) -> None:
        """Sum the counts over ranks (a no-op in one process). Call once, on every rank, after the last update."""
        total = dist_utils.all_reduce_sum(torch.cat([self.hits, torch.tensor([self.count, self.without_box])]))
        self.hits, self.count, self.without_box = total[:-2].clone(), int(total[-2]), int(total[-1])

    def summarize(self) -> Dict[str, float]:
        return {f"precision@{k}": (self.hits[i].item() / max(self.count, 1)) for i, k in enumerate(self.ks)}
