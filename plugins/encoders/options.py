"""Option checks shared by the built-in encoders, torch-free: ``orch queue`` runs them through ``resolve=``.

Each check raises ``ValueError`` (the encoders call them when built from Python); the ``resolve_*``
functions turn that into a one-line ``UserError`` at queue time and fill in the options a choice implies
(a ViT ``size`` preset's width/depth/heads, ``small_input`` from the image size, the full width appended to
``nested_dims``), so that the stored, hashed spec says what is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.errors import UserError

# ViT presets (width, depth, heads): ViT-Ti/S from Touvron et al. 2021 (DeiT), ViT-B/L from Dosovitskiy
# et al. 2021; all with MLP ratio 4.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
}
VIT_CUSTOM = (128, 4, 4)  # VisionTransformer's own width, depth, heads defaults (size="custom")
RESNET_WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}  # pooled features before the head
CONVNEXT_WIDTHS = {"convnext_tiny": 768, "convnext_small": 768, "convnext_base": 1024}
SMALL_INPUT_MAX = 64  # small_input=None turns the small-image stem on up to this image size
HEADS = ("linear", "mlp", "none")
HEAD_NORMS = ("batch", "layer", "none")


def nested_dims(dims: Sequence[int], embed_dim: int) -> tuple[int, ...]:
    """Matryoshka widths (Kusupati et al. 2022), checked: positive, strictly increasing, at most
    ``embed_dim``; ``embed_dim`` is appended when the last is smaller. ``()`` stays ``()`` (no nesting)."""
    dims = tuple(int(d) for d in dims)
    if not dims:
        return ()
    if dims[0] < 1 or any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"nested_dims={list(dims)} must be positive and strictly increasing, e.g. 16,32,64")
    if dims[-1] > embed_dim:
        raise ValueError(f"nested_dims={list(dims)} goes beyond embed_dim={embed_dim}: every width must be "
                         f"at most embed_dim")
    return dims if dims[-1] == embed_dim else (*dims, embed_dim)


def check_head(head: str, width: int, embed_dim: int, layers: int, hidden: int | None, norm: str) -> None:
    """A projection head from ``width`` features to ``embed_dim`` that can be built (see ``heads.make_head``)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if embed_dim < 1:
        raise ValueError(f"embed_dim={embed_dim} must be positive")
    if head == "none" and embed_dim != width:
        raise ValueError(f"head=none keeps the {width} features of the trunk: set embed_dim={width}, or use "
                         f"head=linear or head=mlp")
    if head == "mlp":
        if layers < 2:
            raise ValueError(f"head_layers={layers}: an mlp head has at least 2 layers (one linear map is "
                             f"head=linear)")
        if hidden is not None and hidden < 1:
            raise ValueError(f"head_hidden={hidden} must be positive (or left out: the trunk's width)")
        if norm not in HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {', '.join(HEAD_NORMS)}, not {norm!r}")


def vit_shape(size: str, width: int, depth: int, heads: int) -> tuple[int, int, int]:
    """(width, depth, heads) of a ViT ``size``: the options themselves for ``custom``, else the preset, which
    the options may repeat but not contradict (an option left at its ``custom`` default is overridden)."""
    if size == "custom":
        return width, depth, heads
    if size not in VIT_SIZES:
        raise ValueError(f"size must be custom or one of {', '.join(VIT_SIZES)}, not {size!r}")
    preset = VIT_SIZES[size]
    for name, given, default, value in zip(("width", "depth", "heads"), (width, depth, heads), VIT_CUSTOM, preset):
        if given not in (default, value):
            raise ValueError(f"size={size} sets {name}={value}: leave {name} out, or use size=custom with "
                             f"{name}={given}")
    return preset


def small_input(flag: bool | None, image_size: int) -> bool:
    """Whether to use the small-image stem: ``flag``, or (``None``) whether ``image_size`` <= 64."""
    return image_size <= SMALL_INPUT_MAX if flag is None else bool(flag)


def convnext_grid(image_size: int, small: bool) -> int:
    """The side of ConvNeXt's last feature map: the stem divides by 4 (2 with ``small_input``), then three
    2x2 stride-2 downsamplings halve it; an image too small to reach the last stage is refused."""
    side = image_size // (2 if small else 4)
    for _ in range(3):
        side //= 2
    if side < 1:
        raise ValueError(f"image_size={image_size} vanishes before ConvNeXt's last stage"
                         + ("" if small else ": use small_input=true (a stride-2 stem)")
                         + f"; it needs at least {16 if small else 32} pixels")
    return side


def check_drop_rate(rate: float | None) -> None:
    """A stochastic-depth (drop-path) rate in [0, 1), or ``None`` for the architecture's default."""
    if rate is not None and not 0.0 <= rate < 1.0:
        raise ValueError(f"stochastic_depth={rate} must be in [0, 1), e.g. 0.1")


MS_CLIP_STAGES = 5  # MS-CLIP-S's convolutions: a 3x3 conv to width/16, then four stages doubling to width


