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
