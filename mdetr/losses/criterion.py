"""MDETR's set criterion: one batched matching of every decoder layer, then soft-token, box, contrastive-alignment
and QA losses for all layers at once.

Shapes (``N`` = decoder layers whose outputs are supervised, ``B`` batch, ``Q`` queries, ``T`` padded targets per
image, ``C`` = 256 token slots, ``L`` caption tokens in this batch, ``D`` contrastive dim):

- outputs of the model: ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4], ``proj_queries`` [B, Q, D],
  ``proj_tokens`` [B, L, D], ``aux_outputs`` (N - 1 dicts of the same);
- the collated batch: ``boxes`` [B, T, 4] (cxcywh, normalized), ``positive_map`` [B, T, C] bool (built once per
  sample in the data pipeline), ``num_targets`` [B].

Everything after the matcher is tensor code: no Python loop over boxes or layers, no host sync. Loss names follow
the reference: ``loss_ce``, ``loss_bbox``, ``loss_giou``, ``loss_contrastive_align`` (and ours,
``loss_appearance_align``) for the last layer and the same with suffix ``_0`` .. ``_{N-2}`` for the auxiliary
layers.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import detr_kernels
from detr_kernels.matcher import HungarianMatcher
from mdetr.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from mdetr.distributed import all_reduce_mean
from mdetr.losses.qa import qa_losses


def stack_layers(outputs: Dict[str, object], key: str, num_layers: int) -> Tensor:
    """``outputs[key]`` of the last ``num_layers`` decoder layers (auxiliary ones first), stacked: [N, ...]."""
    aux = [a[key] for a in outputs.get("aux_outputs", [])]
    layers = (aux + [outputs[key]])[-num_layers:]
    if len(layers) != num_layers:
        raise ValueError(f"outputs hold {len(layers)} decoder layers, the criterion was built for {num_layers}")
    return torch.stack(layers)


def query_targets(match: Tensor, num_queries: int) -> Tensor:
    """Invert the matcher's per-target answer into a per-query one.

    match: [N, B, T] index of the query matched to each target (-1 for padding targets).
    returns [N, B, Q] index of the target matched to each query (-1 where unmatched).
    """
    n, b, t = match.shape
    out = match.new_full((n, b, num_queries + 1), -1)
    target_ids = torch.arange(t, device=match.device).expand(n, b, t)
    slot = torch.where(match >= 0, match, num_queries)  # unmatched targets write into a spare slot
    out.scatter_(2, slot, target_ids)
    return out[..., :num_queries]


def gather_targets(per_target: Tensor, tgt_of_query: Tensor) -> Tensor:
    """per_target [B, T, K], tgt_of_query [N, B, Q] -> [N, B, Q, K] (row 0 where unmatched: callers mask it)."""
    n, b, q = tgt_of_query.shape
    idx = tgt_of_query.clamp(min=0).reshape(n, b, q, 1).expand(n, b, q, per_target.shape[-1])
    return torch.gather(per_target.unsqueeze(0).expand(n, *per_target.shape), 2, idx)


class SetCriterion(nn.Module):
    """Computes MDETR's training losses. ``weight_dict`` maps every returned loss name to its weight.

    Args:
        matcher: ``detr_kernels.matcher.HungarianMatcher`` (its backend is the matcher backend).
        loss_weights: base weights by name: ``ce``, ``bbox``, ``giou``, ``contrastive_align``, ``qa`` (and
            ``appearance_align`` with ``use_appearance_align``).
        eos_coef: weight of the no-object target of unmatched queries.
        temperature: contrastive-alignment temperature.
        use_contrastive_align: add ``loss_contrastive_align``.
        use_appearance_align: add ``loss_appearance_align`` (weight ``appearance_align``), the contrastive loss of
            ``AppearanceHead``'s looks and words (outputs ``appearance_looks`` [B, Q, dim] per layer and
            ``appearance_words`` [B, L, dim], whose product is the head's logits: temperature 1), with the text
            padding masked (``tokenized["attention_mask"]``).
        backends: ``{"contrastive": ..., "soft_token": ...}`` passed to ``detr_kernels``.
        qa_dataset: None, "clevr" or "gqa".
    """

    def __init__(self, matcher: HungarianMatcher, loss_weights: Dict[str, float], num_layers: int,
                 eos_coef: float = 0.1, temperature: float = 0.07, use_contrastive_align: bool = True,
                 backends: Optional[Dict[str, str]] = None, qa_dataset: Optional[str] = None,
                 use_appearance_align: bool = False):
        super().__init__()
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.temperature = temperature
        self.use_contrastive_align = use_contrastive_align
        self.backends = {"contrastive": "reference", "soft_token": "reference", **(backends or {})}
        self.qa_dataset = qa_dataset
        self.num_layers = num_layers
        self.use_appearance_align = use_appearance_align
        names = (["ce", "bbox", "giou"] + (["contrastive_align"] if use_contrastive_align else [])
                 + (["appearance_align"] if use_appearance_align else []))
        self.weight_dict: Dict[str, float] = {}
        for layer in range(num_layers):
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            for name in names:
                self.weight_dict[f"loss_{name}{suffix}"] = loss_weights[name]
        self.qa_weight = loss_weights.get("qa", 1.0)

    def layer_names(self, base: str) -> List[str]:
        return [f"{base}_{i}" for i in range(self.num_layers - 1)] + [base]

    def forward(self, outputs: Dict[str, object], batch: Dict[str, object]) -> Dict[str, Tensor]:
        logits = stack_layers(outputs, "pred_logits", self.num_layers).float()  # [N, B, Q, C]
        boxes = stack_layers(outputs, "pred_boxes", self.num_layers).float()  # [N, B, Q, 4]
        tgt_boxes: Tensor = batch["boxes"]  # [B, T, 4]
        tgt_map: Tensor = batch["positive_map"]  # [B, T, C] bool
        num_targets: Tensor = batch["num_targets"]  # [B]
        num_boxes = all_reduce_mean(num_targets.sum().float()).clamp(min=1.0)

        with torch.no_grad():
            match = self.matcher.match_dense(logits, boxes, tgt_boxes, num_targets, positive_map=tgt_map)
        tgt_of_query = query_targets(match, logits.shape[2])  # [N, B, Q]
        matched = tgt_of_query >= 0
        query_map = gather_targets(tgt_map, tgt_of_query) & matched.unsqueeze(-1)  # [N, B, Q, C] bool

        losses: Dict[str, Tensor] = {}
        per_layer = {
            "loss_ce": detr_kernels.soft_token_loss(logits, query_map, matched, num_boxes, eos_coef=self.eos_coef,
                                                    backend=self.backends["soft_token"]),
        }
        per_layer.update(self.box_losses(boxes, gather_targets(tgt_boxes, tgt_of_query), matched, num_boxes))
        if self.use_contrastive_align:
            tokens = outputs["proj_tokens"].float()  # [B, L, D], shared by all layers
            queries = stack_layers(outputs, "proj_queries", self.num_layers).float()  # [N, B, Q, D]
            per_layer["loss_contrastive_align"] = detr_kernels.contrastive_align_loss(
                queries, tokens, query_map[..., : tokens.shape[1]], num_boxes, temperature=self.temperature,
                backend=self.backends["contrastive"])
        if self.use_appearance_align:
            if "appearance_looks" not in outputs:
                raise ValueError("use_appearance_align: the outputs have no 'appearance_looks'; the model needs "
                                 "appearance_head=True")
            words = outputs["appearance_words"].float()  # [B, L, dim]
            looks = stack_layers(outputs, "appearance_looks", self.num_layers).float()  # [N, B, Q, dim]
            padding = ~outputs["tokenized"]["attention_mask"].bool().to(words.device)
            per_layer["loss_appearance_align"] = detr_kernels.contrastive_align_loss(
                looks, words, query_map[..., : words.shape[1]], num_boxes, temperature=1.0, token_mask=padding,
                backend=self.backends["contrastive"])
        for base, values in per_layer.items():  # values: [N]
            for name, value in zip(self.layer_names(base), values.unbind(0)):
                losses[name] = value
        if self.qa_dataset is not None:
            losses.update(qa_losses(outputs, batch, self.qa_dataset))
        return losses

    @staticmethod
    def box_losses(pred: Tensor, target: Tensor, matched: Tensor, num_boxes: Tensor) -> Dict[str, Tensor]:
        """L1 (cxcywh) and 1 - GIoU on matched pairs, summed per layer. pred/target [N, B, Q, 4], matched [N, B, Q]."""
        # unmatched queries get a harmless stand-in target so no NaN enters the masked sum or its gradient
        target = torch.where(matched.unsqueeze(-1), target, pred.detach())
        l1 = (F.l1_loss(pred, target, reduction="none").sum(-1) * matched).sum((1, 2))
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
        giou_loss = ((1 - giou) * matched).sum((1, 2))
        return {"loss_bbox": l1 / num_boxes, "loss_giou": giou_loss / num_boxes}

    def total(self, losses: Dict[str, Tensor]) -> Tensor:
        """The weighted sum that is back-propagated."""
        total = sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)
        qa = [v for k, v in losses.items() if k.startswith("loss_answer")]
        if qa:
            total = total + self.qa_weight * sum(qa)
        return total


def build_criterion(loss_cfg, num_decoder_layers: int, qa_dataset: Optional[str],
                    backends: Dict[str, str], appearance_head: bool = False) -> SetCriterion:
    """The criterion for a config; ``backends`` names the matcher, contrastive and soft-token backends;
    ``appearance_head``: the model has one (``model.appearance_head``), so its contrastive loss is added."""
    matcher = HungarianMatcher(cost_class=loss_cfg.cost_class, cost_bbox=loss_cfg.cost_bbox,
                               cost_giou=loss_cfg.cost_giou, backend=backends["matcher"])
    weights = dict(ce=loss_cfg.ce, bbox=loss_cfg.bbox, giou=loss_cfg.giou,
                   contrastive_align=loss_cfg.contrastive_align, appearance_align=loss_cfg.appearance_align,
                   qa=loss_cfg.qa)
    return SetCriterion(matcher, weights, num_layers=num_decoder_layers if loss_cfg.aux_loss else 1,
                        eos_coef=loss_cfg.eos_coef, temperature=loss_cfg.temperature,
                        use_contrastive_align=loss_cfg.use_contrastive_align,
                        backends={"contrastive": backends["contrastive"], "soft_token": backends["soft_token"]},
                        qa_dataset=qa_dataset, use_appearance_align=appearance_head)
