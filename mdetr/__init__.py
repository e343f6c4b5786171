"""MDETR (Kamath et al. 2021), rebuilt. ``create_model``, ``list_models`` and ``load_pretrained`` (``mdetr.hub``)
are imported on first use, so that ``import mdetr`` stays light."""
from typing import Any

_HUB_EXPORTS = ("create_model", "list_models", "load_pretrained")
__all__ = list(_HUB_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _HUB_EXPORTS:
        from mdetr import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'mdetr' has no attribute {name!r}")
