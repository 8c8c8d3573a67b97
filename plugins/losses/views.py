"""Augmented views for image-image losses, built from torchvision.transforms.v2.

``simclr_views`` is the SimCLR composition (Chen et al. 2020, "A Simple Framework for Contrastive
Learning of Visual Representations", appendix A): random resized crop, horizontal flip, colour jitter
(p=0.8), random grayscale (p=0.2) and Gaussian blur (kernel 10% of the side). ``multicrop_views`` is
SwAV's multi-crop (Caron et al. 2020): a few global crops plus small local crops at a lower resolution.

A view maps a raw image (C x H x W floats in [0, 1]) to an augmented raw image; sizes are relative to the
input, so the same recipe serves 28-pixel digits and 224-pixel photographs. Colour and blur follow the
paper's two recipes unless given: its ImageNet one (strength 1.0, blur) for images larger than 64 pixels, its
CIFAR-10 one (appendix B.9: strength 0.5, no blur) for small images. On the shipped 28-pixel MNIST the
ImageNet recipe costs NT-Xent 4 kNN points in the default run (63.2% against 67.6% top-1, 500 steps,
temperature 0.1; docs/methods.md). Every transform here is a picklable object, for data-loading workers.
"""

from __future__ import annotations

import functools

import torch
from torchvision.transforms import v2


class ResizedCrop:
    """A random resized crop (area ``scale``, aspect ``ratio``) resized to ``fraction`` of the input side."""

    def __init__(self, scale: tuple[float, float], fraction: float = 1.0,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.scale, self.fraction, self.ratio = tuple(scale), fraction, tuple(ratio)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        size = (max(1, round(h * self.fraction)), max(1, round(w * self.fraction)))
        return _random_resized_crop(size, self.scale, self.ratio)(image)

    def __repr__(self) -> str:
        return f"ResizedCrop(scale={self.scale}, fraction={self.fraction})"


class Blur:
    """Gaussian blur with a kernel of 10% of the image side (odd, at least 3) and sigma in [0.1, 2.0]."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return _gaussian_blur(max(3, int(0.1 * min(image.shape[-2:])) // 2 * 2 + 1))(image)

    def __repr__(self) -> str:
        return "Blur()"


# torchvision transforms built once per setting: building one took a quarter of a view's time on 28-pixel digits.
# They draw their random parameters when called, not when built, so a kept one gives the same views.
@functools.cache
def _random_resized_crop(size: tuple[int, int], scale: tuple[float, float],
                         ratio: tuple[float, float]) -> v2.RandomResizedCrop:
    return v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)


@functools.cache
def _gaussian_blur(kernel: int) -> v2.GaussianBlur:
    return v2.GaussianBlur(kernel, sigma=(0.1, 2.0))


class Grayscale:
    """SimCLR's random grayscale; a 1-channel image is already gray and passes through."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3] != 3 or torch.rand(()) >= self.p:
            return image
        return v2.functional.rgb_to_grayscale(image, num_output_channels=3)

    def __repr__(self) -> str:
        return f"Grayscale(p={self.p})"


class BySize:
    """Apply ``small`` to images of at most ``SMALL_SIDE`` pixels a side, ``large`` to bigger ones."""

    def __init__(self, small: v2.Compose, large: v2.Compose) -> None:
        self.small, self.large = small, large

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (self.small if min(image.shape[-2:]) <= SMALL_SIDE else self.large)(image)

    def __repr__(self) -> str:
        return f"BySize(small={self.small!r}, large={self.large!r})"


SMALL_SIDE = 64  # CIFAR-10's 32 and MNIST's 28 are small; ImageNet's 224 and STL-10's 96 are not


def augment(scale: tuple[float, float], fraction: float = 1.0, flip: bool = True, color: float | None = None,
            blur: float | None = None, imagenet_blur: float = 0.5) -> v2.Compose | BySize:
    """One SimCLR-style view: crop, flip, jitter (strength ``color``; 0 turns it off), gray, blur (prob).

    ``color`` and ``blur`` left as None follow the image size: strength 1.0 and blur with probability
    ``imagenet_blur`` above ``SMALL_SIDE`` pixels, strength 0.5 and no blur at or below it (SimCLR, B.9).
    """
    if color is None or blur is None:
        small = augment(scale, fraction, flip, 0.5 if color is None else color, 0.0 if blur is None else blur)
        large = augment(scale, fraction, flip, 1.0 if color is None else color, imagenet_blur if blur is None else blur)
        return BySize(small, large)
    steps: list = [ResizedCrop(scale, fraction)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if color > 0:
        s = color
        steps.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8))
        steps.append(Grayscale(p=0.2))
    if blur > 0:
        steps.append(v2.RandomApply([Blur()], p=blur))
    return v2.Compose(steps)


def simclr_views(n: int = 2, crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                 color: float | None = None, blur: float | None = None) -> list[v2.Compose | BySize]:
    """``n`` views, each the SimCLR augmentation (Chen et al. 2020, appendix A)."""
    if n < 1:
        raise ValueError(f"need at least one view, not {n}")
    return [augment(crop_scale, 1.0, flip, color, blur) for _ in range(n)]


def multicrop_views(global_crops: int = 2, local_crops: int = 6,
                    global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                    local_fraction: float = 96 / 224, flip: bool = True, color: float | None = None,
                    blur: float | None = None) -> list[v2.Compose | BySize]:
    """SwAV/DINO multi-crop (Caron et al. 2020; 2021): global crops first, then local crops at
    ``local_fraction`` of the side (96/224 in the papers). The encoder's transform resizes every view
    to its input size, so a local crop costs as much compute as a global one here."""
    if global_crops < 1 or local_crops < 0:
        raise ValueError("need at least one global crop and a non-negative number of local crops")
    return ([augment(global_scale, 1.0, flip, color, blur) for _ in range(global_crops)]
            + [augment(local_scale, local_fraction, flip, color, blur) for _ in range(local_crops)])
