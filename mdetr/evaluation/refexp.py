"""Referring-expression precision@k (RefCOCO/+/g protocol as the reference computes it).

For each expression the predicted boxes are ranked by score (1 - p(no-object)); the expression is a hit at k when
the best of the top-k boxes overlaps the single ground-truth box by at least 0.5. The reference measures the
overlap with **GIoU** (a quirk, the default here); ``use_giou=False`` gives the usual IoU.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor

from mdetr.boxes import elementwise_box_iou, elementwise_generalized_box_iou


class RefExpEvaluator:
    def __init__(self, ks: Sequence[int] = (1, 5, 10), threshold: float = 0.5, use_giou: bool = True):
        self.ks = tuple(ks)
        self.threshold = threshold
        self.use_giou = use_giou
        self.hits = torch.zeros(len(self.ks), dtype=torch.long)
        self.count = 0

    def update(self, pred_boxes: Tensor, scores: Tensor, gt_boxes: Tensor) -> None:
        """pred_boxes [B, Q, 4] xyxy, scores [B, Q], gt_boxes [B, 4] xyxy (same coordinate frame as the preds)."""
        if pred_boxes.dim() != 3 or gt_boxes.shape != (pred_boxes.shape[0], 4):
            raise ValueError(f"expected pred_boxes [B, Q, 4] and gt_boxes [B, 4], got {tuple(pred_boxes.shape)} "
                             f"and {tuple(gt_boxes.shape)}")
        kmax = min(max(self.ks), pred_boxes.shape[1])
        order = scores.topk(kmax, dim=1).indices  # [B, kmax]
        top = torch.gather(pred_boxes, 1, order.unsqueeze(-1).expand(-1, -1, 4)).float()
        overlap_fn = elementwise_generalized_box_iou if self.use_giou else elementwise_box_iou
        overlap = overlap_fn(top, gt_boxes.float()[:, None, :])  # [B, kmax]
        hit = overlap >= self.threshold
        for i, k in enumerate(self.ks):
            self.hits[i] += hit[:, : min(k, kmax)].any(1).sum().cpu()
        self.count += pred_boxes.shape[0]

    def summarize(self) -> Dict[str, float]:
        return {f"precision@{k}": (self.hits[i].item() / max(self.count, 1)) for i, k in enumerate(self.ks)}
