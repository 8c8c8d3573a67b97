"""Per-token features of the built-in towers (``forward_tokens``, for FILIP): shapes, masks, gradients."""

import pytest
import torch

from orchestrator.registry import Registry
from plugins.encoders.text_transformer import PAD, TextTransformer
from plugins.encoders.vit import VisionTransformer


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_tokens_are_the_projected_patches(pool):
    torch.manual_seed(0)
    enc = VisionTransformer(width=32, depth=2, heads=2, embed_dim=16, pool=pool)
    images = torch.stack([enc.transform(torch.rand(1, 28, 28)) for _ in range(3)])
    tokens, mask = enc.forward_tokens(images)
    assert tokens.shape == (3, 16, 16) and mask.shape == (3, 16)  # 4 x 4 patches of 7 x 7, no class token
    assert mask.dtype == torch.bool and mask.all()
    tokens.sum().backward()
    assert enc.patch_embed.weight.grad is not None and enc.proj.weight.grad is not None


@pytest.mark.parametrize("pool", ["eot", "mean"])
def test_text_tokens_mask_the_padding(pool):
    torch.manual_seed(0)
    enc = TextTransformer(width=32, depth=2, heads=2, embed_dim=16, context_length=12, pool=pool).eval()
    ids = enc.tokenize(["ab", "a cat", ""])
    tokens, mask = enc.forward_tokens(ids)
    assert tokens.shape == (3, 12, 16)
    assert torch.equal(mask, ids != PAD) and mask.sum(1).tolist() == [4, 7, 2]  # BOS, bytes, EOS
    shorter, short_mask = enc.forward_tokens(ids[:, :8])  # less padding: the real tokens are unchanged
    torch.testing.assert_close(shorter[short_mask], tokens[mask])


def test_registered_with_tokens():
    registry = Registry.load()
    assert registry.get("encoder", "vit").declared["tokens"] is True
    assert registry.get("encoder", "text-transformer").declared["tokens"] is True
