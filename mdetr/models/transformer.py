"""MDETR's transformer: text encoder + one cross encoder over [image tokens; text tokens] + DETR decoder.

All sequences are sequence-first ([S, B, d]) as in ``nn.MultiheadAttention``'s default layout. Names follow the
reference (``encoder.layers.i.self_attn``, ``decoder.layers.i.cross_attn_image``, ``norm1/3/4``,
``decoder.norm``, ``text_encoder``, ``resizer``) so released checkpoints load one to one.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BatchEncoding, PretrainedConfig

from .cache import FeatureCache
from .text import FeatureResizer, load_text_encoder, max_caption_tokens, tokenize_captions


def make_attention(d_model: int, nheads: int, dropout: float, backend: str = "reference") -> nn.Module:
    """``nn.MultiheadAttention`` ("reference") or ``detr_kernels.attention.FusedMultiheadAttention`` with the
    named backend: same parameter names and call, so the state dicts are interchangeable."""
    if backend == "reference":
        return nn.MultiheadAttention(d_model, nheads, dropout=dropout)
    from detr_kernels.attention import FusedMultiheadAttention  # lazy: only a fused run needs detr_kernels

    return FusedMultiheadAttention(d_model, nheads, dropout=dropout, backend=backend)


def _with_pos(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


SPATIAL_ATTENTION = ("none", "encoder", "decoder", "both")


class SpatialBias(nn.Module):
    """Content-conditioned half-plane attention (not in MDETR): each head of a layer can restrict the image keys it
    attends to to one side of the querying token, with a direction and strength read from the query's content.

    The bias that query i adds to the score of image key j in head h is ``SCALE * a_h(x_i) . tanh((p_j - p_i) /
    TAU)``: ``a_h`` a linear map of the query's content to (x, y) weights, p the positions in the image (relative
    to its unpadded size). A "left of the blue square" query can then look right of itself for a blue square.
    A bias linear in ``p_j - p_i`` could not: its part that depends on i is the same for every key and cancels in
    the softmax, so both of two red circles would attend alike. Zero-initialized: the layer starts as MDETR's.
    Text keys and text (or QA slot) queries get no bias (``relative_steps``)."""

    SCALE = 4.0
    TAU = 0.05  # a stride-16 cell of a 224-px image is 0.07 wide: the neighbouring cell's step is tanh(1.4) = 0.89

    def __init__(self, d_model: int, nheads: int):
        super().__init__()
        self.nheads = nheads
        self.direction = nn.Linear(d_model, 2 * nheads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.direction.weight)
        nn.init.zeros_(self.direction.bias)

    def forward(self, x: Tensor, steps: Tensor, key_padding_mask: Tensor) -> Tensor:
        """x [Lq, B, d] (the queries' content), steps [B, Lq, Lk, 2] (``relative_steps``), key_padding_mask [B, Lk]
        (True = pad) -> the attention bias [B * H, Lq, Lk], padded keys -inf: ``nn.MultiheadAttention``'s float
        ``attn_mask``, to pass with ``key_padding_mask=None`` (it warns on a bool mask beside a float one)."""
        length, batch, _ = x.shape
        weights = self.direction(x).view(length, batch, self.nheads, 2).permute(1, 2, 0, 3) * self.SCALE
        bias = torch.einsum("bhqc,bqkc->bhqk", weights, steps.to(weights.dtype)).to(x.dtype)
        # never a whole row of -inf: every caption has unpadded text keys (its [CLS] at least), which get no bias
        bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return bias.reshape(batch * self.nheads, length, steps.shape[2])


def relative_steps(query_xy: Tensor, query_on: Tensor, key_xy: Tensor, key_on: Tensor) -> Tensor:
    """``tanh((p_key - p_query) / SpatialBias.TAU)`` per (x, y) [B, Lq, Lk, 2], zero unless both the query and the
    key are image positions. query_xy [B, Lq, 2], query_on [B, Lq] (bool), key_xy [B, Lk, 2], key_on [B, Lk]."""
    steps = torch.tanh((key_xy[:, None] - query_xy[:, :, None]) / SpatialBias.TAU)
    return steps * (query_on[:, :, None] & key_on[:, None, :])[..., None].to(steps.dtype)


def unpadded_cells(mask: Tensor) -> Tensor:
    """mask [B, h, w] (True = pad, padding bottom/right) -> [B, 2]: each image's unpadded (width, height)."""
    return torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1)


