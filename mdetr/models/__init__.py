"""MDETR model: ``build_mdetr(...)`` with explicit settings, ``build_from_config(ModelConfig)``, the lr groups."""
from __future__ import annotations

import dataclasses
import inspect

from .backbone import map_reference_backbone_key
from .mdetr import MDETR, build_mdetr, param_groups
from .postprocess import PostProcess, phrase_scores, rank_boxes_per_phrase

__all__ = ["MDETR", "build_mdetr", "build_from_config", "param_groups", "PostProcess", "phrase_scores",
           "rank_boxes_per_phrase", "map_reference_backbone_key"]


def build_from_config(model_cfg, attention_backend: str = "reference", **extras) -> MDETR:
    """``build_mdetr`` from a ``mdetr.config.ModelConfig``: every field with a ``build_mdetr`` argument of the same
    name is passed; a field without one is an error (so a config field never silently does nothing). ``extras``:
    ``build_mdetr`` arguments from outside the model section (``mdetr.train`` passes ``qa_no_object_weight``, the
    loss's eos_coef)."""
    fields = dataclasses.asdict(model_cfg)
    accepted = inspect.signature(build_mdetr).parameters
    unknown = sorted(set(fields) - set(accepted))
    if unknown:
        raise ValueError(f"ModelConfig fields {unknown} have no build_mdetr argument")
    return build_mdetr(**fields, **extras, attention_backend=attention_backend)
