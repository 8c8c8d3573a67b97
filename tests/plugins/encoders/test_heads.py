"""Projection heads, Matryoshka nested dims, queue-time option checks and activation checkpointing, shared by
every built-in encoder."""

import pytest
import torch
from torch import nn

from orchestrator.errors import UserError
from orchestrator.testing import resolve
from plugins.encoders.checkpointing import run_block
from plugins.encoders.heads import MLPHead, make_head
from plugins.encoders.options import nested_dims, vit_shape


def test_linear_head_is_bias_free_and_none_is_identity():
    linear = make_head("linear", 32, 16)
    assert isinstance(linear, nn.Linear) and linear.bias is None and linear.weight.shape == (16, 32)
    assert isinstance(make_head("none", 32, 32), nn.Identity)


@pytest.mark.parametrize(("layers", "norm", "norm_type"), [(2, "batch", nn.BatchNorm1d), (3, "layer", nn.LayerNorm),
                                                          (4, "none", nn.Identity)])
def test_mlp_head_layers(layers, norm, norm_type):
    head = make_head("mlp", 32, 8, layers=layers, hidden=64, norm=norm)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert len(linears) == layers
    assert [m.out_features for m in linears] == [64] * (layers - 1) + [8]
    assert sum(isinstance(m, nn.ReLU) for m in head) == layers - 1
    assert sum(type(m) is norm_type for m in head) == layers - 1
    assert all((m.bias is not None) == (norm == "none") for m in linears[:-1]) and linears[-1].bias is None
    assert head(torch.randn(5, 32)).shape == (5, 8)


def test_mlp_head_hidden_defaults_to_the_width_and_takes_token_features():
    head = MLPHead(32, 8)
    assert head[0].out_features == 32
    tokens = torch.randn(4, 6, 32)
    head.eval()  # batch norm by running statistics: each token is mapped on its own
    out = head(tokens)
    assert out.shape == (4, 6, 8)
    torch.testing.assert_close(out[1], head(tokens[1]))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"head": "conv"}, "head must be one of"),
    ({"head": "none", "embed_dim": 16}, "head=none keeps the 32 features"),
    ({"head": "mlp", "layers": 1}, "at least 2 layers"),
    ({"head": "mlp", "hidden": 0}, "head_hidden=0"),
    ({"head": "mlp", "norm": "group"}, "head_norm"),
])
def test_bad_heads_are_refused(kwargs, match):
    args = {"head": "linear", "width": 32, "embed_dim": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_head(**args)


@pytest.mark.parametrize(("dims", "expected"), [((), ()), ((16, 32), (16, 32, 64)), ((8, 64), (8, 64)), ([64], (64,))])
def test_nested_dims_are_completed_with_the_full_width(dims, expected):
    assert nested_dims(dims, 64) == expected


@pytest.mark.parametrize(("dims", "match"), [((32, 16), "strictly increasing"), ((16, 16), "strictly increasing"),
                                             ((0, 16), "positive"), ((16, 128), "beyond embed_dim=64")])
def test_bad_nested_dims_are_refused(dims, match):
    with pytest.raises(ValueError, match=match):
        nested_dims(dims, 64)


def test_vit_size_presets_refuse_contradicting_options():
    assert vit_shape("custom", 64, 3, 2) == (64, 3, 2)
    assert vit_shape("base", 128, 4, 4) == (768, 12, 12)  # the custom defaults give way to the preset
    assert vit_shape("base", 768, 12, 12) == (768, 12, 12)
    with pytest.raises(ValueError, match="size=base sets width=768"):
        vit_shape("base", 512, 4, 4)


def test_queue_time_resolution_fills_what_the_choices_imply():
    vit = resolve("encoder", "vit", size="small", nested_dims=(16, 32))["options"]
    assert (vit["width"], vit["depth"], vit["heads"]) == (384, 12, 6) and vit["nested_dims"] == [16, 32, 128]
    assert resolve("encoder", "resnet")["options"]["small_input"] is True
    assert resolve("encoder", "resnet", image_size=224)["options"]["small_input"] is False
    assert resolve("encoder", "convnext", image_size=96)["options"]["small_input"] is False
    assert resolve("encoder", "text-transformer")["options"]["nested_dims"] == []


@pytest.mark.parametrize(("name", "options", "match"), [
    ("vit", {"nested_dims": (64, 32)}, "encoder vit: nested_dims=\\[64, 32\\] must be"),
    ("vit", {"size": "tiny", "width": 256}, "size=tiny sets width=192"),
    ("vit", {"patch_size": 5}, "not divisible by patch_size"),
    ("text-transformer", {"head": "none", "embed_dim": 64}, "set embed_dim=128"),
    ("text-transformer", {"heads": 3}, "not divisible by heads"),
    ("resnet", {"head": "none"}, "set embed_dim=512"),
    ("resnet", {"nested_dims": (256,)}, "beyond embed_dim=128"),
    ("convnext", {"small_input": False}, "image_size=28 vanishes .* small_input=true"),
    ("convnext", {"stochastic_depth": 1.0}, "stochastic_depth=1.0"),
    ("convnext", {"head": "mlp", "head_layers": 1}, "at least 2 layers"),
    ("ms-clip", {"shared_layers": 9}, "encoder ms-clip: shared_layers must be between 0 and 4"),
    ("ms-clip", {"early_conv": True, "shared_layers": 4}, "less the conv stem of early_conv"),
    ("ms-clip", {"parallel_branch": True, "image_size": 56, "patch_size": 7}, "3 times .* to 7x7, not to the 8x8"),
    ("ms-clip", {"early_conv": True, "width": 120, "heads": 4}, "not a multiple of 16"),
    ("ms-clip", {"heads": 3}, "not divisible by heads"),
])
def test_queue_time_errors_are_one_line(name, options, match):
    with pytest.raises(UserError, match=match) as info:
        resolve("encoder", name, **options)
    assert "\n" not in str(info.value)


def test_checkpointed_batch_norm_block_matches_and_updates_statistics_once():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3))
    x = torch.randn(4, 3, 6, 6)
    results = []
    for enabled in (False, True):
        model = nn.Sequential(*[m for m in block])  # the same modules, fresh statistics below
        model[1].reset_running_stats()
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same dropout mask; the recomputation replays it
        out = run_block(model, enabled, inputs)
        out.pow(2).sum().backward()
        results.append((out.detach(), inputs.grad, model[0].weight.grad.clone(),
                        model[1].running_mean.clone(), model[1].num_batches_tracked.clone()))
        model.zero_grad()
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)
    assert results[1][4] == 1 and model[1].track_running_stats


def test_checkpointing_is_skipped_without_gradients():
    block = nn.Linear(4, 4)
    with torch.no_grad():
        out = run_block(block, True, torch.randn(2, 4))
    assert out.grad_fn is None
