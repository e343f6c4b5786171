"""Evaluators of the MDETR protocols. Each keeps raw counts (or, for COCO AP, the per-image boxes) so that
``synchronize()`` can sum or gather them over ranks before ``summarize()`` turns them into rates.

- ``RefExpEvaluator``: referring expressions, precision@k with GIoU (the reference) or IoU >= 0.5.
- ``PhraseGroundingEvaluator``: Flickr30k Entities Recall@k, any-box and merged-box.
- ``QAEvaluator``: answer accuracy overall and per answer type (CLEVR and GQA heads).
- ``CocoEvaluator``: class-agnostic COCO box AP / AR through pycocotools (imported on use).

``python -m mdetr.evaluate`` runs them on a checkpoint.
"""
from mdetr.evaluation.coco import CocoEvaluator
from mdetr.evaluation.grounding import PhraseGroundingEvaluator
from mdetr.evaluation.qa import QAEvaluator
from mdetr.evaluation.refexp import RefExpEvaluator

__all__ = ["CocoEvaluator", "PhraseGroundingEvaluator", "QAEvaluator", "RefExpEvaluator"]
