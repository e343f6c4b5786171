"""The batched criterion against a literal, loop-per-image transcription of MDETR's formulas (scipy matching,
torchvision's GIoU), for every decoder layer."""
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou

from detr_kernels import REFERENCE_BACKENDS
from mdetr.config import LossConfig
from mdetr.losses.criterion import build_criterion, query_targets

B, Q, C, L, D, LAYERS = 3, 7, 256, 9, 16, 3


def make_batch(num_targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(max(num_targets), 1)
    boxes = torch.rand(B, t, 4, generator=g) * 0.5 + 0.25
    posmap = torch.zeros(B, t, C, dtype=torch.bool)
    for b, n in enumerate(num_targets):
        for j in range(n):
            start = int(torch.randint(1, L - 3, (1,), generator=g))
            posmap[b, j, start:start + 1 + j % 3] = True
    return {"boxes": boxes, "positive_map": posmap, "num_targets": torch.tensor(num_targets)}


def make_outputs(seed=1, appearance=False):
    """Random outputs of LAYERS decoder layers; ``appearance``: with AppearanceHead's looks and words (not
    normalized, as the head's) and a caption whose last tokens are padding."""
    g = torch.Generator().manual_seed(seed)

    def layer():
        q = torch.nn.functional.normalize(torch.randn(B, Q, D, generator=g), dim=-1)
        out = {"pred_logits": torch.randn(B, Q, C, generator=g),
               "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25, "proj_queries": q}
        if appearance:
            out["appearance_looks"] = torch.randn(B, Q, 5, generator=g) * 2
        return out

    tokens = torch.nn.functional.normalize(torch.randn(B, L, D, generator=g), dim=-1)
    shared = {"proj_tokens": tokens}
    if appearance:
        attention = torch.ones(B, L, dtype=torch.long)
        attention[0, L - 3:] = 0
        attention[2, L - 1:] = 0
        shared["appearance_words"] = torch.randn(B, L, 5, generator=g).masked_fill(~attention.bool()[..., None], 0)
    layers = [layer() for _ in range(LAYERS)]
    for out in layers:
        out.update(shared)
        for v in out.values():
            v.requires_grad_(True)
        if appearance:
            out["tokenized"] = {"attention_mask": attention}
    final = dict(layers[-1])
    final["aux_outputs"] = layers[:-1]
    return final


def literal_losses(out, batch, cfg: LossConfig):
    """MDETR's SetCriterion for one layer, written the way the reference code reads."""
    n_valid = batch["num_targets"].tolist()
    num_boxes = max(float(sum(n_valid)), 1.0)
    prob = out["pred_logits"].softmax(-1)
    indices = []
    for b, n in enumerate(n_valid):
        tgt_boxes = batch["boxes"][b, :n]
        tgt_map = batch["positive_map"][b, :n].float()
        cost_class = -(prob[b] @ tgt_map.T)
        cost_bbox = torch.cdist(out["pred_boxes"][b], tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(out["pred_boxes"][b], "cxcywh", "xyxy"),
                                         box_convert(tgt_boxes, "cxcywh", "xyxy"))
        cost = cfg.cost_bbox * cost_bbox + cfg.cost_class * cost_class + cfg.cost_giou * cost_giou
        i, j = linear_sum_assignment(cost.detach().numpy())
        indices.append((torch.as_tensor(i), torch.as_tensor(j)))
    logp = out["pred_logits"].log_softmax(-1)
    target_sim = torch.zeros_like(logp)
    target_sim[:, :, -1] = 1
    weight = torch.full(logp.shape[:2], cfg.eos_coef)
    l1 = giou = 0.0
    pos = torch.zeros(B, Q, out["proj_tokens"].shape[1], dtype=torch.bool)
    for b, (i, j) in enumerate(indices):
        target_sim[b, i] = batch["positive_map"][b, j].float()
        weight[b, i] = 1.0
        src, tgt = out["pred_boxes"][b, i], batch["boxes"][b, j]
        l1 = l1 + (src - tgt).abs().sum()
        giou = giou + (1 - torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"),
                                                          box_convert(tgt, "cxcywh", "xyxy")))).sum()
        pos[b, i] = batch["positive_map"][b, j, :pos.shape[2]]
    loss_ce = ((-(logp * target_sim).sum(-1)) * weight).sum() / num_boxes
    logits = out["proj_queries"] @ out["proj_tokens"].transpose(-1, -2) / cfg.temperature
    positive_logits = -logits.masked_fill(~pos, 0)
    b2t = ((positive_logits.sum(2) / (pos.sum(2) + 1e-6) + logits.logsumexp(2)).masked_fill(~pos.any(2), 0)).sum()
    t2b = ((positive_logits.sum(1) / (pos.sum(1) + 1e-6) + logits.logsumexp(1)).masked_fill(~pos.any(1), 0)).sum()
    losses = {"loss_ce": loss_ce, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes,
              "loss_contrastive_align": (b2t + t2b) / 2 / num_boxes}
    if "appearance_looks" in out:  # the same at temperature 1, padded tokens out of every sum
        valid = out["tokenized"]["attention_mask"].bool()[:, None, :]  # [B, 1, L]
        pos = pos & valid
        logits = out["appearance_looks"] @ out["appearance_words"].transpose(-1, -2)
        positive_logits = -logits.masked_fill(~pos, 0)
        over_tokens = logits.masked_fill(~valid, float("-inf")).logsumexp(2)
        b2t = ((positive_logits.sum(2) / (pos.sum(2) + 1e-6) + over_tokens).masked_fill(~pos.any(2), 0)).sum()
        t2b = ((positive_logits.sum(1) / (pos.sum(1) + 1e-6) + logits.logsumexp(1)).masked_fill(~pos.any(1), 0)).sum()
        losses["loss_appearance_align"] = (b2t + t2b) / 2 / num_boxes
    return losses


