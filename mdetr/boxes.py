"""Box operations: the one home for conversions, areas, IoU and generalized IoU.

Formats: ``xyxy`` = (x0, y0, x1, y1); ``cxcywh`` = (centre x, centre y, width, height); ``xywh`` = COCO's
(x0, y0, width, height). All functions work on the last dimension and broadcast over the leading ones.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] COCO xywh -> [..., 4] xyxy."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...] area (negative extents count as 0)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """Broadcasting intersection and union areas of xyxy boxes."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter, union


def _enclosing_area(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    top_left = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    return (bottom_right - top_left).clamp(min=0).prod(-1)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matching pairs: [..., 4] xyxy and [..., 4] xyxy (broadcast) -> [...]."""
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of matching pairs: [..., 4] xyxy, [..., 4] xyxy -> [...]."""
    inter, union = _inter_union(boxes1, boxes2)
    enclosing = _enclosing_area(boxes1, boxes2)
    return inter / union - (enclosing - union) / enclosing


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU: [N, 4] xyxy, [M, 4] xyxy -> [N, M]."""
    return elementwise_box_iou(boxes1[:, None, :], boxes2[None, :, :])


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU: [N, 4] xyxy, [M, 4] xyxy -> [N, M], in [-1, 1].

    Boxes must be proper (x1 >= x0, y1 >= y0); this is not checked, to keep the call free of host syncs.
    """
    return elementwise_generalized_box_iou(boxes1[:, None, :], boxes2[None, :, :])
