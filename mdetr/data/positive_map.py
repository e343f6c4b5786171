"""Positive maps: which token positions each box's caption spans cover.

A span [begin, end) in characters maps to tokens char_to_token(begin) .. char_to_token(end - 1) inclusive. As in
MDETR, when the first character is not inside a token (a space) begin+1 then begin+2 are tried, and when the last
is not, end-2 then end-3; a span that still finds no token is skipped (its row stays empty for that span).

The map is **binary** (BoolTensor): MDETR's per-sample map is row-normalized, but its collate function casts the
batch to bool, so its matcher and loss see a binary map (a quirk this rebuild keeps). Column j is token position j
(``<s>``/``[CLS]`` is 0).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

Spans = Sequence[Sequence[int]]  # [[begin, end), ...] character spans of one box


def _char_to_token(tokenized, char_index: int) -> Optional[int]:
    if char_index < 0:
        return None
    try:
        return tokenized.char_to_token(char_index)
    except (IndexError, ValueError):  # beyond the text: MDETR's try/except treats it as "no token"
        return None


def _first_token(tokenized, chars: Sequence[int]) -> Optional[int]:
    for c in chars:
        token = _char_to_token(tokenized, c)
        if token is not None:
            return token
    return None


def token_spans(tokenized, tokens_positive: Sequence[Spans]) -> List[List[List[int]]]:
    """Per box, the inclusive [first, last] token positions of each of its char spans that maps to tokens."""
    return [[[first, last] for begin, end in spans
             if (first := _first_token(tokenized, (begin, begin + 1, begin + 2))) is not None
             and (last := _first_token(tokenized, (end - 1, end - 2, end - 3))) is not None]
            for spans in tokens_positive]


def create_positive_map(tokenized, tokens_positive: Sequence[Spans], max_tokens: int = 256) -> Tensor:
    """BoolTensor [num_boxes, max_tokens]: True where box i's spans cover token j.

    ``tokenized``: the fast tokenizer's output for ONE caption (a ``BatchEncoding``; ``char_to_token`` needs a fast
    tokenizer). ``tokens_positive``: per box a list of [begin, end) char spans. The char->token lookups are a few
    per span; the fill is one vectorised comparison over all spans at once.
    """
    per_box = token_spans(tokenized, tokens_positive)
    rows = [i for i, spans in enumerate(per_box) for _ in spans]
    bounds = [span for spans in per_box for span in spans]
    if not bounds:
        return torch.zeros(len(tokens_positive), max_tokens, dtype=torch.bool)
    bounds_t = torch.tensor(bounds, dtype=torch.long)  # [S, 2] inclusive first/last token per span
    columns = torch.arange(max_tokens)
    covered = (columns >= bounds_t[:, :1]) & (columns <= bounds_t[:, 1:])  # [S, max_tokens]
    counts = torch.zeros(len(tokens_positive), max_tokens, dtype=torch.int32)
    counts.index_add_(0, torch.tensor(rows, dtype=torch.long), covered.to(torch.int32))
    return counts > 0