def ms_clip_strides(patch_size: int) -> list[int]:
    """Strides of MS-CLIP-S's five conv stages: 2 until their product covers the patch, then 1 (the released
    B/32: 2,2,2,2,2; B/16: 2,2,2,2,1)."""
    halvings = math.ceil(math.log2(patch_size)) if patch_size > 1 else 0
    if not 1 <= halvings <= MS_CLIP_STAGES:
        raise ValueError(f"MS-CLIP's convolutions need a patch_size between 2 and {2**MS_CLIP_STAGES}, "
                         f"not {patch_size}")
    return [2] * halvings + [1] * (MS_CLIP_STAGES - halvings)


def ms_clip_stage_sizes(image_size: int, patch_size: int) -> list[int]:
    """The side of each conv stage's output (3x3 convs with padding 1: ceil(side / stride))."""
    sizes, side = [], image_size
    for stride in ms_clip_strides(patch_size):
        side = math.ceil(side / stride)
        sizes.append(side)
    return sizes


def check_ms_clip(image_size: int, patch_size: int, width: int, depth: int, heads: int, shared_layers: int | None,
                  pool: str, context_length: int, early_conv: bool, parallel_branch: bool) -> int:
    """MS-CLIP's options, checked; returns the number of shared blocks (``shared_layers``, or by default all
    but the conv stem's layer)."""
    stem = int(early_conv)  # the conv stem is the image's first layer
    shared = depth - stem if shared_layers is None else shared_layers
    if not 0 <= shared <= depth - stem:
        raise ValueError(f"shared_layers must be between 0 and {depth - stem} (depth {depth}"
                         f"{', less the conv stem of early_conv' if early_conv else ''}), not {shared}")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', not {pool!r}")
    if context_length < 2:
        raise ValueError("context_length must leave room for BOS and EOS")
    if early_conv or parallel_branch:
        grid, side = image_size // patch_size, ms_clip_stage_sizes(image_size, patch_size)[-1]
        if side != grid:
            halvings = ms_clip_strides(patch_size).count(2)
            raise ValueError(f"MS-CLIP's convolutions halve {image_size}-pixel images {halvings} times for "
                             f"{patch_size}-pixel patches, to {side}x{side}, not to the {grid}x{grid} patch grid: "
                             f"use a power-of-two patch_size (or the default 28-pixel images with 7-pixel patches)")
        if width % 16:
            raise ValueError(f"MS-CLIP's convolutions start at width / 16 channels: width {width} is not a "
                             f"multiple of 16")
    if parallel_branch and depth < 3:
        raise ValueError(f"parallel_branch adds its first stage before image layer 2: depth {depth} has none")
    return shared


def resolve_ms_clip(options: dict[str, Any]) -> dict[str, Any]:
    """Queue time: ``check_ms_clip`` as one ``UserError`` line."""
    try:
        check_ms_clip(**{k: options[k] for k in ("image_size", "patch_size", "width", "depth", "heads",
                                                 "shared_layers", "pool", "context_length", "early_conv",
                                                 "parallel_branch")})
    except ValueError as exc:
        raise UserError(f"encoder ms-clip: {exc}") from None
    return options


def _resolver(name: str, fill: Callable[[dict[str, Any]], int]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``resolve=`` function: ``fill(options)`` completes the options in place and returns the trunk's
    width; then the head and nested dims are checked. A ``ValueError`` becomes a one-line ``UserError``."""

    def resolve(options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options)
        try:
            width = fill(options)
            check_head(options["head"], width, options["embed_dim"], options["head_layers"],
                       options["head_hidden"], options["head_norm"])
            options["nested_dims"] = list(nested_dims(options["nested_dims"], options["embed_dim"]))
        except ValueError as exc:
            raise UserError(f"encoder {name}: {exc}") from None
        return options

    return resolve


def _fill_vit(options: dict[str, Any]) -> int:
    shape = vit_shape(options["size"], options["width"], options["depth"], options["heads"])
    options["width"], options["depth"], options["heads"] = shape
    if options["width"] % options["heads"]:
        raise ValueError(f"width {options['width']} is not divisible by heads {options['heads']}")
    if options["image_size"] % options["patch_size"]:
        raise ValueError(f"image_size {options['image_size']} is not divisible by patch_size "
                         f"{options['patch_size']}")
    return options["width"]


def _fill_text(options: dict[str, Any]) -> int:
    if options["width"] % options["heads"]:
        raise ValueError(f"width {options['width']} is not divisible by heads {options['heads']}")
    return options["width"]


def _fill_resnet(options: dict[str, Any]) -> int:
    options["small_input"] = small_input(options["small_input"], options["image_size"])
    return RESNET_WIDTHS[options["arch"]]


def _fill_convnext(options: dict[str, Any]) -> int:
    options["small_input"] = small_input(options["small_input"], options["image_size"])
    convnext_grid(options["image_size"], options["small_input"])
    check_drop_rate(options["stochastic_depth"])
    return CONVNEXT_WIDTHS[options["arch"]]


resolve_vit = _resolver("vit", _fill_vit)
resolve_text_transformer = _resolver("text-transformer", _fill_text)
resolve_resnet = _resolver("resnet", _fill_resnet)
resolve_convnext = _resolver("convnext", _fill_convnext)
