"""scikit-learn's bundled handwritten digits: 1,797 real 8 x 8 images (UCI optical digits, Alpaydin & Kaynak).

Same class names, prompts (CLIP's MNIST protocol, Radford et al. 2021) and held-out rule as ``mnist``.
Images stay at their native 8 x 8: the image encoder's ``transform`` resizes them.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from orchestrator.data import labelled_splits
from plugins.datasets.mnist import CLASS_NAMES, TEMPLATES


@lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, tuple[int, ...]]:
    from sklearn.datasets import load_digits  # imported here: only the dataset itself needs it

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    return images, tuple(int(y) for y in digits.target)


class Digits:
    """scikit-learn's 1,797 real 8x8 handwritten digits with CLIP-style captions; fixed held-out split.

    The held-out ``test`` split is the last ``test_fraction`` of each class in the shipped order
    (about 36 per class by default), whatever the seed; ``train`` is the rest.
    """

    def __init__(self, test_fraction: float = 0.2):
        self.class_names = list(CLASS_NAMES)
        self.templates = list(TEMPLATES)
        images, labels = _load()
        self.train, self.test = labelled_splits(images, labels, CLASS_NAMES, TEMPLATES, test_fraction)
