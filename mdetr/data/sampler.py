"""Batches of images with similar aspect ratios, so that padding to the batch's largest height and width costs less.

A batch is padded to its tallest and widest image: with the shapes world's mix of portrait and landscape images
a third of the image tokens the cross encoder attends over were padding (batch 8, short side 224, stride 16);
batching within 4 aspect-ratio groups leaves 9% (numbers in the README). The torchvision detection references group
the same way (``GroupedBatchSampler``). The groups come from the annotation file's image sizes, so under random
resizes and crops they are approximate.

Grouping changes which samples share a batch. With ``model.backbone_per_image`` (the shapes presets) a sample's
outputs do not depend on its batch-mates, since the transformer masks padding. A backbone run over the padded batch
sees the padding near each image's border, as in the reference, so there the outputs differ slightly with the
batch (and with augmentation, each sample's random draws differ too).
"""
from __future__ import annotations

import bisect
import math
from typing import Dict, Iterator, List, Sequence

from torch.utils.data import Dataset, Sampler, Subset


def aspect_ratios(dataset: Dataset) -> List[float]:
    """height / width of every sample's image, from the annotation file's ``height`` and ``width`` (no image is
    read). ``dataset``: a ``ModulatedDetection`` or a (nested) ``Subset`` of one."""
    if isinstance(dataset, Subset):
        ratios = aspect_ratios(dataset.dataset)
        return [ratios[i] for i in dataset.indices]
    entries = getattr(dataset, "entries", None)
    if entries is None:
        raise ValueError(f"aspect-ratio grouping needs the image sizes of {type(dataset).__name__}, which has no "
                         f"annotation entries (set data.aspect_groups=1 to batch without grouping)")
    ratios = []
    for entry in entries:
        height, width = entry.get("height"), entry.get("width")
        if not height or not width:
            raise ValueError(f"aspect-ratio grouping needs each image's 'height' and 'width' in the annotation file; "
                             f"entry id {entry.get('id')} ({entry.get('file_name')!r}) has height={height!r}, "
                             f"width={width!r} (set data.aspect_groups=1 to batch without grouping)")
        ratios.append(float(height) / float(width))
    return ratios


def quantile_groups(ratios: Sequence[float], num_groups: int) -> List[int]:
    """Group index (0 .. num_groups - 1) of each ratio: the groups split the sorted ratios into equal counts, so
    the groups fill batches at about the same rate. Equal ratios always share a group (so with many equal ratios
    the counts are uneven, and fewer groups may be used)."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    ordered = sorted(ratios)
    if not ordered:
        return []
    cuts = sorted({ordered[len(ordered) * k // num_groups] for k in range(1, num_groups)} - set(ordered[:1]))
    return [bisect.bisect_right(cuts, ratio) for ratio in ratios]


class GroupedBatchSampler(Sampler[List[int]]):
    """Batches of ``batch_size`` indices from ``sampler``'s order, each from one group: an index joins its group's
    open batch, which is yielded as soon as it is full. The groups' last, partial batches are then merged in
    ``batch_size`` chunks (mixed groups), so an epoch yields every index once and exactly as many batches as plain
    batching: ceil(n / batch_size), or floor with ``drop_last`` (then fewer than ``batch_size`` leftovers are
    dropped). Equal counts keep the learning-rate schedule and the ranks of a distributed run in step.

    ``groups``: the group of every dataset index (``sampler`` yields dataset indices; a ``DistributedSampler``
    works as it is). The order is a function of ``sampler``'s order only."""

    def __init__(self, sampler: Sampler[int], groups: Sequence[int], batch_size: int, drop_last: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.groups = list(groups)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[List[int]]:
        open_batches: Dict[int, List[int]] = {}
        for index in self.sampler:
            batch = open_batches.setdefault(self.groups[index], [])
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                open_batches[self.groups[index]] = []
        rest = [index for batch in open_batches.values() for index in batch]
        for start in range(0, len(rest), self.batch_size):
            batch = rest[start:start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        count = len(self.sampler)  # type: ignore[arg-type]
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)
