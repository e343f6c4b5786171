"""Memoized outputs of frozen feature extractors (``train.cache_features``): the image backbone's per image, a
frozen text encoder's per caption."""
from __future__ import annotations

import hashlib
from typing import Callable, Dict, Hashable, Optional, Tuple

from torch import Tensor


class FeatureCache:
    """Outputs of a frozen feature extractor, memoized by key. The backbone's key (``key``) is a hash of the
    image's unpadded pixels and its size, so the same picture under the same (deterministic) transform is encoded
    once per run; a frozen text encoder's key is the caption (``Transformer.enable_text_cache``).

    Images only hit when the train transforms are deterministic (``data.augment=false``): a randomly resized or
    cropped image never does. Meant for CPU runs, where the backbone is a third of a step; on CUDA each image key
    costs a copy of the image to the host. Memory: C x h x w values per distinct image (~70 KB for lite0 at 160 px),
    L x hidden per caption (~60 KB for MiniLM at 40 tokens)."""

    def __init__(self):
        self.entries: Dict[Hashable, Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: Tensor) -> Tuple[int, int, bytes]:
        """An image's key: its size and a hash of its pixels."""
        pixels = image.detach().float().cpu().contiguous().numpy()
        return image.shape[-2], image.shape[-1], hashlib.sha256(pixels).digest()

    def get(self, key, usable: Optional[Callable[[Tensor], bool]] = None) -> Optional[Tensor]:
        """The entry of ``key``, or None (a miss) when there is none or ``usable`` rejects it."""
        found = self.entries.get(key)
        if found is None or (usable is not None and not usable(found)):
            self.misses += 1
            return None
        self.hits += 1
        return found

    def put(self, key, features: Tensor) -> None:
        self.entries[key] = features.detach()

    def __len__(self) -> int:
        return len(self.entries)