BACKENDS = REFERENCE_BACKENDS


@pytest.mark.parametrize("appearance", [False, True])
@pytest.mark.parametrize("num_targets", [[2, 1, 4], [0, 3, 1], [0, 0, 0]])
def test_criterion_equals_literal_reference(num_targets, appearance):
    cfg = LossConfig(appearance_align=0.5)
    batch = make_batch(num_targets)
    outputs = make_outputs(appearance=appearance)
    criterion = build_criterion(cfg, LAYERS, None, BACKENDS, appearance_head=appearance)
    losses = criterion(outputs, batch)
    layers = outputs["aux_outputs"] + [outputs]
    for k, layer in enumerate(layers):
        suffix = "" if k == LAYERS - 1 else f"_{k}"
        expected = literal_losses(layer, batch, cfg)
        for name, value in expected.items():
            torch.testing.assert_close(losses[name + suffix], torch.as_tensor(value, dtype=torch.float32),
                                       rtol=1e-5, atol=1e-6, msg=f"{name}{suffix}")
    assert set(losses) == set(criterion.weight_dict)
    total = criterion.total(losses)
    total.backward()
    assert torch.isfinite(outputs["pred_boxes"].grad).all()
    if appearance:
        assert criterion.weight_dict["loss_appearance_align_0"] == 0.5
        if sum(num_targets):
            assert outputs["appearance_looks"].grad.abs().sum() > 0
            assert outputs["appearance_words"].grad[0, L - 3:].abs().sum() == 0, "padded tokens get no gradient"
    expected_total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    torch.testing.assert_close(total, expected_total)


def test_weight_dict_names_every_layer():
    crit = build_criterion(LossConfig(), 6, None, BACKENDS)
    assert crit.weight_dict["loss_bbox"] == 5 and crit.weight_dict["loss_giou_4"] == 2
    assert "loss_ce_5" not in crit.weight_dict and "loss_contrastive_align_0" in crit.weight_dict
    no_aux = build_criterion(LossConfig(aux_loss=False), 6, None, BACKENDS)
    assert sorted(no_aux.weight_dict) == ["loss_bbox", "loss_ce", "loss_contrastive_align", "loss_giou"]


def test_appearance_align_needs_the_heads_outputs():
    crit = build_criterion(LossConfig(), LAYERS, None, BACKENDS, appearance_head=True)
    with pytest.raises(ValueError, match="appearance_head=True"):
        crit(make_outputs(), make_batch([1, 1, 1]))


