"""The torchvision ConvNeXt image tower: contract, small-image stem, heads, checkpointing, no downloads."""

import pytest
import torch
import torchvision
from torch import nn

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import assert_light, check, check_encoder
from plugins.encoders.convnext import ConvNeXt


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test (torchvision is always called with weights=None)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


def test_contract_on_one_and_three_channel_images():
    enc = check("encoder", "convnext", Registry.load(), image_size=16)  # 1 x 28 x 28 images, resized
    check_encoder(enc, image_shape=(3, 28, 28))


@pytest.mark.parametrize(("channels", "small"), [(1, True), (1, False), (3, True)])
def test_input_channels(channels, small):
    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        enc = ConvNeXt(image_size=32, in_channels=channels, small_input=small)
        assert enc(enc.transform(torch.rand(2, 1, 32, 32))).shape == (2, 128)
    assert enc.features[0][0].in_channels == channels


@pytest.mark.parametrize(("image_size", "small", "sides"), [(28, True, [14, 7, 3, 1]), (64, True, [32, 16, 8, 4]),
                                                            (64, False, [16, 8, 4, 2])])
def test_stem_and_stage_sizes(image_size, small, sides):
    with torch.device("meta"):
        enc = ConvNeXt(image_size=image_size, small_input=small)
    patch = 2 if small else 4
    assert (enc.features[0][0].kernel_size, enc.features[0][0].stride) == ((patch, patch), (patch, patch))
    x, seen = torch.rand(1, 3, image_size, image_size, device="meta"), []
    for i, part in enumerate(enc.features):
        x = part(x)
        if i % 2:
            seen.append(x.shape[-1])
    assert seen == sides


def test_small_input_follows_the_image_size_and_tiny_images_are_refused():
    with torch.device("meta"):
        assert ConvNeXt(image_size=64).small_input and not ConvNeXt(image_size=96).small_input
    with pytest.raises(ValueError, match="vanishes .* small_input=true"):
        ConvNeXt(image_size=28, small_input=False)


@pytest.mark.parametrize(("arch", "width", "blocks", "drop"), [("convnext_tiny", 768, 18, 0.1),
                                                               ("convnext_small", 768, 36, 0.4),
                                                               ("convnext_base", 1024, 36, 0.5)])
def test_architectures(arch, width, blocks, drop):
    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        enc = ConvNeXt(arch=arch, head="none", embed_dim=width)
        lighter = ConvNeXt(arch=arch, stochastic_depth=0.0)
    stages = [enc.features[i] for i in (1, 3, 5, 7)]
    assert sum(len(s) for s in stages) == blocks and enc.norm.normalized_shape == (width,)
    assert stages[-1][-1].stochastic_depth.p == pytest.approx(drop)  # the last block's rate: the paper's
    assert lighter.features[7][-1].stochastic_depth.p == 0.0


@pytest.mark.parametrize(("head", "embed_dim"), [("linear", 32), ("mlp", 32), ("none", 768)])
def test_output_shape_per_head(head, embed_dim):
    with torch.device("meta"):
        enc = ConvNeXt(head=head, embed_dim=embed_dim, nested_dims=(16,))
        assert enc(torch.rand(3, 3, 16, 16)).shape == (3, embed_dim)
    assert enc.nested_dims == (16, embed_dim)


def test_module_names_are_torchvisions():
    with torch.device("meta"):
        ours = set(ConvNeXt().state_dict())
        theirs = set(torchvision.models.convnext_tiny(weights=None).state_dict())
    assert ours - theirs == {"norm.weight", "norm.bias", "proj.weight"}
    assert theirs - ours == {"classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias"}


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    x, enc = torch.rand(2, 3, 16, 16), ConvNeXt()
    results = []
    for enabled in (False, True):
        enc.zero_grad(set_to_none=True)
        enc.set_grad_checkpointing(enabled)
        torch.manual_seed(1)  # the same stochastic-depth draws; the recomputation replays them
        out = enc(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in enc.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=0, atol=1e-6, msg=key)


def test_static_options_match_the_signature():
    assert describe("plugins.encoders.convnext:ConvNeXt") == _describe_object(ConvNeXt)


def test_registration_imports_no_torch_and_declares_the_tower():
    assert_light("plugins.encoders")
    convnext = Registry.load().get("encoder", "convnext")
    assert convnext.declared["modality"] == "image"
    assert {o.name: o.default for o in convnext.options} == {
        "arch": "convnext_tiny", "image_size": 28, "in_channels": 3, "small_input": None, "stochastic_depth": None,
        "embed_dim": 128, "head": "linear", "head_layers": 2, "head_hidden": None, "head_norm": "batch",
        "nested_dims": ()}


def test_stage_blocks_are_torchvisions():
    with torch.device("meta"):
        enc = ConvNeXt()
    assert all(isinstance(b, torchvision.models.convnext.CNBlock) for i in (1, 3, 5, 7) for b in enc.features[i])
    assert all(isinstance(enc.features[i][1], nn.Conv2d) for i in (2, 4, 6))  # the downsamplings


def test_forward_is_the_head_of_the_representation() -> None:
    torch.manual_seed(0)
    enc = ConvNeXt(image_size=28).eval()
    images = torch.rand(2, 3, 28, 28)
    representation = enc.representation(images)
    assert representation.shape == (2, 768)
    torch.testing.assert_close(enc(images), enc.proj(representation))
