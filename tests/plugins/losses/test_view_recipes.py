"""The view recipes of plugins/losses/views.py: SimCLR's ImageNet recipe for large images, its CIFAR-10 one
for small images, explicit options over both."""

from __future__ import annotations

import pickle

import torch
from torchvision.transforms import v2

from plugins.losses.barlow_twins import BarlowTwins
from plugins.losses.byol import BYOL
from plugins.losses.dino import DINO
from plugins.losses.moco import MoCo
from plugins.losses.ntxent import NTXent
from plugins.losses.simsiam import SimSiam
from plugins.losses.swav import SwAV
from plugins.losses.views import SMALL_SIDE, Blur, BySize, ResizedCrop, augment, multicrop_views, simclr_views


def _steps(view: v2.Compose) -> list:
    return list(view.transforms)


def _has_blur(view: v2.Compose) -> bool:
    return any(isinstance(s, v2.RandomApply) and isinstance(s.transforms[0], Blur) for s in _steps(view))


def _jitter_brightness(view: v2.Compose) -> tuple[float, float] | None:
    for s in _steps(view):
        if isinstance(s, v2.RandomApply) and isinstance(s.transforms[0], v2.ColorJitter):
            return s.transforms[0].brightness
    return None


def test_size_picks_the_recipe():
    pick = BySize(small=lambda image: "small", large=lambda image: "large")
    assert pick(torch.rand(1, 28, 28)) == "small"
    assert pick(torch.rand(3, SMALL_SIDE, SMALL_SIDE)) == "small"
    assert pick(torch.rand(3, SMALL_SIDE + 1, 224)) == "large"


def test_default_recipes_are_the_papers():
    view = simclr_views(2)[0]
    assert isinstance(view, BySize)
    assert not _has_blur(view.small) and _jitter_brightness(view.small) == (0.6, 1.4)  # strength 0.5: 0.8 * 0.5
    assert _has_blur(view.large) and _jitter_brightness(view.large) == (0.19999999999999996, 1.8)  # strength 1.0
    for image in (torch.rand(1, 28, 28), torch.rand(3, 96, 96)):
        assert view(image).shape == image.shape


def test_explicit_colour_and_blur_apply_at_every_size():
    view = augment((0.5, 1.0), color=0.0, blur=1.0)
    assert isinstance(view, v2.Compose) and _has_blur(view) and _jitter_brightness(view) is None
    half = augment((0.5, 1.0), color=0.3)  # blur still follows the size
    assert _jitter_brightness(half.small) == _jitter_brightness(half.large)
    assert not _has_blur(half.small) and _has_blur(half.large)


def test_byol_blur_probability_is_kept_for_large_images():
    strong, weak = augment((0.08, 1.0), imagenet_blur=1.0), augment((0.08, 1.0), imagenet_blur=0.1)
    probs = [next(s.p for s in _steps(v.large) if isinstance(s, v2.RandomApply) and isinstance(s.transforms[0], Blur))
             for v in (strong, weak)]
    assert probs == [1.0, 0.1] and not _has_blur(strong.small)


def test_views_pickle_for_loader_workers():
    views = multicrop_views(2, 2)
    again = pickle.loads(pickle.dumps(views))
    torch.manual_seed(0)
    a = [v(torch.rand(1, 28, 28)) for v in again]
    assert [x.shape[-1] for x in a] == [28, 28, 12, 12]


def test_two_view_losses_pass_their_view_options_on():
    for make in (NTXent, BarlowTwins, MoCo, BYOL, SimSiam):
        default, digits = make(), make(crop_scale=(0.3, 1.0), flip=False)
        for view in digits.views:
            steps = _steps(view.small)
            assert next(s for s in steps if isinstance(s, ResizedCrop)).scale == (0.3, 1.0), make
            assert not any(isinstance(s, v2.RandomHorizontalFlip) for s in steps), make
        assert any(isinstance(s, v2.RandomHorizontalFlip) for s in _steps(default.views[0].small)), make


def test_multicrop_losses_can_leave_out_the_flip():
    for make in (DINO, SwAV):
        assert all(not any(isinstance(s, v2.RandomHorizontalFlip) for s in _steps(view.small))
                   for view in make(flip=False).views), make
        assert all(any(isinstance(s, v2.RandomHorizontalFlip) for s in _steps(view.small)) for view in make().views)


def test_kept_crops_and_blurs_give_the_transforms_built_afresh():
    """ResizedCrop and Blur reuse a torchvision transform per size: the same draws, the same views."""
    crop, blur = ResizedCrop((0.08, 1.0), fraction=0.5), Blur()
    for seed, side in enumerate([28, 96, 28, 64, 96]):  # sizes alternate, so each kept transform is reused
        image = torch.rand(3, side, side, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        kept = blur(crop(image))
        torch.manual_seed(seed)
        half = side // 2
        fresh = v2.RandomResizedCrop((half, half), scale=(0.08, 1.0), antialias=True)(image)
        fresh = v2.GaussianBlur(max(3, int(0.1 * half) // 2 * 2 + 1), sigma=(0.1, 2.0))(fresh)
        assert kept.shape == (3, half, half)
        torch.testing.assert_close(kept, fresh, rtol=0, atol=0)