def test_query_targets_inverts_matching():
    match = torch.tensor([[[2, 0, -1], [1, -1, -1]]])  # [N=1, B=2, T=3]
    out = query_targets(match, 4)
    assert out.tolist() == [[[1, -1, 0, -1], [-1, 0, -1, -1]]]


def test_fused_criterion_equals_reference():
    import detr_kernels

    backends = detr_kernels.describe("cpu")
    batch = make_batch([2, 1, 4], seed=3)
    ref = build_criterion(LossConfig(), LAYERS, None, BACKENDS)(make_outputs(4), batch)
    fused = build_criterion(LossConfig(), LAYERS, None, backends)(make_outputs(4), batch)
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_outputs_with_wrong_layer_count_are_rejected():
    crit = build_criterion(LossConfig(), LAYERS + 1, None, BACKENDS)
    with pytest.raises(ValueError, match="decoder layers"):
        crit(make_outputs(), make_batch([1, 1, 1]))


# ---- QA losses (MDETR's split CLEVR heads) --------------------------------------------------------------------

def test_clevr_qa_losses_by_answer_type():
    from mdetr.losses.qa import qa_losses

    g = torch.Generator().manual_seed(0)
    answers = {"answer_type": torch.tensor([0, 0, 1, 2]), "answer_binary": torch.tensor([1.0, 0.0, 0.0, 0.0]),
               "answer_attr": torch.tensor([-100, -100, 3, -100]), "answer_reg": torch.tensor([-100, -100, -100, 2])}
    outputs = {"pred_answer_type": torch.randn(4, 3, generator=g), "pred_answer_binary": torch.randn(4, generator=g),
               "pred_answer_attr": torch.randn(4, 15, generator=g), "pred_answer_reg": torch.randn(4, 20, generator=g)}
    batch = {"answers": answers}
    losses = qa_losses(outputs, batch, "clevr")
    assert set(losses) == {"loss_answer_type", "loss_answer_binary", "loss_answer_attr", "loss_answer_reg"}
    ce = torch.nn.functional.cross_entropy
    assert losses["loss_answer_type"] == pytest.approx(ce(outputs["pred_answer_type"], answers["answer_type"]).item())
    binary = torch.nn.functional.binary_cross_entropy_with_logits(outputs["pred_answer_binary"][:2],
                                                                  answers["answer_binary"][:2])
    assert losses["loss_answer_binary"] == pytest.approx(binary.item())  # the binary questions only
    assert losses["loss_answer_attr"] == pytest.approx(ce(outputs["pred_answer_attr"][2:3], torch.tensor([3])).item())
    assert losses["loss_answer_reg"] == pytest.approx(ce(outputs["pred_answer_reg"][3:], torch.tensor([2])).item())


def test_qa_losses_skip_samples_without_a_question():
    # answer_type -100: a grounding sentence mixed into QA training; every QA loss is the one of the questions alone
    from mdetr.losses.qa import qa_losses

    g = torch.Generator().manual_seed(1)
    answers = {"answer_type": torch.tensor([0, -100, 1, -100, 2]),
               "answer_binary": torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]),
               "answer_attr": torch.tensor([-100, -100, 3, -100, -100]),
               "answer_reg": torch.tensor([-100, -100, -100, -100, 2])}
    outputs = {"pred_answer_type": torch.randn(5, 3, generator=g), "pred_answer_binary": torch.randn(5, generator=g),
               "pred_answer_attr": torch.randn(5, 15, generator=g), "pred_answer_reg": torch.randn(5, 20, generator=g)}
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    asked = torch.tensor([0, 2, 4])
    losses = qa_losses(outputs, {"answers": answers}, "clevr")
    alone = qa_losses({k: v[asked] for k, v in outputs.items()},
                      {"answers": {k: v[asked] for k, v in answers.items()}}, "clevr")
    assert set(losses) == set(alone)
    for key in losses:
        assert losses[key].item() == pytest.approx(alone[key].item())
    sum(losses.values()).backward()
    for value in outputs.values():
        assert (value.grad[[1, 3]] == 0).all()  # nothing reaches the sentences without a question
    none = {k: torch.full_like(v, -100) if k != "answer_binary" else v for k, v in answers.items()}
    losses = qa_losses(outputs, {"answers": none}, "clevr")
    assert all(value.item() == 0 for value in losses.values())  # a batch without questions: zero, not NaN