def image_positions(mask: Tensor) -> Tensor:
    """Each image token's centre (x, y) relative to its image's unpadded size: mask [B, h, w] (True = pad, padding
    bottom/right) -> [B, h * w, 2], row-major."""
    batch, h, w = mask.shape
    valid = unpadded_cells(mask).clamp(min=1)  # [B, 2] (w, h)
    rows, cols = torch.meshgrid(torch.arange(h, device=mask.device), torch.arange(w, device=mask.device),
                                indexing="ij")
    cells = torch.stack([cols.flatten(), rows.flatten()], -1).float() + 0.5  # [hw, 2]
    return cells[None] / valid[:, None].float()


class TransformerEncoderLayer(nn.Module):
    """Post-norm: x = norm1(x + attn(q=k=x+pos, v=x)); x = norm2(x + FFN(x)). ``spatial_bias``: a ``SpatialBias``
    on the self-attention (``spatial_bias`` module; not in MDETR)."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float,
                 attention_backend: str = "reference", spatial_bias: bool = False):
        super().__init__()
        self.self_attn = make_attention(d_model, nheads, dropout, attention_backend)
        self.spatial_bias = SpatialBias(d_model, nheads) if spatial_bias else None
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor, steps: Optional[Tensor] = None) -> Tensor:
        q = k = _with_pos(src, pos)
        bias = None
        if self.spatial_bias is not None:  # the padding goes into the bias
            bias, key_padding_mask = self.spatial_bias(src, steps, key_padding_mask), None
        attended = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask, need_weights=False,
                                  attn_mask=bias)[0]
        src = self.norm1(src + self.dropout1(attended))
        src = self.norm2(src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src))))))
        return src


class TransformerDecoderLayer(nn.Module):
    """Post-norm: self-attention (norm1), ONE cross-attention over the whole image+text memory (norm3), FFN
    (norm4). ``norm2``/``dropout2`` do not exist: the reference removed its text cross-attention.
    ``spatial_bias``: a ``SpatialBias`` on the cross-attention, relative to each query's anchor (not in MDETR)."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float,
                 attention_backend: str = "reference", spatial_bias: bool = False):
        super().__init__()
        self.self_attn = make_attention(d_model, nheads, dropout, attention_backend)
        self.cross_attn_image = make_attention(d_model, nheads, dropout, attention_backend)
        self.spatial_bias = SpatialBias(d_model, nheads) if spatial_bias else None
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.norm4 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, pos: Tensor,
                query_pos: Tensor, steps: Optional[Tensor] = None) -> Tensor:
        q = k = _with_pos(tgt, query_pos)
        attended = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        bias = None
        if self.spatial_bias is not None:  # the padding goes into the bias
            bias, memory_key_padding_mask = self.spatial_bias(tgt, steps, memory_key_padding_mask), None
        attended = self.cross_attn_image(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos), value=memory,
                                         key_padding_mask=memory_key_padding_mask, need_weights=False,
                                         attn_mask=bias)[0]
        tgt = self.norm3(tgt + self.dropout3(attended))
        tgt = self.norm4(tgt + self.dropout4(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt


class TransformerEncoder(nn.Module):
    """A stack of post-norm layers, no final norm."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor, steps: Optional[Tensor] = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos, steps)
        return src


class TransformerDecoder(nn.Module):
    """A stack of decoder layers; the shared final ``norm`` is applied to every layer's output, and all of them
    are returned: [num_layers, Q, B, d]."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, pos: Tensor,
                query_pos: Tensor, steps: Optional[Tensor] = None) -> Tensor:
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, steps)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """Text encoding, the cross encoder and the decoder, in two stages.

    ``encode`` -> memory cache (the reference's keys, sequence-first):
        img_memory [HW + L, B, d] (encoder output; image tokens row-major, then text), text_memory [L, B, d]
        (its last L positions, padded ones included), text_memory_resized [L, B, d] (resized text features),
        mask [B, HW + L] (True = pad), text_attention_mask [B, L] (True = pad), pos_embed [HW + L, B, d]
        (zeros on text), query_embed [Q, B, d], tokenized (the BatchEncoding).
    ``decode(memory_cache)`` -> hs [num_layers, B, Q, d].

    ``text_encoder_config``: build the text encoder from this configuration with random weights (``text_encoder``
    then only names the tokenizer; see ``load_text_encoder``).
    ``spatial_attention``: where layers get a ``SpatialBias`` (not in MDETR): "none", "encoder" (image tokens'
    self-attention to image tokens), "decoder" (the queries' cross-attention to image tokens, relative to each
    query's anchor: needs the memory cache's ``reference_boxes``) or "both". The memory cache then also has
    ``memory_xy`` [B, HW + L, 2] (image token centres; zeros on text) and ``memory_on`` [B, HW + L] (True = an
    image token).
    """

    def __init__(self, text_encoder: str = "all-MiniLM-L6-v2", freeze_text_encoder: bool = False,
                 d_model: int = 256, nheads: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, attention_backend: str = "reference",
                 text_encoder_config: Optional[PretrainedConfig] = None, spatial_attention: str = "none"):
        super().__init__()
        if d_model % nheads:
            raise ValueError(f"d_model ({d_model}) must be divisible by nheads ({nheads})")
        if spatial_attention not in SPATIAL_ATTENTION:
            raise ValueError(f"spatial_attention must be one of {SPATIAL_ATTENTION}, got {spatial_attention!r}")
        self.spatial_attention = spatial_attention
        encoder_layer = TransformerEncoderLayer(d_model, nheads, dim_feedforward, dropout, attention_backend,
                                                spatial_bias=spatial_attention in ("encoder", "both"))
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = TransformerDecoderLayer(d_model, nheads, dim_feedforward, dropout, attention_backend,
                                                spatial_bias=spatial_attention in ("decoder", "both"))
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, d_model)
        for param in self.parameters():  # the reference's init, before the text modules exist
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.modules():  # zero again after the reference's init: spatial biases start at none
            if isinstance(module, SpatialBias):
                module.reset_parameters()
        self.tokenizer, self.text_encoder = load_text_encoder(text_encoder, freeze_text_encoder, text_encoder_config)
        self.freeze_text_encoder = freeze_text_encoder
        self.max_caption_tokens = max_caption_tokens(self.tokenizer, self.text_encoder)
        self.resizer = FeatureResizer(self.text_encoder.config.hidden_size, d_model, dropout=0.1)
        self.d_model = d_model
        self.nhead = nheads
        self.text_cache: Optional[FeatureCache] = None  # see enable_text_cache

    def train(self, mode: bool = True) -> "Transformer":
        """A frozen text encoder stays in eval mode (no dropout): it is a fixed feature extractor."""
        super().train(mode)
        if self.freeze_text_encoder:
            self.text_encoder.eval()
        return self

    def enable_text_cache(self, cache: Optional[FeatureCache] = None) -> FeatureCache:
        """Memoize the frozen text encoder's outputs per caption (see ``encode_text``). Pass another model's cache
        to share it (an EMA copy of the same frozen encoder)."""
        if not self.freeze_text_encoder:
            raise ValueError("the text cache needs a frozen text encoder (model.freeze_text_encoder=true)")
        self.text_cache = cache if cache is not None else FeatureCache()
        return self.text_cache

    def encode_text(self, tokenized: BatchEncoding, captions: Sequence[str]) -> Tensor:
        """The text encoder's last hidden state [B, L, hidden] for the tokenized captions (padded to L).

        With the text cache, each caption is encoded once at the longest padding it has met: the output at a
        position (padding included: MDETR's contrastive loss reads the padded positions) depends only on the
        caption's tokens and that position, since padding is masked as a key, so a longer entry serves any shorter
        padding by slicing. Cached values equal recomputed ones up to float rounding (the batch shapes differ)."""
        cache = self.text_cache  # only ever set on a frozen encoder (enable_text_cache)
        if cache is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_text_encoder):
                return self.text_encoder(**tokenized).last_hidden_state
        length = tokenized["input_ids"].shape[1]
        found = [cache.get(caption, usable=lambda entry: entry.shape[0] >= length) for caption in captions]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            with torch.no_grad():
                computed = self.text_encoder(**{k: v[missing] for k, v in tokenized.items()}).last_hidden_state
            for row, i in zip(computed, missing):
                found[i] = row.clone()
                cache.put(captions[i], found[i])
        return torch.stack([entry[:length] for entry in found])

    def encode(self, src: Tensor, mask: Tensor, pos_embed: Tensor, query_embed: Tensor,
               captions: Sequence[str]) -> Dict[str, Any]:
        """src [B, d, h, w] (projected image features), mask [B, h, w] (True = pad), pos_embed [B, d, h, w],
        query_embed [Q, d], captions: B strings -> memory cache (see the class docstring)."""
        batch = src.shape[0]
        if len(captions) != batch:
            raise ValueError(f"got {len(captions)} captions for {batch} images")
        image_xy = image_positions(mask) if self.spatial_attention != "none" else None  # [B, hw, 2]
        src = src.flatten(2).permute(2, 0, 1)  # [B, d, h, w] -> [hw, B, d], row-major
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)  # [B, hw]

        tokenized = tokenize_captions(self.tokenizer, captions, self.max_caption_tokens, src.device)
        text_features = self.encode_text(tokenized, captions).transpose(0, 1)  # [L, B, hidden]
        text_attention_mask = tokenized["attention_mask"].ne(1)  # HF: 1 = token; here True = pad
        text_memory_resized = self.resizer(text_features)  # [L, B, d]

        src = torch.cat([src, text_memory_resized], dim=0)
        mask = torch.cat([mask, text_attention_mask], dim=1)
        pos_embed = torch.cat([pos_embed, torch.zeros_like(text_memory_resized)], dim=0)
        spatial: Dict[str, Tensor] = {}
        steps = None
        if image_xy is not None:
            length = text_memory_resized.shape[0]
            spatial["memory_xy"] = F.pad(image_xy, (0, 0, 0, length))
            spatial["memory_on"] = F.pad(torch.ones_like(image_xy[..., 0], dtype=torch.bool), (0, length))
            if self.spatial_attention in ("encoder", "both"):
                steps = relative_steps(spatial["memory_xy"], spatial["memory_on"], spatial["memory_xy"],
                                       spatial["memory_on"])
        img_memory = self.encoder(src, key_padding_mask=mask, pos=pos_embed, steps=steps)
        return {
            **spatial,
            "text_memory_resized": text_memory_resized,
            "text_memory": img_memory[-text_memory_resized.shape[0]:],
            "img_memory": img_memory,
            "mask": mask,
            "text_attention_mask": text_attention_mask,
            "pos_embed": pos_embed,
            "query_embed": query_embed.unsqueeze(1).repeat(1, batch, 1),
            "tokenized": tokenized,
        }

    def decode(self, memory_cache: Dict[str, Any]) -> Tensor:
        """memory cache -> hs [num_layers, B, Q, d] (every layer, after the shared final norm)."""
        query_embed = memory_cache["query_embed"]
        tgt = memory_cache.get("query_content")  # anchor queries start from content; learned ones from zeros
        steps = None
        if self.spatial_attention in ("decoder", "both"):
            steps = self._decoder_steps(memory_cache, query_embed.shape[0])
        hs = self.decoder(torch.zeros_like(query_embed) if tgt is None else tgt, memory_cache["img_memory"],
                          memory_key_padding_mask=memory_cache["mask"], pos=memory_cache["pos_embed"],
                          query_pos=query_embed, steps=steps)
        return hs.transpose(1, 2)

    @staticmethod
    def _decoder_steps(memory_cache: Dict[str, Any], num_queries: int) -> Tensor:
        """``relative_steps`` from each query's anchor (the centre of its ``reference_boxes`` row; the queries
        after them, QA slots, get none) to the image tokens."""
        reference = memory_cache.get("reference_boxes")
        if reference is None:
            raise ValueError("spatial attention in the decoder needs anchored queries (the memory cache's "
                             "reference_boxes, from model.query_grid > 0)")
        anchors = reference.shape[1]
        query_xy = F.pad(reference[..., :2], (0, 0, 0, num_queries - anchors))
        query_on = torch.arange(num_queries, device=reference.device)[None].expand(reference.shape[0], -1) < anchors
        return relative_steps(query_xy.float(), query_on, memory_cache["memory_xy"], memory_cache["memory_on"])
