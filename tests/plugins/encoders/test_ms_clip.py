"""The modality-shared MS-CLIP tower: the contract, what is shared at each point of the spectrum, registration."""

import pytest
import torch

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import assert_light, check
from plugins.encoders.ms_clip import MSCLIP
from plugins.encoders.text_transformer import TextTransformer

SMALL = {"width": 32, "depth": 3, "heads": 2, "embed_dim": 16}


def _grads(enc: MSCLIP, modality: str) -> set[str]:
    """Names of the parameters that get a gradient from one modality's embeddings."""
    enc.zero_grad(set_to_none=True)
    x = torch.rand(2, 3, 28, 28) if modality == "image" else enc.tokenize(["a cat", "a photo of the number 7"])
    enc(x, modality=modality).sum().backward()
    return {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_contract_through_the_registry():
    enc = check("encoder", "ms-clip")
    assert enc.embed_dim == 128 and len(enc.shared_blocks) == 4  # everything but the LayerNorms shared
    check("encoder", "ms-clip", shared_layers=2, pool="cls")


@pytest.mark.parametrize("shared", [0, 1, 3])
def test_the_sharing_spectrum(shared):
    torch.manual_seed(0)
    enc = MSCLIP(shared_layers=shared, **SMALL)
    assert len(enc.shared_blocks) == shared
    assert len(enc.specific_blocks["image"]) == len(enc.specific_blocks["text"]) == 3 - shared
    image, text = _grads(enc, "image"), _grads(enc, "text")
    both = image & text
    assert both == {n for n in both if n.startswith("shared_blocks.") and ".norms." not in n}
    assert len(both) == 8 * shared  # qkv, out and two MLP linears (weight and bias) of each shared block
    assert not any(".norms.text." in n or "token_embed" in n or "text_pos" in n for n in image)
    assert not any(".norms.image." in n or "patch_embed" in n or "image_pos" in n for n in text)


def test_more_sharing_fewer_parameters():
    counts = [sum(p.numel() for p in MSCLIP(shared_layers=k, **SMALL).parameters()) for k in range(4)]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4


def test_text_is_causal_and_read_at_eot():
    torch.manual_seed(0)
    enc = MSCLIP(**SMALL).eval()
    tokens = enc.tokenize(["a cat", "seven"])
    changed = tokens.clone()
    changed[:, -1] = ord("z")  # a token after EOS cannot reach EOS under the causal mask
    torch.testing.assert_close(enc(tokens, modality="text"), enc(changed, modality="text"))


def test_tokenizer_is_text_transformers():
    texts = ["a photo of the number: \"7\".", "", "naïve"]
    torch.testing.assert_close(MSCLIP(context_length=16).tokenize(texts),
                               TextTransformer(context_length=16).tokenize(texts))


def test_bad_options():
    with pytest.raises(ValueError, match="shared_layers"):
        MSCLIP(depth=2, shared_layers=3)
    with pytest.raises(ValueError, match="modality"):
        MSCLIP(**SMALL)(torch.rand(1, 3, 28, 28), modality="audio")


def test_registration():
    assert_light("plugins.encoders")
    component = Registry.load().get("encoder", "ms-clip")
    assert component.declared["modality"] == "both"
    assert component.option("shared_layers").default is None
    assert describe("plugins.encoders.ms_clip:MSCLIP") == _describe_object(MSCLIP)


# MS-CLIP-S's image-only modules (plugins/encoders/ms_clip_convs.py)
def test_the_released_configs_geometry():
    """B/32 and B/16 at 224 pixels as github.com/Hxyou/MSCLIP builds them: T2B kernels = strides 16,8,4,2,1 and
    8,4,2,1,1; conv strides 2,2,2,2,2 and 2,2,2,2,1; adapters before layers 2, 4, 6, 8, 10 of 12."""
    for patch, t2b, strides in ((32, [16, 8, 4, 2, 1], [2, 2, 2, 2, 2]), (16, [8, 4, 2, 1, 1], [2, 2, 2, 2, 1])):
        enc = MSCLIP(image_size=224, patch_size=patch, width=64, depth=12, heads=2, early_conv=True,
                     parallel_branch=True, pool="cls")
        t2b_convs = [a.t2b[0] for a in enc.branch.adapters]
        assert [c.kernel_size[0] for c in t2b_convs] == [c.stride[0] for c in t2b_convs] == t2b
        convs = [m for m in enc.patch_embed.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert [m.stride[0] for m in convs] == strides
        assert enc.adapted_layers == [2, 4, 6, 8, 10]
        assert len(enc.specific_blocks["image"]) == 0 and len(enc.shared_blocks) == 11  # the stem is layer 0
        assert len(enc.specific_blocks["text"]) == 1  # text keeps a specific first block
        assert enc.patch_embed(torch.rand(1, 3, 224, 224)).shape == (1, 64, 224 // patch, 224 // patch)


def test_early_conv_replaces_the_first_image_layer():
    torch.manual_seed(0)
    enc = MSCLIP(early_conv=True, **SMALL)
    assert len(enc.shared_blocks) == 2 and len(enc.specific_blocks["text"]) == 1
    assert enc.patch_embed(torch.rand(2, 3, 28, 28)).shape == (2, 32, 4, 4)  # the 4x4 grid of 7-pixel patches
    image, text = _grads(enc, "image"), _grads(enc, "text")
    assert any(n.startswith("patch_embed.stages.4.") for n in image)  # every stage of the stem trains
    assert not any(n.startswith("patch_embed.") for n in text)
    assert {n for n in image & text} == {n for n in image & text if n.startswith("shared_blocks.")}


def test_the_parallel_branch_feeds_the_image_tokens_only():
    torch.manual_seed(0)
    enc = MSCLIP(parallel_branch=True, width=32, depth=7, heads=2, embed_dim=16)
    assert enc.adapted_layers == [2, 4, 6] and len(enc.branch.adapters) == len(enc.branch.stages) == 3
    image, text = _grads(enc, "image"), _grads(enc, "text")
    assert {n.split(".")[2] for n in image if n.startswith("branch.stages.")} == {"0", "1", "2"}
    assert {n.split(".")[2] for n in image if n.startswith("branch.adapters.")} == {"0", "1", "2"}
    assert not any(n.startswith("branch.") for n in text)
    # a stage's output reaches the embedding: change what the t2b path adds and the image embedding moves
    images = torch.rand(2, 3, 28, 28)
    enc.eval()
    before = enc(images, modality="image")
    with torch.no_grad():
        enc.branch.adapters[2].t2b[2].weight.mul_(2)
    assert not torch.allclose(enc(images, modality="image"), before)


def test_the_lateral_adapter_keeps_the_class_token_and_fuses_the_patches():
    torch.manual_seed(0)
    enc = MSCLIP(parallel_branch=True, pool="cls", width=32, depth=3, heads=2, embed_dim=16).eval()
    adapter, h, stage = enc.branch.adapters[0], torch.randn(2, 17, 32), torch.randn(2, 2, 14, 14)
    out = adapter(h, stage)
    fused = adapter.t2b(stage).flatten(2).transpose(1, 2)
    patches = adapter.tokens(h[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, 0], adapter.norm(2 * h[:, 0]))  # the official USECLS: cls + cls
    torch.testing.assert_close(out[:, 1:], adapter.norm(patches + fused))


def test_ms_clip_s_meets_the_encoder_contract():
    check("encoder", "ms-clip", early_conv=True, parallel_branch=True, width=32, depth=3, heads=2, embed_dim=16)


def test_bad_convolution_options():
    with pytest.raises(ValueError, match=r"between 0 and 2 \(depth 3, less the conv stem of early_conv\), not 3"):
        MSCLIP(early_conv=True, shared_layers=3, **SMALL)
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        MSCLIP(image_size=30, patch_size=6, early_conv=True, width=32, depth=3, heads=2)
    with pytest.raises(ValueError, match="multiple of 16"):
        MSCLIP(parallel_branch=True, width=40, depth=3, heads=2)
    with pytest.raises(ValueError, match="depth 2 has none"):
        MSCLIP(parallel_branch=True, width=32, depth=2, heads=2)


@pytest.mark.parametrize(("image_size", "patch_size"), [(14, 7), (28, 7), (32, 4), (64, 16), (96, 32), (18, 6)])
def test_every_branch_stage_lands_on_the_patch_grid(image_size, patch_size):
    enc = MSCLIP(image_size=image_size, patch_size=patch_size, parallel_branch=True, early_conv=True, width=16,
                 depth=11, heads=2, embed_dim=8).eval()
    assert len(enc.branch.adapters) == 5  # all five stages fused: a stage off the grid would not add to the tokens
    assert enc(torch.rand(2, 3, image_size, image_size), modality="image").shape == (2, 8)
