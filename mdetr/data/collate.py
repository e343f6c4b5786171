"""Batching: padded images with their mask, and dense padded targets the loss reads without Python loops.

``collate_fn(batch)`` takes a list of ``(image [3, H_i, W_i], target)`` from ``ModulatedDetection`` and returns:

=============== ================================ ===========================================================
key             type                             meaning
=============== ================================ ===========================================================
images          FloatTensor [B, 3, Hmax, Wmax]   zero-padded bottom/right
mask            BoolTensor [B, Hmax, Wmax]       True = padding
captions        list[str]
targets         list[dict]                       the per-sample target dicts, unchanged
boxes           FloatTensor [B, Tmax, 4]         cxcywh normalized; rows >= num_targets[b] are zeros
positive_map    BoolTensor [B, Tmax, C]          C = the dataset's max_tokens (256); padded rows False
num_targets     LongTensor [B]                   boxes per sample
answers         dict[str, Tensor [B]]            only for QA batches: answer_type and every answer_<head>
                                                 (-100 for a sample without a question)
=============== ================================ ===========================================================

Tmax = max(1, largest T): at least one (all-padding) row even when no sample has a box, so shapes never have a
zero dimension the loss and matcher would have to special-case.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor


def pad_images(images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """[C, H_i, W_i] images (or feature maps) -> (padded [B, C, Hmax, Wmax], mask [B, Hmax, Wmax] with True on
    padding), on the images' device."""
    h_max = max(im.shape[1] for im in images)
    w_max = max(im.shape[2] for im in images)
    padded = images[0].new_zeros(len(images), images[0].shape[0], h_max, w_max)
    mask = torch.ones(len(images), h_max, w_max, dtype=torch.bool, device=padded.device)
    for i, im in enumerate(images):
        padded[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return padded, mask


def pad_targets(targets: Sequence[dict]) -> Dict[str, Tensor]:
    """Dense ``boxes`` [B, Tmax, 4], ``positive_map`` [B, Tmax, C] and ``num_targets`` [B]."""
    num_targets = torch.tensor([len(t["boxes"]) for t in targets], dtype=torch.long)
    t_max = max(1, int(num_targets.max()))
    width = targets[0]["positive_map"].shape[1]
    boxes = torch.zeros(len(targets), t_max, 4)
    positive_map = torch.zeros(len(targets), t_max, width, dtype=torch.bool)
    for i, t in enumerate(targets):
        if t["positive_map"].shape[1] != width:
            raise ValueError(f"positive maps of one batch must share their width, got {width} and "
                             f"{t['positive_map'].shape[1]} (image_id {t.get('image_id')})")
        boxes[i, : len(t["boxes"])] = t["boxes"]
        positive_map[i, : len(t["boxes"])] = t["positive_map"].bool()
    return {"boxes": boxes, "positive_map": positive_map, "num_targets": num_targets}


def stack_answers(targets: Sequence[dict]) -> Dict[str, Tensor]:
    """{answer_type, answer_<head>...} stacked to [B]; every sample of a QA batch must carry them (an answer-less
    sample of a QA dataset carries -100s, see ``ModulatedDetection``)."""
    keys = sorted(k for k, v in targets[0].items() if k.startswith("answer_") and isinstance(v, Tensor))
    keys = ["answer_type"] + [k for k in keys if k != "answer_type"]
    for t in targets:
        if "answer_type" not in t:
            raise ValueError(f"a batch mixes samples with and without answers (image_id {t.get('image_id')} has none)")
    return {k: torch.stack([t[k] for t in targets]) for k in keys}


def collate_fn(batch: List[Tuple[Tensor, dict]]) -> dict:
    images, targets = zip(*batch)
    padded, mask = pad_images(images)
    out = {"images": padded, "mask": mask, "captions": [t["caption"] for t in targets], "targets": list(targets)}
    out.update(pad_targets(targets))
    if any("answer_type" in t for t in targets):
        out["answers"] = stack_answers(targets)
    return out
