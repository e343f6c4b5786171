"""Image backbone: any timm model through ``features_only``, one output stage, frozen batch norm when pretrained.

Module names follow the reference so released checkpoints map one to one: the MDETR module holds
``backbone = Joiner(Backbone, PositionEmbeddingSine)``, the timm feature extractor is ``backbone.0.body``.
timm's ResNet feature extractor keeps torchvision's names (conv1, bn1, layer1..4, downsample.0/1) and its
EfficientNet keeps the names the reference's timm used (conv_stem, bn1, blocks.i.j.*).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models.efficientnet import EfficientNetFeatures
from torch import Tensor, nn

from mdetr.data.collate import pad_images
from mdetr.models.cache import FeatureCache
from mdetr.pretrained import backbone_state_dict

from .position import PositionEmbeddingSine

FREEZE_POLICIES = ("reference", "none", "all")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, so no optimizer sees them).

    ``eps`` is 1e-5 as in the reference for every backbone, whatever the original layer used (timm's TF-ported
    EfficientNets use 1e-3): a **quirk** needed to reproduce the released checkpoints."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, eps: Optional[float] = 1e-5) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, bn.eps if eps is None else eps)
        frozen._copy_statistics(bn)
        return frozen

    def _copy_statistics(self, bn: nn.BatchNorm2d) -> None:
        with torch.no_grad():
            if bn.affine:
                self.weight.copy_(bn.weight)
                self.bias.copy_(bn.bias)
            self.running_mean.copy_(bn.running_mean)
            self.running_var.copy_(bn.running_var)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # checkpoints of trainable BN carry it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """Frozen version of timm's ``BatchNormAct2d`` that KEEPS its dropout and activation.

    Replacing a BatchNormAct2d by a plain frozen BN silently drops the activation (timm issue 1631)."""

    def __init__(self, num_features: int, eps: float = 1e-5, drop: Optional[nn.Module] = None,
                 act: Optional[nn.Module] = None):
        super().__init__(num_features, eps)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_batch_norm(cls, bn: BatchNormAct2d, eps: Optional[float] = 1e-5) -> "FrozenBatchNormAct2d":
        frozen = cls(bn.num_features, bn.eps if eps is None else eps, drop=bn.drop, act=bn.act)
        frozen._copy_statistics(bn)
        return frozen

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def freeze_batch_norm(module: nn.Module, eps: Optional[float] = 1e-5) -> nn.Module:
    """Replace, in place and recursively, every BatchNorm2d by a frozen copy (BatchNormAct2d keeps its
    activation). ``eps=None`` keeps each layer's own eps; the default 1e-5 is the reference's. Returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, BatchNormAct2d):  # a BatchNorm2d subclass: test it first
            setattr(module, name, FrozenBatchNormAct2d.from_batch_norm(child, eps))
        elif isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d.from_batch_norm(child, eps))
        else:
            freeze_batch_norm(child, eps)
    return module


def _stage_index(stride: int) -> int:
    """timm's features_only out index of the stage at ``stride`` (indices 0..4 = strides 2..32)."""
    index = int(math.log2(stride)) - 1
    if stride < 2 or 2 ** (index + 1) != stride:
        raise ValueError(f"backbone stride must be a power of two (16 or 32 for MDETR), got {stride}")
    return index


