"""Joint image/box transforms: MDETR's train and eval recipes.

A transform is a callable ``(image, target) -> (image, target)``. Until ``ToNormalizedTensor`` the image is a PIL
image and ``target["boxes"]`` is a FloatTensor [T, 4] of absolute xyxy pixels; ``ToNormalizedTensor`` returns the
ImageNet-normalized FloatTensor [3, H, W] and turns the boxes into cxcywh normalized by the final image size.
It also sets ``target["size"]`` (LongTensor [2], h, w). Randomness comes from torch's global generator, which the
DataLoader seeds per worker, so a seeded loader replays the same augmentations.

Recipes (no horizontal flip anywhere: captions say left and right):

- train: half the time resize the short side to a random scale (long side capped at ``max_size``); otherwise
  resize to a random intermediate scale, crop a random window that contains every box entirely, then resize
  to a random scale. (MDETR's "cautious" crop only requires no box to vanish; containing every box keeps
  spatial relations in the captions true and needs no retries.)
- eval: resize the short side to one fixed size (long side capped).

Presets: ``"mdetr"`` (train 480..800 step 32, max 1333, crop from 400/500/600 to a 384..1333 window, as the reference; eval 800) and
``"shapes"`` for the embedded 160..256 px images (train 160..256 step 16, max 320, crop from 192/224/256 to a
128..224 window; eval 224).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mdetr.boxes import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)

Target = Dict[str, object]
Transform = Callable[[Image.Image, Target], Tuple[object, Target]]


def _choice(options: Sequence[int]) -> int:
    """A random option; a single one draws nothing, so the eval recipe leaves the global RNG alone (a validation
    within an epoch must not change the training's dropout masks)."""
    if len(options) == 1:
        return int(options[0])
    return int(options[int(torch.randint(len(options), ()).item())])


def resized_size(width: int, height: int, short_side: int, max_size: int) -> Tuple[int, int]:
    """(new_width, new_height) with the short side at ``short_side`` unless that pushes the long side past
    ``max_size``, in which case the long side is ``max_size``. Aspect ratio kept (to rounding)."""
    scale = short_side / min(width, height)
    if max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_target(target: Target, width: int, height: int, new_width: int, new_height: int) -> Target:
    """The target of an image resized from ``width`` x ``height`` to ``new_width`` x ``new_height`` pixels."""
    scale = torch.tensor([new_width / width, new_height / height] * 2)
    return dict(target, boxes=target["boxes"] * scale)


def resize(image: Image.Image, target: Target, short_side: int, max_size: int) -> Tuple[Image.Image, Target]:
    new_w, new_h = resized_size(image.width, image.height, short_side, max_size)
    target = resize_target(target, image.width, image.height, new_w, new_h)
    return image.resize((new_w, new_h), Image.BILINEAR), target


def crop(image: Image.Image, target: Target, x0: int, y0: int, width: int, height: int) -> Tuple[Image.Image, Target]:
    shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    limit = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = torch.minimum((target["boxes"] - shift).clamp(min=0), limit)
    return image.crop((x0, y0, x0 + width, y0 + height)), dict(target, boxes=boxes)


@dataclass
class RandomResize:
    sizes: Sequence[int]
    max_size: int

    def __call__(self, image, target):
        return resize(image, target, _choice(self.sizes), self.max_size)


@dataclass
class RandomCropKeepingBoxes:
    """Random window of side in [min_size, max_size] (clamped to the image) that contains every box."""
    min_size: int
    max_size: int

    def __call__(self, image, target):
        boxes: Tensor = target["boxes"]
        if len(boxes):
            ux0, uy0 = (int(v) for v in boxes[:, :2].min(0).values.floor().clamp(min=0).tolist())
            ux1 = min(image.width, int(boxes[:, 2].max().ceil()))
            uy1 = min(image.height, int(boxes[:, 3].max().ceil()))
        else:
            ux0, uy0, ux1, uy1 = image.width, image.height, 0, 0
        width = self._side(image.width, max(ux1 - ux0, 0))
        height = self._side(image.height, max(uy1 - uy0, 0))
        x0 = self._offset(image.width, width, ux0, ux1)
        y0 = self._offset(image.height, height, uy0, uy1)
        return crop(image, target, x0, y0, width, height)

    def _side(self, full: int, needed: int) -> int:
        low = min(full, max(self.min_size, needed))
        high = max(low, min(full, self.max_size))
        return int(torch.randint(low, high + 1, ()).item())

    @staticmethod
    def _offset(full: int, side: int, lo: int, hi: int) -> int:
        first = max(0, hi - side)  # the window must reach the union's far edge ...
        last = min(full - side, lo) if hi > lo else full - side  # ... and start before its near edge
        last = max(first, last)
        return int(torch.randint(first, last + 1, ()).item())


@dataclass
class RandomSelect:
    """``first`` with probability p, otherwise ``second``."""
    first: Transform
    second: Transform
    p: float = 0.5

    def __call__(self, image, target):
        return self.first(image, target) if torch.rand(()).item() < self.p else self.second(image, target)


@dataclass
class Compose:
    transforms: Sequence[Transform]

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


# each channel's 256 possible values, normalized: the same float32 numbers as ``(p / 255 - mean) / std`` computed per
# pixel (the same expression, evaluated once per value), a table lookup instead of three passes over the image
_NORMALIZED = np.ascontiguousarray(((np.arange(256, dtype=np.float32)[:, None] * (1 / 255) - _MEAN) * (1 / _STD)).T)


def normalize_pixels(pixels: np.ndarray) -> Tensor:
    """uint8 RGB pixels [H, W, 3] -> ImageNet-normalized FloatTensor [3, H, W] (a new tensor)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels: expected a uint8 array [H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    channels = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    out = np.empty(channels.shape, dtype=np.float32)
    for c in range(3):
        np.take(_NORMALIZED[c], channels[c], out=out[c])
    return torch.from_numpy(out)


class ToNormalizedTensor:
    """PIL RGB -> ImageNet-normalized FloatTensor [3, H, W]; boxes xyxy pixels -> cxcywh normalized."""

    def __call__(self, image, target):
        # numpy, not torch: per-sample ops this small lose more to torch's intra-op thread wake-ups than they gain
        # (10x slower in a busy main process); DataLoader workers run torch single-threaded anyway
        return self.finish(np.asarray(image if image.mode == "RGB" else image.convert("RGB")), target)

    @staticmethod
    def finish(pixels: np.ndarray, target):
        """The same from the image's uint8 pixels [H, W, 3]."""
        tensor = normalize_pixels(pixels)
        h, w = tensor.shape[1:]
        boxes = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return tensor, dict(target, boxes=boxes, size=torch.tensor([h, w], dtype=torch.long))


@dataclass
class EvalTransform:
    """The eval recipe: the short side resized to ``short_side`` (the long side capped at ``max_size``), then
    ``ToNormalizedTensor``. It is deterministic, so it comes in two halves for a dataset that keeps each image's
    resized pixels (``ModulatedDetection(memo_images=True)``): ``resize_pixels(image)``, a function of the image
    alone, and ``finish(pixels, target, width, height)``; calling it runs the two in a row."""
    short_side: int
    max_size: int

    def resize_pixels(self, image: Image.Image) -> np.ndarray:
        """The resized image's uint8 RGB pixels [H', W', 3]."""
        new_w, new_h = resized_size(image.width, image.height, self.short_side, self.max_size)
        resized = image.resize((new_w, new_h), Image.BILINEAR)
        return np.asarray(resized if resized.mode == "RGB" else resized.convert("RGB"))

    def finish(self, pixels: np.ndarray, target: Target, width: int, height: int) -> Tuple[Tensor, Target]:
        """``pixels`` from ``resize_pixels`` of a ``width`` x ``height`` image, and that image's target."""
        target = resize_target(target, width, height, pixels.shape[1], pixels.shape[0])
        return ToNormalizedTensor.finish(pixels, target)

    def __call__(self, image, target):
        return self.finish(self.resize_pixels(image), target, image.width, image.height)


@dataclass(frozen=True)
class Preset:
    train_scales: Tuple[int, ...]
    max_size: int
    crop_resize: Tuple[int, ...]  # the intermediate resize before the crop
    crop_min: int
    crop_max: int
    eval_size: int


PRESETS: Dict[str, Preset] = {
    "mdetr": Preset(tuple(range(480, 801, 32)), 1333, (400, 500, 600), 384, 1333, 800),
    "shapes": Preset(tuple(range(160, 257, 16)), 320, (192, 224, 256), 128, 224, 224),
    "shapes_small": Preset(tuple(range(128, 193, 16)), 256, (160, 192), 112, 176, 160),  # 15-minute CPU runs
    "tiny": Preset((64, 80, 96), 128, (96, 112), 64, 96, 96),  # smoke tests: a few pixels per object
}


def make_transforms(split: str, preset: str = "shapes") -> Compose:
    """The train recipe for ``split == "train"``, the eval recipe for "val"/"test"/"eval"."""
    if preset not in PRESETS:
        raise ValueError(f"unknown transforms preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    if split == "train":
        return Compose([
            RandomSelect(
                RandomResize(p.train_scales, p.max_size),
                Compose([RandomResize(p.crop_resize, p.max_size), RandomCropKeepingBoxes(p.crop_min, p.crop_max),
                         RandomResize(p.train_scales, p.max_size)])),
            ToNormalizedTensor()])
    if split in ("val", "test", "eval"):
        return EvalTransform(p.eval_size, p.max_size)
    raise ValueError(f"unknown split {split!r} for transforms; expected 'train', 'val', 'test' or 'eval'")
