"""The torchvision ResNet image tower: contract, stems, heads, nested dims, checkpointing, no downloads."""

import pytest
import torch
import torchvision
from torch import nn

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import assert_light, check, check_encoder
from plugins.encoders.resnet import ResNet


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test (torchvision is always called with weights=None)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


@pytest.mark.parametrize("channels", [1, 3])
def test_contract_on_one_and_three_channel_images(channels):
    enc = check("encoder", "resnet", Registry.load(), in_channels=channels, image_size=16)  # 1 x 28 x 28 images
    check_encoder(enc, image_shape=(3, 28, 28))
    assert enc.conv1.in_channels == channels and enc.transform(torch.rand(3, 28, 28)).shape == (channels, 16, 16)


def test_small_input_stem_keeps_the_spatial_size():
    enc = ResNet(image_size=28)
    assert enc.small_input and isinstance(enc.maxpool, nn.Identity)
    assert (enc.conv1.kernel_size, enc.conv1.stride) == ((3, 3), (1, 1))
    x = torch.rand(2, 3, 28, 28)
    assert enc.maxpool(enc.relu(enc.bn1(enc.conv1(x)))).shape == (2, 64, 28, 28)
    assert enc.layer4(enc.layer3(enc.layer2(enc.layer1(enc.conv1(x))))).shape[-2:] == (4, 4)


def test_imagenet_stem_for_large_images():
    with torch.device("meta"):
        enc = ResNet(image_size=96, in_channels=1)
        assert enc(torch.rand(2, 1, 96, 96)).shape == (2, 128)
    assert not enc.small_input and isinstance(enc.maxpool, nn.MaxPool2d)
    assert (enc.conv1.in_channels, enc.conv1.kernel_size, enc.conv1.stride) == (1, (7, 7), (2, 2))
    with torch.device("meta"):
        assert ResNet(image_size=28, small_input=False).conv1.stride == (2, 2)


def test_module_names_are_torchvisions():
    with torch.device("meta"):
        ours = set(ResNet(head="none", embed_dim=512).state_dict())
        theirs = {k for k in torchvision.models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
        assert "proj.weight" in ResNet().state_dict()
    assert ours == theirs  # a torchvision state dict loads with strict=False (its fc is left out)


@pytest.mark.parametrize(("arch", "width"), [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_architectures_and_head_widths(arch, width):
    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        enc = ResNet(arch=arch, head="mlp", head_layers=3, embed_dim=64)
    linears = [m for m in enc.proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(width, width), (width, width), (width, 64)]
    assert sum(len(getattr(enc, f"layer{i}")) for i in range(1, 5)) == {"resnet18": 8}.get(arch, 16)


@pytest.mark.parametrize(("head", "embed_dim"), [("linear", 32), ("mlp", 32), ("none", 512)])
def test_output_shape_per_head(head, embed_dim):
    with torch.device("meta"):  # shapes only
        enc = ResNet(head=head, embed_dim=embed_dim, nested_dims=(8,))
        assert enc(torch.rand(3, 3, 16, 16)).shape == (3, embed_dim)
    assert enc.nested_dims == (8, embed_dim)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="arch"):
        ResNet(arch="resnet101")
    with pytest.raises(ValueError, match="set embed_dim=512"):
        ResNet(head="none")
    with pytest.raises(ValueError, match="strictly increasing"):
        ResNet(nested_dims=(64, 32))


def test_grad_checkpointing_gives_the_same_outputs_gradients_and_statistics():
    x = torch.rand(4, 3, 8, 8)
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)  # a fresh tower each time: the batch norm statistics start alike
        enc = ResNet()
        enc.set_grad_checkpointing(enabled)
        out = enc(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), {k: p.grad for k, p in enc.named_parameters()},
                        {k: b for k, b in enc.named_buffers()}))
    (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=0, atol=1e-6, msg=key)
    for key in bufs_a:  # batch norm statistics are updated once, not again by the recomputation
        torch.testing.assert_close(bufs_b[key], bufs_a[key], rtol=0, atol=1e-6, msg=key)


def test_half_precision_weights_take_float_images():
    enc = ResNet().bfloat16()
    assert enc(torch.rand(2, 3, 8, 8)).dtype == torch.bfloat16


def test_static_options_match_the_signature():
    assert describe("plugins.encoders.resnet:ResNet") == _describe_object(ResNet)


def test_registration_imports_no_torch_and_declares_the_tower():
    assert_light("plugins.encoders")
    resnet = Registry.load().get("encoder", "resnet")
    assert resnet.declared["modality"] == "image"
    assert {o.name: o.default for o in resnet.options} == {
        "arch": "resnet18", "image_size": 28, "in_channels": 3, "small_input": None, "embed_dim": 128,
        "head": "linear", "head_layers": 2, "head_hidden": None, "head_norm": "batch", "nested_dims": ()}


def test_forward_is_the_head_of_the_representation() -> None:
    torch.manual_seed(0)
    enc = ResNet(image_size=28).eval()  # eval: BatchNorm uses running statistics, so both calls agree
    images = torch.rand(2, 3, 28, 28)
    representation = enc.representation(images)
    assert representation.shape == (2, 512)
    torch.testing.assert_close(enc(images), enc.proj(representation))
