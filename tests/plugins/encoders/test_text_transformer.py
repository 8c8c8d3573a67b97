"""The built-in byte-level CLIP text tower: tokenizer, shapes, determinism, gradients, registration."""


import pytest
import torch

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import assert_light
from plugins.encoders.text_transformer import BOS, EOS, PAD, TextTransformer

SMALL = {"width": 32, "depth": 2, "heads": 2, "embed_dim": 16, "context_length": 16}


def test_tokenize_layout_and_padding():
    enc = TextTransformer(**SMALL)
    tokens = enc.tokenize(["ab", ""])
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    assert tokens[0, :4].tolist() == [BOS, ord("a"), ord("b"), EOS]
    assert (tokens[0, 4:] == PAD).all()
    assert tokens[1, :2].tolist() == [BOS, EOS] and (tokens[1, 2:] == PAD).all()


def test_tokenize_round_trip_unicode():
    enc = TextTransformer(**SMALL)
    texts = ["a 7", "naïve 数字", "ünï ✓"]
    assert enc.decode(enc.tokenize(texts)) == texts


def test_truncation_keeps_eos_and_drops_cut_characters():
    enc = TextTransformer(**SMALL)
    tokens = enc.tokenize(["x" * 40, "é" * 10])  # 20 bytes of 2-byte characters
    assert tokens.shape == (2, 16)
    assert tokens[0, 0] == BOS and tokens[0, -1] == EOS and (tokens[0, 1:-1] == ord("x")).all()
    assert tokens[1, -1] == EOS
    assert enc.decode(tokens) == ["x" * 14, "é" * 7]


@pytest.mark.parametrize("pool", ["eot", "mean"])
def test_output_shape_and_padding_invariance(pool):
    enc = TextTransformer(pool=pool, **SMALL)
    tokens = enc.tokenize(["the digit seven", "3", "a much longer caption of a digit"])
    out = enc(tokens)
    assert out.shape == (3, 16) and enc.embed_dim == 16
    # padding never leaks into a caption's embedding: a shorter context gives the same output
    torch.testing.assert_close(enc(tokens[1:2, :4]), out[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["eot", "mean"])
def test_captions_get_different_embeddings(pool):
    enc = TextTransformer(pool=pool, **SMALL)
    out = torch.nn.functional.normalize(enc(enc.tokenize(["one", "two", "seven", "the digit 7"])), dim=-1)
    sim = out @ out.T
    assert (sim[~torch.eye(4, dtype=torch.bool)] < 0.9999).all()


def test_deterministic_given_seed():
    texts = ["zero", "nine"]
    torch.manual_seed(0)
    a = TextTransformer(**SMALL)
    torch.manual_seed(0)
    b = TextTransformer(**SMALL)
    torch.manual_seed(1)
    c = TextTransformer(**SMALL)
    torch.testing.assert_close(a(a.tokenize(texts)), b(b.tokenize(texts)), rtol=0, atol=0)
    assert not torch.allclose(a(a.tokenize(texts)), c(c.tokenize(texts)))


@pytest.mark.parametrize("pool", ["eot", "mean"])
def test_gradient_reaches_every_parameter(pool):
    enc = TextTransformer(pool=pool, **SMALL)
    enc(enc.tokenize(["a handwritten four", "the number 2"])).pow(2).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        if name == "token_embed.weight":  # only the rows of the tokens used (here: BOS, not PAD)
            assert p.grad[BOS].abs().sum() > 0 and p.grad[PAD].abs().sum() == 0
        else:
            assert p.grad.abs().sum() > 0, name


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="pool"):
        TextTransformer(pool="cls")
    with pytest.raises(ValueError, match="context_length"):
        TextTransformer(context_length=1)


def test_static_options_match_the_signature():
    target = "plugins.encoders.text_transformer:TextTransformer"
    assert describe(target) == _describe_object(TextTransformer)


def test_registration_imports_no_torch_and_declares_the_tower():
    assert_light("plugins.encoders")
    tower = Registry.load().get("encoder", "text-transformer")
    assert tower.declared["modality"] == "text"
    assert {o.name: o.default for o in tower.options} == {"width": 128, "depth": 2, "heads": 4, "mlp_ratio": 4.0,
                                                         "context_length": 32, "embed_dim": 128, "pool": "eot",
                                                         "head": "linear", "head_layers": 2, "head_hidden": None,
                                                         "head_norm": "batch", "nested_dims": ()}


@pytest.mark.parametrize(("head", "embed_dim"), [("linear", 16), ("mlp", 24), ("none", 32)])
def test_output_shape_per_head_and_nested_dims(head, embed_dim):
    enc = TextTransformer(**{**SMALL, "embed_dim": embed_dim}, head=head, nested_dims=(8,))
    assert enc(enc.tokenize(["a", "bc", "def"])).shape == (3, embed_dim) and enc.nested_dims == (8, embed_dim)


def test_bad_heads_and_nested_dims_are_refused():
    with pytest.raises(ValueError, match="set embed_dim=32"):
        TextTransformer(**SMALL, head="none")
    with pytest.raises(ValueError, match="strictly increasing"):
        TextTransformer(**SMALL, nested_dims=(8, 4))


@pytest.mark.parametrize("pool", ["eot", "mean"])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(pool):
    enc = TextTransformer(pool=pool, **SMALL)
    tokens = enc.tokenize(["a handwritten four", "the number 2", "7"])
    results = []
    for enabled in (False, True):
        enc.zero_grad(set_to_none=True)
        enc.set_grad_checkpointing(enabled)
        out = enc(tokens)
        out.pow(2).sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in enc.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=0, atol=1e-6, msg=key)
