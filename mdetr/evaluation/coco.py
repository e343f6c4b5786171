"""Class-agnostic COCO box AP through pycocotools, as the reference runs ``CocoEvaluator(useCats=False)`` on every
validation set.

Every sample (one image entry = an image and its caption, as MDETR's files hold them) is one COCO image; its
ground truth is the sample's annotated boxes (the boxes its caption refers to), all category 1; its detections
are every query's box, scored 1 - p(no-object) (``mdetr.models.PostProcess``). Ground-truth areas, which pick the
small / medium / large ranges, are the boxes' areas in pixels of the original image (the released files' ``area``
is sometimes a segmentation area; the difference only moves objects between ranges).

Metrics (pycocotools' 12 numbers): AP (IoU 0.50:0.95), AP50, AP75, APs, APm, APl, AR@1, AR@10, AR@100, ARs, ARm,
ARl; -1 where no ground truth falls in the area range (pycocotools' convention).

Ground truths and detections are kept as per-image tensors; ``synchronize()`` gathers every rank's to every rank.
pycocotools is imported on use (``pip install pycocotools``).
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from mdetr import distributed as dist_utils

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm", "ARl")


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:
        raise ImportError("COCO AP needs pycocotools, which is not installed: pip install pycocotools") from err
    return COCO, COCOeval


def _xywh(boxes: Tensor) -> List[List[float]]:
    """[N, 4] xyxy -> N COCO [x, y, w, h] lists."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


class CocoEvaluator:
    """Class-agnostic box AP / AR over the images given to ``update``."""

    def __init__(self):
        # image id -> ((h, w), gt boxes [T, 4] xyxy, detection boxes [Q, 4] xyxy, detection scores [Q]), CPU
        self.images: Dict[int, Tuple[Tuple[int, int], Tensor, Tensor, Tensor]] = {}

    def update(self, image_ids: Sequence[int], image_sizes: Tensor, results: Sequence[Dict[str, Tensor]],
               gt_boxes: Sequence[Tensor]) -> None:
        """B images. image_ids: B distinct ids (never seen before); image_sizes [B, 2] (h, w) of the original
        images; results: ``PostProcess`` output, per image ``scores`` [Q] and ``boxes`` [Q, 4] absolute xyxy;
        gt_boxes: per image [T_b, 4] absolute xyxy."""
        if not len(image_ids) == len(image_sizes) == len(results) == len(gt_boxes):
            raise ValueError(f"expected B of each, got {len(image_ids)} image_ids, {len(image_sizes)} image_sizes, "
                             f"{len(results)} results and {len(gt_boxes)} gt_boxes")
        for image_id, size, result, gt in zip(image_ids, image_sizes.tolist(), results, gt_boxes):
            image_id = int(image_id)
            if image_id in self.images:
                raise ValueError(f"image id {image_id} was already evaluated (ids must be unique per image entry)")
            self.images[image_id] = ((int(size[0]), int(size[1])), gt.detach().float().cpu().reshape(-1, 4),
                                     result["boxes"].detach().float().cpu(), result["scores"].detach().float().cpu())

    def synchronize(self) -> None:
        """Gather every rank's images onto every rank (a no-op in one process). Call once, on every rank."""
        merged: Dict[int, Tuple[Tuple[int, int], Tensor, Tensor, Tensor]] = {}
        for part in dist_utils.all_gather_objects(self.images):
            duplicated = merged.keys() & part.keys()
            if duplicated:
                raise ValueError(f"image ids {sorted(duplicated)[:5]} were evaluated on several ranks")
            merged.update(part)
        self.images = merged

    def _coco_objects(self, coco_cls):
        """(ground truth, detections) as pycocotools COCO objects built in memory (ids start at 1: COCOeval
        reads id 0 as "unmatched")."""
        images, gts, dets = [], [], []
        for image_id, ((h, w), gt, boxes, scores) in self.images.items():
            images.append({"id": image_id, "height": h, "width": w})
            for box in _xywh(gt):
                gts.append({"id": len(gts) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                            "area": box[2] * box[3], "iscrowd": 0})
            for box, score in zip(_xywh(boxes), scores.tolist()):
                dets.append({"id": len(dets) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                             "area": box[2] * box[3], "score": score, "iscrowd": 0})
        categories = [{"id": 1, "name": "object"}]
        coco_gt, coco_dt = coco_cls(), coco_cls()
        coco_gt.dataset = {"images": images, "annotations": gts, "categories": categories}
        coco_dt.dataset = {"images": images, "annotations": dets, "categories": categories}
        coco_gt.createIndex()
        coco_dt.createIndex()
        return coco_gt, coco_dt

    def summarize(self) -> Dict[str, float]:
        """The 12 metrics of ``METRICS`` ({} when no image was evaluated). pycocotools' printing is silenced."""
        if not self.images:
            return {}
        coco_cls, cocoeval_cls = _pycocotools()
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt, coco_dt = self._coco_objects(coco_cls)
            evaluation = cocoeval_cls(coco_gt, coco_dt, iouType="bbox")
            evaluation.params.useCats = 0
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return dict(zip(METRICS, (float(v) for v in evaluation.stats)))
