"""torch.hub entry points: one per name of ``mdetr.list_models()``. Nothing downloads.

    model = torch.hub.load("path/to/this/repo", "mdetr_resnet101", source="local",
                           pretrained="pretrained_resnet101_checkpoint.pth", tokenizer="path/to/roberta-base")

``pretrained`` / ``checkpoint``: a local released MDETR file or a training checkpoint of ``mdetr.train``; every
other keyword goes to ``mdetr.create_model`` (``tokenizer``, ``weights``, ``ModelConfig`` overrides...).
"""
from __future__ import annotations

import typing as _typing  # torch.hub lists every public callable of this module as an entry point

dependencies = ["torch", "torchvision", "timm", "transformers"]


def _entrypoint(name: str) -> _typing.Callable[..., _typing.Any]:
    from mdetr import hub as _hub

    entry = _hub.MODELS[name]
    released = _hub.release_url(name) if entry.released else ""

    def load(checkpoint: str | None = None, pretrained: str | bool | None = None,
             return_postprocessor: bool = False, **kwargs: _typing.Any):
        if isinstance(pretrained, bool):  # the reference's hubconf API: pretrained=True downloaded the weights
            if pretrained:
                raise ValueError(f"nothing is downloaded: pass pretrained=<local path of the released file"
                                 f"{', ' + released if released else ''}>")
            pretrained = None
        if checkpoint is not None and pretrained is not None:
            raise ValueError("pass the checkpoint path as checkpoint= or pretrained=, not both")
        model = _hub.create_model(name, checkpoint if checkpoint is not None else pretrained, **kwargs)
        if return_postprocessor:
            from mdetr.models import PostProcess

            return model, PostProcess()
        return model

    load.__name__ = load.__qualname__ = name
    load.__doc__ = (f"{entry.description}.\n\n"
                    + (f"Released checkpoint: {released} (download it yourself; pass its path as pretrained=).\n"
                       if released else "")
                    + "Arguments: checkpoint= or pretrained= (a local checkpoint path), return_postprocessor=, and "
                      "the keywords of mdetr.create_model (tokenizer=, weights=, ModelConfig overrides).")
    return load


def _register() -> None:
    from mdetr.hub import list_models as _list_models

    for _name in _list_models():
        globals()[_name] = _entrypoint(_name)


_register()
