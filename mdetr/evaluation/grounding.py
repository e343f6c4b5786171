"""Phrase grounding Recall@k (Flickr30k Entities protocol, as MDETR's flickr_eval computes it).

Every phrase of a sentence (an entry of ``tokens_positive_eval``) ranks all predicted boxes of its image by the
phrase score, the max over the phrase's tokens of the token probability (``mdetr.models.rank_boxes_per_phrase``;
``phrase_score="sum"``, not in MDETR, ranks by their sum; the evaluator only records which rule ranked the boxes).
The phrase is recalled at k when one of its top-k boxes has IoU >= 0.5 with

- ``any_box``: ANY ground-truth box of the phrase (the protocol of the paper's headline numbers), or
- ``merged_box``: the smallest box enclosing all of the phrase's ground-truth boxes (the MERGED-BOX protocol).

The two agree on phrases with one box. A phrase's ground-truth boxes are the annotations whose ``tokens_positive``
spans overlap the phrase's spans (``mdetr.data.annotations.phrase_box_map``); phrases without any box are left out,
as the reference leaves out phrases without boxes, and counted in ``skipped``.

Counts are kept (hits per k and protocol, phrases); ``synchronize()`` sums them over ranks.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor

from mdetr import distributed as dist_utils
from mdetr.boxes import box_iou, elementwise_box_iou

PROTOCOLS = ("any_box", "merged_box")
# how a query's score for a phrase comes from its token probabilities (mdetr.models.phrase_scores)
PHRASE_SCORES = {"max": "max over the phrase's tokens of the token probability (MDETR)",
                 "sum": "sum over the phrase's tokens of the token probability (not in MDETR)"}


def merge_boxes(boxes: Tensor, membership: Tensor) -> Tensor:
    """Per group, the smallest box enclosing its members. boxes [T, 4] xyxy, membership BoolTensor [P, T] (every
    row with at least one member) -> [P, 4] xyxy."""
    inf = torch.tensor(float("inf"), dtype=boxes.dtype, device=boxes.device)
    member = membership[:, :, None]  # [P, T, 1]
    top_left = torch.where(member, boxes[None, :, :2], inf).amin(1)  # [P, 2]
    bottom_right = torch.where(member, boxes[None, :, 2:], -inf).amax(1)  # [P, 2]
    return torch.cat([top_left, bottom_right], dim=1)


class PhraseGroundingEvaluator:
    """Recall@k for k in ``ks`` under both protocols (``PROTOCOLS``), IoU >= ``threshold``; ``phrase_score``: the
    rule that ranks each phrase's boxes before ``update`` ("max", MDETR's, or "sum"; see ``phrase_scores``)."""

    def __init__(self, ks: Sequence[int] = (1, 5, 10), threshold: float = 0.5, phrase_score: str = "max"):
        if phrase_score not in PHRASE_SCORES:
            raise ValueError(f"phrase_score must be one of {tuple(PHRASE_SCORES)}, got {phrase_score!r}")
        self.phrase_score = phrase_score
        self.ks = tuple(ks)
        self.threshold = threshold
        self.hits = torch.zeros(len(PROTOCOLS), len(self.ks), dtype=torch.long)
        self.count = 0  # phrases evaluated
        self.skipped = 0  # phrases without a ground-truth box

    def update(self, ranked_boxes: Tensor, gt_boxes: Tensor, phrase_box_map: Tensor) -> None:
        """One sentence. ranked_boxes [P, K, 4] xyxy: per phrase its predicted boxes, best first; gt_boxes [T, 4]
        xyxy (the same frame); phrase_box_map BoolTensor [P, T]: box t is a ground truth of phrase p."""
        num_phrases = phrase_box_map.shape[0]
        if ranked_boxes.dim() != 3 or ranked_boxes.shape[0] != num_phrases or ranked_boxes.shape[-1] != 4 \
                or gt_boxes.shape != (phrase_box_map.shape[1], 4):
            raise ValueError(f"expected ranked_boxes [P, K, 4], gt_boxes [T, 4] and phrase_box_map [P, T], got "
                             f"{tuple(ranked_boxes.shape)}, {tuple(gt_boxes.shape)} and {tuple(phrase_box_map.shape)}")
        membership = phrase_box_map.bool().to(ranked_boxes.device)
        with_box = membership.any(1)  # [P]
        self.skipped += int(num_phrases - with_box.sum())
        if not with_box.any():
            return
        membership = membership[with_box]
        kmax = min(max(self.ks), ranked_boxes.shape[1])
        top = ranked_boxes[with_box, :kmax].float()  # [P', kmax, 4]
        gt = gt_boxes.to(top)
        iou_any = box_iou(top.reshape(-1, 4), gt).view(*top.shape[:2], -1)  # [P', kmax, T]
        hit_any = ((iou_any >= self.threshold) & membership[:, None, :]).any(-1)  # [P', kmax]
        hit_merged = elementwise_box_iou(top, merge_boxes(gt, membership)[:, None, :]) >= self.threshold
        hits = [hit[:, : min(k, kmax)].any(1).sum() for hit in (hit_any, hit_merged) for k in self.ks]
        self.hits += torch.stack(hits).view_as(self.hits).cpu()  # one host copy per sentence
        self.count += len(top)

    def synchronize(self) -> None:
        """Sum the counts over ranks (a no-op in one process). Call once, on every rank, after the last update."""
        flat = torch.cat([self.hits.flatten(), torch.tensor([self.count, self.skipped])])
        total = dist_utils.all_reduce_sum(flat)
        self.hits = total[: self.hits.numel()].view_as(self.hits).clone()
        self.count, self.skipped = int(total[-2]), int(total[-1])

    def summarize(self) -> Dict[str, float]:
        """``any_box_recall@k`` and ``merged_box_recall@k`` for every k."""
        return {f"{protocol}_recall@{k}": self.hits[row, i].item() / max(self.count, 1)
                for row, protocol in enumerate(PROTOCOLS) for i, k in enumerate(self.ks)}
