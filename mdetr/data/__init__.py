"""Data: MDETR annotation files (and the embedded shapes world in the same format), positive maps, joint
transforms, collate and loaders.

- ``build_dataset(data_cfg, split, tokenizer)`` / ``build_datasets(data_cfg, text_encoder)``: datasets from a
  ``mdetr.config.DataConfig`` (generating the shapes world first when it is the dataset and is missing).
- ``build_loader(dataset, batch_size, shuffle, num_workers, seed, distributed=False, aspect_groups=1)``: a seeded
  DataLoader with ``collate_fn``, optionally batching within aspect-ratio groups (``mdetr.data.sampler``); call
  ``loader.set_epoch(epoch)`` before each epoch (reshuffles reproducibly, also when distributed;
  ``set_epoch(epoch, skip=n)`` leaves out the epoch's first n batches, for a run resumed mid-epoch).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler,
                              SequentialSampler)

from mdetr.data.annotations import CLEVR_ATTRIBUTES, ModulatedDetection
from mdetr.data.collate import collate_fn
from mdetr.data.positive_map import create_positive_map
from mdetr.data.sampler import GroupedBatchSampler, aspect_ratios, quantile_groups
from mdetr.data.transforms import make_transforms

__all__ = ["CLEVR_ATTRIBUTES", "ModulatedDetection", "SeededLoader", "build_dataset", "build_datasets", "build_loader",
           "collate_fn", "create_positive_map", "ensure_shapes_dataset", "make_transforms"]


def ensure_shapes_dataset(root, **sizes) -> Path:
    """``mdetr.data.synthetic.ensure_shapes_dataset``, imported on use so that ``python -m mdetr.data.synthetic``
    does not find the module already imported by this package."""
    from mdetr.data.synthetic import ensure_shapes_dataset as ensure

    return ensure(root, **sizes)


def _ann_paths(data_cfg, split: str, ann_file: Optional[str]) -> List[Tuple[Path, int]]:
    """The split's annotation files, each with how many times its entries are read: ``ann_file``, else
    data.train_ann / data.val_ann (test: the val files with '_val' -> '_test'); each may name several files joined
    by ',' (read as one dataset), and a training file's name may end in ``*N``, N >= 1: its entries are read N
    times (``ModulatedDetection``'s ``repeats``)."""
    derive_test = ann_file is None and split == "test"
    if ann_file is None:
        if split == "train":
            ann_file = data_cfg.train_ann
        elif split in ("val", "test"):
            ann_file = data_cfg.val_ann
        else:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    names = [name.strip() for name in str(ann_file).split(",")]
    if not all(names):
        raise ValueError(f"annotation files: expected file names joined by ',', got {ann_file!r}")
    repeats = []
    for i, name in enumerate(names):
        base, star, times = name.rpartition("*")
        times = times.strip()
        if not star:
            repeats.append(1)
            continue
        if not (base and times.isdigit() and int(times) >= 1):
            raise ValueError(f"annotation file {name!r}: a repeat count is '*N' after the name, N an integer >= 1")
        if split != "train":
            raise ValueError(f"annotation file {name!r}: only training files repeat (an evaluation would count "
                             f"the repeated entries again); split {split!r}")
        names[i] = base.strip()
        repeats.append(int(times))
    if derive_test:
        for name in names:
            if "_val" not in Path(name).name:
                raise ValueError(f"split 'test': no test file to derive from data.val_ann={data_cfg.val_ann!r} "
                                 f"(the test file is the val file's name with '_val' -> '_test'); name the test "
                                 f"annotation file itself (python -m mdetr.evaluate --ann FILE)")
        names = [str(Path(name).with_name(Path(name).name.replace("_val", "_test"))) for name in names]
    root = Path(data_cfg.root)
    paths = []
    for name in names:
        path = Path(name)
        paths.append(path if path.is_absolute() else
                     root / "annotations" / path if data_cfg.dataset == "shapes" else root / path)
    return list(zip(paths, repeats))


def _ensure_from_config(data_cfg) -> Path:
    return ensure_shapes_dataset(data_cfg.root, num_train=data_cfg.num_train, num_val=data_cfg.num_val,
                                 num_test=data_cfg.num_test, seed=data_cfg.seed,
                                 contrast_pairs=data_cfg.contrast_pairs)


def build_dataset(data_cfg, split: str, tokenizer, ann_file: Optional[str] = None,
                  generate: bool = True, answer_vocab=None, memo_images: Optional[bool] = None) -> ModulatedDetection:
    """The dataset of ``split`` ("train" uses the train transforms; "val"/"test" the eval ones).

    ``data_cfg``: a ``DataConfig`` (fields dataset, root, image_dir, train_ann, val_ann, num_train/val/test, seed,
    transforms). For ``dataset == "shapes"`` the world is generated under ``root`` first unless already there
    (``generate=False`` skips that check, e.g. on non-main ranks after a barrier). ``answer_vocab``: the QA
    answer vocabulary the model was trained with (default: ``data.answer_vocab``'s file, else the file's own).
    ``memo_images``: keep each image's resized pixels (default: ``data.memo_images``)."""
    if data_cfg.dataset == "shapes":
        if generate:
            _ensure_from_config(data_cfg)
    elif data_cfg.dataset != "mdetr":
        raise ValueError(f"data.dataset must be 'shapes' or 'mdetr', got {data_cfg.dataset!r}")
    image_dir = Path(data_cfg.image_dir) if data_cfg.image_dir else Path(data_cfg.root) / "images"
    # data.augment=false: the train split gets the deterministic eval transform (what the feature cache needs)
    transform_split = "eval" if split == "train" and not data_cfg.augment else split
    files = _ann_paths(data_cfg, split, ann_file)
    return ModulatedDetection(image_dir, [path for path, _ in files], tokenizer,
                              make_transforms(transform_split, data_cfg.transforms),
                              answer_vocab=answer_vocab if answer_vocab is not None else _answer_vocab(data_cfg),
                              memo_images=data_cfg.memo_images if memo_images is None else memo_images,
                              repeats=[times for _, times in files])


def _answer_vocab(data_cfg):
    """The ``data.answer_vocab`` JSON file's content, or None when unset."""
    if not data_cfg.answer_vocab:
        return None
    path = Path(data_cfg.answer_vocab)
    if not path.is_file():
        raise ValueError(f"data.answer_vocab: no such file {str(path)!r}")
    return json.loads(path.read_text())


def build_datasets(data_cfg, text_encoder: str, is_main: bool = True) -> Tuple[ModulatedDetection, ModulatedDetection]:
    """(train, val) datasets with the fast tokenizer of ``text_encoder``; in distributed runs the main rank
    generates the shapes world while the others wait at a barrier."""
    from mdetr.distributed import barrier
    from mdetr.pretrained import load_tokenizer

    tokenizer = load_tokenizer(text_encoder)
    if data_cfg.dataset == "shapes" and is_main:
        _ensure_from_config(data_cfg)
    barrier()
    train = build_dataset(data_cfg, "train", tokenizer, generate=False)
    # the val answers in the train split's vocabulary: the ids the QA heads learn (a CLEVR file without one builds
    # its own from its answers, which need not be the train file's)
    return train, build_dataset(data_cfg, "val", tokenizer, generate=False, answer_vocab=train.answer_vocab)


def _seed_worker(worker_id: int) -> None:
    """numpy's generator is not reseeded by the DataLoader; derive it from torch's per-worker seed."""
    np.random.seed(torch.initial_seed() % 2 ** 32)


class SkippingBatchSampler(Sampler[List[int]]):
    """The batches of ``inner`` with the first ``skip`` of a pass left out (drawn, so the order of the rest is
    unchanged, but never loaded). ``len`` stays the whole epoch's: the lr schedule counts full epochs."""

    def __init__(self, inner: Sampler[List[int]]):
        self.inner = inner
        self.skip = 0

    @property
    def sampler(self):
        return getattr(self.inner, "sampler", None)

    def __iter__(self) -> Iterator[List[int]]:
        batches = iter(self.inner)
        for _ in range(self.skip):
            if next(batches, None) is None:
                return
        yield from batches

    def __len__(self) -> int:
        return len(self.inner)


class SeededLoader(DataLoader):
    """A DataLoader whose order and augmentations are a function of (seed, epoch): ``set_epoch`` reseeds the
    generator that draws both the shuffle and the workers' base seed (or sets the DistributedSampler's epoch), so
    a resumed run replays the same batches. Workers are not persistent for that reason: each epoch's workers are
    seeded afresh from the reseeded generator. ``set_epoch(epoch, skip=n)`` resumes an epoch after its first n
    batches: the same remaining batches, with the same augmentations when there are none or no worker processes
    (workers draw theirs by the order they are handed batches in, which the skip shifts)."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        sampler = getattr(self.batch_sampler, "sampler", None)  # the sampler inside the batch sampler(s)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(self.seed + epoch)
        if skip < 0 or skip > len(self):
            raise ValueError(f"skip must be in [0, {len(self)}] (the epoch's batches), got {skip}")
        self.batch_sampler.skip = skip


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                 distributed: bool = False, drop_last: bool = False, rank: int = 0,
                 aspect_groups: int = 1) -> SeededLoader:
    """Seeded loader with ``collate_fn``; worker processes build the positive maps and run the transforms.

    ``aspect_groups`` > 1: each batch holds images of one of that many aspect-ratio groups (equal-count bins of the
    annotation file's height / width; ``GroupedBatchSampler``): less padding, the same number of batches."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF tokenizers' threads do not survive fork into workers
    # the shuffle (DistributedSampler: ``seed``) is shared by all ranks; augmentation streams differ per rank
    stream_seed = seed + 1_000_003 * rank
    generator = torch.Generator().manual_seed(stream_seed)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    if aspect_groups < 1:
        raise ValueError(f"data.aspect_groups must be >= 1 (1 = no grouping), got {aspect_groups}")
    if aspect_groups > 1:
        groups = quantile_groups(aspect_ratios(dataset), aspect_groups)
        batches = GroupedBatchSampler(sampler, groups, batch_size, drop_last)
    else:
        batches = BatchSampler(sampler, batch_size, drop_last)
    return SeededLoader(dataset, batch_sampler=SkippingBatchSampler(batches), num_workers=num_workers,
                        collate_fn=collate_fn, generator=generator, seed=stream_seed, worker_init_fn=_seed_worker,
                        persistent_workers=False, pin_memory=torch.cuda.is_available())
