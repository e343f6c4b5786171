"""Question-answering losses and accuracy with MDETR's split answer heads (CLEVR and GQA).

The model predicts the answer type, and for each type an answer from that type's head. The loss is the type
cross-entropy plus, per type, the head's loss averaged over the samples of that type. A prediction is right when
both the type and the answer of the predicted type's head are right.

The collated batch carries ``answers``: a dict of [B] tensors, ``answer_type`` and ``answer_<head>`` per head
(values of heads that do not apply to a sample are ignored). A sample whose ``answer_type`` is -100 has no
question (e.g. a grounding sentence mixed into QA training): every QA loss ignores it.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# (head name, loss kind) in answer-type order: type i is answered by HEADS[dataset][i]
HEADS: Dict[str, List[Tuple[str, str]]] = {
    "clevr": [("binary", "bce"), ("attr", "ce"), ("reg", "ce")],
    "gqa": [("obj", "ce"), ("attr", "ce"), ("rel", "ce"), ("global", "ce"), ("cat", "ce")],
}


def _check(dataset: str) -> List[Tuple[str, str]]:
    if dataset not in HEADS:
        raise ValueError(f"qa_dataset must be one of {sorted(HEADS)}, got {dataset!r}")
    return HEADS[dataset]


def qa_losses(outputs: Dict[str, Tensor], batch: Dict[str, object], dataset: str) -> Dict[str, Tensor]:
    heads = _check(dataset)
    if "answers" not in batch:
        raise ValueError(f"the model has {dataset} QA heads but the batch holds no 'answers' (a QA annotation file?)")
    answers: Dict[str, Tensor] = batch["answers"]
    answer_type = answers["answer_type"]
    asked = answer_type >= 0  # -100: no question
    type_loss = F.cross_entropy(outputs["pred_answer_type"].float(), answer_type.clamp(min=0), reduction="none")
    losses = {"loss_answer_type": type_loss.where(asked, 0.0).sum() / asked.sum().clamp(min=1)}
    for type_index, (head, kind) in enumerate(heads):
        is_type = answer_type == type_index
        pred = outputs[f"pred_answer_{head}"].float()
        target = answers[f"answer_{head}"]
        if kind == "bce":
            per_sample = F.binary_cross_entropy_with_logits(pred.reshape(-1), target.float(), reduction="none")
        else:
            per_sample = F.cross_entropy(pred, target.clamp(min=0), reduction="none")
        norm = is_type.sum().clamp(min=1)
        losses[f"loss_answer_{head}"] = (per_sample * is_type).sum() / norm
    return losses


def qa_correct(outputs: Dict[str, Tensor], answers: Dict[str, Tensor], dataset: str) -> Dict[str, Tensor]:
    """Per-sample bool tensors: ``type`` (type right) and ``answer`` (type and its head's answer right)."""
    heads = _check(dataset)
    pred_type = outputs["pred_answer_type"].argmax(-1)
    answer_type = answers["answer_type"]
    right = torch.zeros_like(answer_type, dtype=torch.bool)
    for type_index, (head, kind) in enumerate(heads):
        pred = outputs[f"pred_answer_{head}"]
        guess = (pred.reshape(-1) > 0).long() if kind == "bce" else pred.argmax(-1)
        right |= (answer_type == type_index) & (guess == answers[f"answer_{head}"].long())
    type_right = pred_type == answer_type
    return {"type": type_right, "answer": type_right & right}
