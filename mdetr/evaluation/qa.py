"""Question-answering accuracy, overall and per answer type (CLEVR: binary / attribute / count; GQA: obj / attr /
rel / global / cat).

A question is answered right when the predicted answer type and the answer of that type's head are both right
(``mdetr.losses.qa.qa_correct``, the reference's rule); ``type accuracy`` counts the type alone. Per type, the
type is the ground truth's: a binary question answered with a count is a wrong binary answer.

Counts, not rates, are kept: a LongTensor [num_types, 3] of (questions, type right, answer right), summed over
ranks by ``synchronize()``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from mdetr import distributed as dist_utils
from mdetr.data.annotations import GQA_TYPES, IGNORE
from mdetr.losses.qa import qa_correct

# answer-type names by type index (the datasets' answer_type values, the heads' order in mdetr.losses.qa.HEADS)
ANSWER_TYPES: Dict[str, Tuple[str, ...]] = {"clevr": ("binary", "attribute", "count"), "gqa": tuple(GQA_TYPES)}
QUESTIONS, TYPE_RIGHT, ANSWER_RIGHT = range(3)


class QAEvaluator:
    """Accuracy of a model with ``qa_dataset`` heads ("clevr" or "gqa")."""

    def __init__(self, qa_dataset: str):
        if qa_dataset not in ANSWER_TYPES:
            raise ValueError(f"qa_dataset must be one of {sorted(ANSWER_TYPES)}, got {qa_dataset!r}")
        self.qa_dataset = qa_dataset
        self.type_names = ANSWER_TYPES[qa_dataset]
        self.counts = torch.zeros(len(self.type_names), 3, dtype=torch.long)

    def update(self, outputs: Dict[str, Tensor], answers: Dict[str, Tensor]) -> None:
        """outputs: the model's ``pred_answer_*`` logits for B samples; answers: the batch's ``answers`` dict of
        [B] tensors (``answer_type`` and one ``answer_<head>`` per head). Samples whose ``answer_type`` is -100
        hold no question (e.g. grounding sentences in a mixed file) and are not scored."""
        asked = answers["answer_type"] != IGNORE
        right = qa_correct(outputs, answers, self.qa_dataset)
        self.update_correct(right["answer"][asked], right["type"][asked], answers["answer_type"][asked])

    def update_correct(self, answer_right: Tensor, type_right: Tensor, answer_type: Tensor) -> None:
        """answer_right, type_right: BoolTensor [B]; answer_type: LongTensor [B], the ground-truth type index."""
        if not answer_right.shape == type_right.shape == answer_type.shape or answer_type.dim() != 1:
            raise ValueError(f"expected three [B] tensors, got answer_right {tuple(answer_right.shape)}, type_right "
                             f"{tuple(type_right.shape)} and answer_type {tuple(answer_type.shape)}")
        num_types = len(self.type_names)
        answer_type = answer_type.long().cpu()
        if len(answer_type) and not 0 <= int(answer_type.min()) <= int(answer_type.max()) < num_types:
            raise ValueError(f"answer_type values must be in [0, {num_types}) for {self.qa_dataset} heads, got "
                             f"{sorted(set(answer_type.tolist()))}")
        per_question = torch.stack([torch.ones_like(answer_type), type_right.long().cpu(),
                                    answer_right.long().cpu()], dim=1)  # [B, 3]
        self.counts.index_add_(0, answer_type, per_question)

    def synchronize(self) -> None:
        """Sum the counts over ranks (a no-op in one process). Call once, on every rank, after the last update."""
        self.counts = dist_utils.all_reduce_sum(self.counts)

    def summarize(self) -> Dict[str, float]:
        """``qa_accuracy``, ``qa_type_accuracy`` and ``qa_accuracy_type<t>`` for every type t with questions
        ({} without any question). Names by type index: the training log's, stable across datasets."""
        total = self.counts.sum(0)
        if total[QUESTIONS] == 0:
            return {}
        metrics = {"qa_accuracy": (total[ANSWER_RIGHT] / total[QUESTIONS]).item(),
                   "qa_type_accuracy": (total[TYPE_RIGHT] / total[QUESTIONS]).item()}
        for t, row in enumerate(self.counts):
            if row[QUESTIONS] > 0:
                metrics[f"qa_accuracy_type{t}"] = (row[ANSWER_RIGHT] / row[QUESTIONS]).item()
        return metrics

    def per_type(self) -> Dict[str, Dict[str, Optional[float]]]:
        """By type name, then "all": {questions, accuracy, type_accuracy}; rates are None without questions."""
        rows = dict(zip(self.type_names, self.counts))
        rows["all"] = self.counts.sum(0)
        return {name: {"questions": int(row[QUESTIONS]),
                       "accuracy": (row[ANSWER_RIGHT] / row[QUESTIONS]).item() if row[QUESTIONS] else None,
                       "type_accuracy": (row[TYPE_RIGHT] / row[QUESTIONS]).item() if row[QUESTIONS] else None}
                for name, row in rows.items()}
