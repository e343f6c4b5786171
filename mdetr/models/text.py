"""Text side: a Hugging Face encoder with a fast tokenizer, and the FeatureResizer to d_model.

Captions are tokenized inside the model (padding="longest", no truncation): every token output, from the first
special token to the last, becomes one text token of the cross encoder. A caption longer than the token slots
of the class head (255: index 255 is "no object") or the encoder's positions is an error, never truncated.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from transformers import AutoModel, BatchEncoding, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from mdetr.pretrained import load_tokenizer, text_encoder_path

NUM_TOKEN_SLOTS = 255  # positive maps and pred_logits have 256 columns; the last one is no-object


class FeatureResizer(nn.Module):
    """[..., input_dim] -> [..., output_dim]: Linear -> LayerNorm(eps 1e-12) -> Dropout (reference names fc,
    layer_norm)."""

    def __init__(self, input_dim: int, output_dim: int, dropout: float = 0.1):
        super().__init__()
        self.fc = nn.Linear(input_dim, output_dim)
        self.layer_norm = nn.LayerNorm(output_dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Tensor) -> Tensor:
        return self.dropout(self.layer_norm(self.fc(features)))


def load_text_encoder(name: str, freeze: bool = False, config: Optional[PretrainedConfig] = None
                      ) -> Tuple[PreTrainedTokenizerFast, PreTrainedModel]:
    """Fast tokenizer and encoder of ``name`` (resolved by ``mdetr.pretrained.text_encoder_path``, offline).

    ``config``: build the encoder from this configuration with random weights instead of loading ``name``'s
    weights (``name`` then only names the tokenizer): for a checkpoint that holds the encoder's values, e.g. a
    released MDETR file, whose encoder's sizes are read from its tensors.

    The pooler, when the model has one, is unused by MDETR: its parameters are frozen so that no optimizer or
    DistributedDataParallel waits for gradients that never come (the reference leaves them untouched too)."""
    tokenizer = load_tokenizer(name)
    if config is None:
        encoder = AutoModel.from_pretrained(text_encoder_path(name), local_files_only=True)
    elif len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer {name!r} has {len(tokenizer)} tokens but the text encoder's configuration only "
                         f"{config.vocab_size} token embeddings: it is not this encoder's tokenizer")
    else:
        encoder = AutoModel.from_config(config)
    for param_name, param in encoder.named_parameters():
        if freeze or param_name.startswith("pooler."):
            param.requires_grad_(False)
    return tokenizer, encoder


def max_caption_tokens(tokenizer: PreTrainedTokenizerFast, encoder: PreTrainedModel) -> int:
    """Most tokens (special ones included) a caption may have: the head's slots and the encoder's positions."""
    limits = [NUM_TOKEN_SLOTS]
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if positions:
        # RoBERTa reserves padding_idx + 1 positions before the first token
        roberta_like = encoder.config.model_type in ("roberta", "xlm-roberta")
        offset = encoder.config.pad_token_id + 1 if roberta_like else 0
        limits.append(positions - offset)
    if 0 < tokenizer.model_max_length < 1_000_000:  # "unlimited" tokenizers say 1e30
        limits.append(tokenizer.model_max_length)
    return min(limits)


def tokenize_captions(tokenizer: PreTrainedTokenizerFast, captions: Sequence[str], max_tokens: int,
                      device: torch.device) -> BatchEncoding:
    """Batch encoding of ``captions``, padded to the longest, never truncated.

    Raises ValueError naming the first caption with more than ``max_tokens`` tokens."""
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError("captions must be a list of str, one per image")
    tokenized = tokenizer(list(captions), padding="longest", return_tensors="pt")
    lengths: List[int] = tokenized["attention_mask"].sum(1).tolist()
    for caption, length in zip(captions, lengths):
        if length > max_tokens:
            raise ValueError(f"caption has {length} tokens, more than the {max_tokens} this model takes "
                             f"(255 class slots / encoder positions); shorten it: {caption!r}")
    return tokenized.to(device)
