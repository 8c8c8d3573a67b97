"""The built-in ViT image encoder: shapes, preprocessing, determinism, gradients, registration."""

import pickle

import pytest
import torch

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import assert_light
from plugins.encoders.vit import VisionTransformer

SMALL = {"width": 32, "depth": 2, "heads": 2, "embed_dim": 16}


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("patch_size", [4, 7])
def test_output_shape(pool, patch_size):
    enc = VisionTransformer(patch_size=patch_size, pool=pool, **SMALL)
    out = enc(torch.rand(5, 3, 28, 28))
    assert out.shape == (5, 16) and enc.embed_dim == 16
    assert torch.isfinite(out).all()


def test_transform_mnist_digit_to_three_normalised_channels():
    enc = VisionTransformer(**SMALL)
    img = torch.rand(1, 28, 28)
    out = enc.transform(img)
    assert out.shape == (3, 28, 28)
    for c in range(3):  # each channel is the digit mapped from [0, 1] to [-1, 1]
        torch.testing.assert_close(out[c], img[0] * 2 - 1)


def test_transform_keeps_three_channels_and_resizes():
    enc = VisionTransformer(image_size=32, patch_size=8, **SMALL)
    rgb = torch.rand(3, 28, 28)
    out = enc.transform(rgb)
    assert out.shape == (3, 32, 32)
    assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5
    gray = enc.transform(torch.rand(1, 64, 64))  # downsampled with antialiasing
    assert gray.shape == (3, 32, 32)
    assert enc(torch.stack([out, gray])).shape == (2, 16)


def test_transform_pickles_for_data_loader_workers():
    enc = VisionTransformer(**SMALL)
    img = torch.rand(1, 28, 28)
    torch.testing.assert_close(pickle.loads(pickle.dumps(enc.transform))(img), enc.transform(img))


def test_transform_one_channel_model():
    enc = VisionTransformer(in_channels=1, **SMALL)
    assert enc.transform(torch.rand(3, 28, 28)).shape == (1, 28, 28)
    assert enc.transform(torch.rand(1, 28, 28)).shape == (1, 28, 28)
    assert enc(torch.rand(2, 1, 28, 28)).shape == (2, 16)


def test_half_precision_weights_take_float_images():
    enc = VisionTransformer(**SMALL).bfloat16()
    assert enc(torch.rand(2, 3, 28, 28)).dtype == torch.bfloat16


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="heads"):
        VisionTransformer(width=30, heads=4)


def test_deterministic_given_seed():
    x = torch.rand(4, 3, 28, 28)
    torch.manual_seed(3)
    a = VisionTransformer(**SMALL)
    torch.manual_seed(3)
    b = VisionTransformer(**SMALL)
    torch.manual_seed(4)
    c = VisionTransformer(**SMALL)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.allclose(a(x), c(x))


def test_images_get_different_embeddings():
    enc = VisionTransformer(**SMALL)
    out = torch.nn.functional.normalize(enc(torch.rand(8, 3, 28, 28)), dim=-1)
    sim = out @ out.T
    assert (sim[~torch.eye(8, dtype=torch.bool)] < 0.9999).all()


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_gradient_reaches_every_parameter(pool):
    enc = VisionTransformer(pool=pool, **SMALL)
    enc(torch.rand(3, 3, 28, 28)).pow(2).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_static_options_match_the_signature():
    assert describe("plugins.encoders.vit:VisionTransformer") == _describe_object(VisionTransformer)


def test_registration_imports_no_torch_and_declares_the_tower():
    assert_light("plugins.encoders")
    vit = Registry.load().get("encoder", "vit")
    assert vit.declared["modality"] == "image"
    assert [o.name for o in vit.options] == ["image_size", "patch_size", "width", "depth", "heads", "mlp_ratio",
                                             "embed_dim", "pool", "in_channels", "size", "head", "head_layers",
                                             "head_hidden", "head_norm", "nested_dims"]


def test_size_presets_give_the_documented_shapes():
    tiny = VisionTransformer(size="tiny")
    with torch.device("meta"):  # shapes only: ViT-S takes long to initialise on a busy CPU
        small, custom = VisionTransformer(size="small"), VisionTransformer(width=64, depth=3, heads=2)
    for enc, shape in ((tiny, (192, 12, 3)), (small, (384, 12, 6)), (custom, (64, 3, 2))):
        assert (enc.pos_embed.shape[-1], len(enc.blocks), enc.blocks[0].heads) == shape
    assert tiny(torch.rand(2, 3, 28, 28)).shape == (2, 128)


def vit_parameters(width: int, depth: int, image_size: int, patch: int, channels: int = 3) -> int:
    """Patch embedding (no bias), positions, class token, ln_pre, blocks (qkv, out, 2 LayerNorms, MLP 4x),
    ln_post; no projection (head=none)."""
    tokens = (image_size // patch) ** 2 + 1
    return channels * patch**2 * width + tokens * width + width + 2 * width + depth * (12 * width**2 + 13 * width) \
        + 2 * width


@pytest.mark.parametrize(("size", "width", "depth", "paper"), [("base", 768, 12, 86e6), ("large", 1024, 24, 307e6)])
def test_base_and_large_parameter_counts(size, width, depth, paper):
    with torch.device("meta"):  # no memory, no init, no forward: ViT-B/L are slow on CPU
        enc = VisionTransformer(size=size, image_size=224, patch_size=16, pool="cls", head="none", embed_dim=width)
    count = sum(p.numel() for p in enc.parameters())
    assert count == vit_parameters(width, depth, 224, 16)
    assert abs(count - paper) / paper < 0.015  # Dosovitskiy et al. 2021, Table 1: 86M and 307M


@pytest.mark.parametrize(("head", "embed_dim"), [("linear", 16), ("mlp", 24), ("none", 32)])
def test_output_shape_per_head(head, embed_dim):
    enc = VisionTransformer(**{**SMALL, "embed_dim": embed_dim}, head=head, head_layers=3)
    assert enc(torch.rand(3, 3, 28, 28)).shape == (3, embed_dim)
    assert sum(isinstance(m, torch.nn.Linear) for m in enc.proj.modules()) == {"linear": 1, "mlp": 3, "none": 0}[head]


def test_default_head_is_clips_bias_free_projection():
    enc = VisionTransformer(**SMALL)
    assert list(enc.state_dict())[-1] == "proj.weight" and enc.proj.bias is None and enc.nested_dims == ()


def test_nested_dims():
    assert VisionTransformer(**SMALL, nested_dims=(4, 8)).nested_dims == (4, 8, 16)
    with pytest.raises(ValueError, match="beyond embed_dim=16"):
        VisionTransformer(**SMALL, nested_dims=(8, 32))
    with pytest.raises(ValueError, match="size=small sets width=384"):
        VisionTransformer(size="small", width=256)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(head):
    enc, x = VisionTransformer(**SMALL, head=head, pool="cls"), torch.rand(4, 3, 28, 28)
    results = []
    for enabled in (False, True):
        enc.zero_grad(set_to_none=True)
        enc.set_grad_checkpointing(enabled)
        out = enc(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in enc.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=0, atol=1e-6, msg=key)


def test_forward_is_the_head_of_the_representation() -> None:
    """``representation`` is what evaluators read with representation=backbone: the input of the projection head."""
    torch.manual_seed(0)
    model = VisionTransformer(head="mlp")
    images = torch.randn(4, 3, 28, 28)
    representation = model.representation(images)
    assert representation.shape == (4, 128)
    torch.testing.assert_close(model(images), model.proj(representation))