class Backbone(nn.Module):
    """A timm feature extractor returning one stage: images [B, 3, H, W], mask [B, H, W] (True = pad) ->
    features [B, C, H/s, W/s] and mask [B, H/s, W/s] (nearest resize), s = ``stride``.

    Args:
        name: timm model name (``features_only`` must be supported).
        pretrained: load local ImageNet weights (see ``mdetr.pretrained.backbone_state_dict``) and freeze the
            batch norms (FrozenBatchNorm2d); False trains from scratch with timm's trainable norms.
        stride: 32 = last stage (MDETR); 16 = one stage earlier (the stages after it are not built).
        freeze: "reference": a pretrained ResNet trains only layer2-4 (others train everything); "none": all
            parameters train; "all": none do.
        frozen_bn_eps: eps of the frozen norms; None keeps each layer's own.
        load_weights: with ``pretrained``, False builds the same modules (frozen norms, freeze policy) without
            reading the ImageNet weights: for a checkpoint that holds the backbone's values.
        per_image: encode each image alone, unpadded (features independent of the batch's padding; needed by the
            feature cache); False = the reference's one padded batch.
    """

    def __init__(self, name: str, pretrained: bool = True, stride: int = 32, freeze: str = "reference",
                 frozen_bn_eps: Optional[float] = 1e-5, load_weights: bool = True, per_image: bool = False):
        super().__init__()
        if freeze not in FREEZE_POLICIES:
            raise ValueError(f"freeze must be one of {FREEZE_POLICIES}, got {freeze!r}")
        body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(_stage_index(stride),))
        if body.feature_info.reduction()[-1] != stride:
            raise ValueError(f"backbone {name!r} has no stage at stride {stride} "
                             f"(its strides: {timm.create_model(name, features_only=True).feature_info.reduction()})")
        _drop_unused_blocks(body)
        if pretrained:
            if load_weights:
                _load_pretrained(body, name)
            freeze_batch_norm(body, frozen_bn_eps)
        self.body = body
        self.num_channels: int = body.feature_info.channels()[-1]
        self.stride = stride
        _apply_freeze(body, freeze, pretrained)
        self.per_image = per_image
        if per_image:  # one image at a time: channels-last convolutions are ~20% faster on CPU (lite0, 224 px)
            body.to(memory_format=torch.channels_last)
        self.feature_cache: Optional[FeatureCache] = None  # see enable_feature_cache

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        if self.per_image:
            return self._forward_per_image(images, mask)
        # Padded pixels are zeroed (what the collate writes anyway), so their values can never leak in.
        images = images.masked_fill(mask[:, None], 0.0)
        features = self.body(images)[-1]
        feature_mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).bool()[0]
        return features, feature_mask

    def _forward_per_image(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """Each image through the body alone, unpadded, then the feature maps zero-padded into a batch: features
        that do not depend on the batch's padding (the batched path's padding feeds every feature within its
        receptive field)."""
        maps = []
        for image, pad in zip(images, mask):
            valid = image[:, : int((~pad[:, 0]).sum()), : int((~pad[0, :]).sum())]
            cache = self.feature_cache
            key = cache.key(valid) if cache is not None else None
            features = cache.get(key) if cache is not None else None
            if features is None:
                features = self.body(valid[None].contiguous(memory_format=torch.channels_last))[-1][0].contiguous()
                if cache is not None:
                    cache.put(key, features)
            maps.append(features)
        return pad_images(maps)  # zero padding, True on it: as a batch of images

    def enable_feature_cache(self, cache: Optional[FeatureCache] = None) -> FeatureCache:
        """Memoize the features of each image (see ``FeatureCache``): only for a frozen backbone that encodes each
        image alone (``per_image``), so cached and computed features are the same numbers. Pass another
        backbone's cache to share it (an EMA copy of the same frozen backbone)."""
        if not self.per_image:
            raise ValueError("the feature cache needs a backbone that encodes each image alone "
                             "(model.backbone_per_image=true): batched features depend on the batch's padding")
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the feature cache needs a frozen backbone (model.train_backbone=false); "
                             f"{len(trainable)} parameters train, e.g. {trainable[0]!r}")
        self.feature_cache = cache if cache is not None else FeatureCache()
        return self.feature_cache


def _drop_unused_blocks(body: nn.Module) -> None:
    """timm's EfficientNetFeatures runs every block whatever the out index: cut the blocks after the last stage
    used (keeps the names of those that stay). Other feature extractors (ResNet's FeatureListNet) already do."""
    if isinstance(body, EfficientNetFeatures):
        last_stage = max(info["stage"] for info in body.feature_info.get_dicts())
        body.blocks = body.blocks[:last_stage]


def _load_pretrained(body: nn.Module, name: str) -> None:
    weights = backbone_state_dict(name)
    expected = body.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing:
        raise KeyError(f"pretrained weights of {name!r} lack {len(missing)} feature-extractor tensors, "
                       f"e.g. {missing[:3]}")
    body.load_state_dict({k: weights[k] for k in expected})


def _apply_freeze(body: nn.Module, freeze: str, pretrained: bool) -> None:
    resnet_like = all(hasattr(body, f"layer{i}") for i in (1, 2)) and pretrained
    for param_name, param in body.named_parameters():
        if freeze == "all":
            param.requires_grad_(False)
        elif freeze == "reference" and resnet_like:
            param.requires_grad_(any(f"layer{i}" in param_name for i in (2, 3, 4)))


class Joiner(nn.Sequential):
    """(Backbone, PositionEmbeddingSine) as in the reference: keys ``backbone.0.body.*``.

    images [B, 3, H, W], mask [B, H, W] -> features [B, C, h, w], mask [B, h, w], pos [B, 2F, h, w]."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        features, feature_mask = self[0](images, mask)
        pos = self[1](feature_mask).to(features.dtype)
        return features, feature_mask, pos


def build_backbone(name: str = "tf_efficientnet_lite0", pretrained: bool = True, stride: int = 32,
                   freeze: str = "reference", num_pos_feats: int = 128,
                   frozen_bn_eps: Optional[float] = 1e-5, load_weights: bool = True,
                   per_image: bool = False) -> Joiner:
    """The reference's ``backbone`` module: timm features + sine position encoding (``num_pos_feats`` per axis)."""
    return Joiner(Backbone(name, pretrained, stride, freeze, frozen_bn_eps, load_weights, per_image),
                  PositionEmbeddingSine(num_pos_feats, normalize=True))


def map_reference_backbone_key(key: str) -> Optional[str]:
    """Key of a released MDETR checkpoint's backbone tensor -> key in this model, or None to drop it.

    Torchvision ResNets (``backbone.0.body.layer1.0.conv1.weight`` ...) and the reference's timm EfficientNets
    (``backbone.0.body.blocks.0.0.conv_dw.weight`` ...) have the same names here, because timm's feature
    extractors keep those names and both models wrap them as ``backbone.0.body``; only the batch counters of
    trainable norms (absent from frozen ones) are dropped. Keys outside the backbone are returned unchanged."""
    if key.startswith("backbone.") and key.endswith("num_batches_tracked"):
        return None
    return key
