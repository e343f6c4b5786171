"""Turning model outputs into scored boxes: per query (PostProcess) and per phrase (phrase grounding)."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from mdetr.boxes import box_cxcywh_to_xyxy
from mdetr.evaluation.grounding import PHRASE_SCORES


def scale_boxes(pred_boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """pred_boxes [B, Q, 4] normalized cxcywh, target_sizes [B, 2] (height, width) -> [B, Q, 4] absolute xyxy."""
    img_h, img_w = target_sizes.unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(pred_boxes.dtype)
    return box_cxcywh_to_xyxy(pred_boxes) * scale[:, None, :]


class PostProcess(nn.Module):
    """outputs, target_sizes [B, 2] (h, w of the original images) -> one dict per image: ``scores`` [Q]
    = 1 - p(no-object), ``labels`` [Q] (all ones: MDETR has no classes), ``boxes`` [Q, 4] absolute xyxy,
    and ``scores_refexp`` [Q] = scores * sigmoid(pred_isfinal) when the model predicts it."""

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        logits = outputs["pred_logits"]
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be [{len(logits)}, 2] (h, w), got {tuple(target_sizes.shape)}")
        scores = 1 - logits.float().softmax(-1)[..., -1]
        boxes = scale_boxes(outputs["pred_boxes"].float(), target_sizes)
        results = [{"scores": s, "labels": torch.ones_like(s, dtype=torch.int64), "boxes": b}
                   for s, b in zip(scores, boxes)]
        if "pred_isfinal" in outputs:
            scores_refexp = scores * outputs["pred_isfinal"].float().sigmoid().view_as(scores)
            for result, refexp in zip(results, scores_refexp):
                result["scores_refexp"] = refexp
        return results


@torch.no_grad()
def phrase_scores(pred_logits: Tensor, phrase_token_mask: Tensor, reduce: str = "max") -> Tensor:
    """Score of every query for every phrase, from its token probabilities over the phrase's tokens.

    ``reduce="max"`` (MDETR's Flickr30k post-processing): the largest of them. ``"sum"`` (not in MDETR): their sum,
    the probability that the query refers to the phrase. The soft-token target spreads a box's mass evenly over its
    phrase's tokens, so under the max a query that puts its mass on one word the phrase shares with another ("red
    squares" / "blue square") outscores the query on the right object, which spreads it over all the words (the
    README measures the difference). pred_logits [Q, C] of one image, phrase_token_mask [P, C'] (C' <= C; nonzero =
    token in the phrase) -> [P, Q]. Phrases with no token score 0."""
    if reduce not in PHRASE_SCORES:
        raise ValueError(f"reduce must be one of {tuple(PHRASE_SCORES)}, got {reduce!r}")
    prob = pred_logits.float().softmax(-1)[:, : phrase_token_mask.shape[1]]  # [Q, C']
    positive = (phrase_token_mask > 1e-6).to(prob.dtype)
    if reduce == "sum":
        return positive @ prob.T  # [P, C'] @ [C', Q]
    return (positive[:, None, :] * prob[None]).amax(-1)  # [P, Q, C'] -> [P, Q]


@torch.no_grad()
def rank_boxes_per_phrase(outputs: Dict[str, Tensor], target_sizes: Tensor, phrase_token_masks: List[Tensor],
                          reduce: str = "max") -> List[List[Tensor]]:
    """Phrase grounding (Flickr30k protocol): for image b and phrase p, the image's boxes (absolute xyxy) sorted
    by ``phrase_scores`` (with ``reduce``) descending. phrase_token_masks: one [P_b, C'] mask per image -> [b][p] =
    [Q, 4]."""
    boxes = scale_boxes(outputs["pred_boxes"].float(), target_sizes)
    ranked = []
    for logits, image_boxes, mask in zip(outputs["pred_logits"], boxes, phrase_token_masks):
        order = phrase_scores(logits, mask, reduce).argsort(dim=-1, descending=True)  # [P, Q]
        ranked.append([image_boxes[o] for o in order])
    return ranked
