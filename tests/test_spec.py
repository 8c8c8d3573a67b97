"""Run specs: parsing by type hint, defaults, grids, hashes and the composition check (real registry)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.errors import UserError
from orchestrator.options import is_secret, mapping_text, masked
from orchestrator.registry import Option, Registry
from orchestrator.spec import expand_grid, parse_choice, parse_value, resolve_run, spec_hash


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load()


def test_parse_choice_keeps_bracketed_lists_together() -> None:
    assert parse_choice("vit:depth=6,dims=[512,256],pool=mean") == ("vit", {"depth": "6", "dims": "[512,256]",
                                                                            "pool": "mean"})
    assert parse_choice("infonce") == ("infonce", {})
    assert parse_choice('mine:weights={"a":1,"b":[2,3]},x=3') == ("mine", {"weights": '{"a":1,"b":[2,3]}', "x": "3"})


@pytest.mark.parametrize("text", [":depth=2", "vit:depth", "vit:depth=1,depth=2", "vit:=3"])
def test_parse_choice_refuses_malformed_text(text: str) -> None:
    with pytest.raises(UserError):
        parse_choice(text)


@pytest.mark.parametrize("tp, raw, value", [
    (int, "6", 6), (float, "0.05", 0.05), (bool, "false", False), (bool, "Yes", True), (str, "x", "x"),
    (Literal["cls", "mean"], "mean", "mean"), (Literal[0, 1, 2, 3], "2", 2), (int | None, "none", None),
    (int | None, "3", 3), (tuple[int, ...], "[512,256]", [512, 256]),
])
def test_values_are_parsed_by_type_hint(tp: object, raw: str, value: object) -> None:
    assert parse_value(Option("x", tp, None), raw, "here") == value


def test_a_mapping_option_nests_dotted_keys_and_reads_json_values() -> None:
    option = Option("x", dict[str, Any], None)
    raw = 'a.b=5e8,a.c=true,a.d.e=[1,2],f=cpu,g="cpu",h={"i":null,"j":{"k":1}}'
    value = parse_value(option, raw, "--x")
    assert value == {"a": {"b": 5e8, "c": True, "d": {"e": [1, 2]}}, "f": "cpu", "g": "cpu",
                     "h": {"i": None, "j": {"k": 1}}}
    assert parse_value(option, mapping_text(value), "--x") == value  # the run name's form reads back
    # one config, one hash: the dotted and the object spelling resolve to the same value
    assert parse_value(option, 'a.b=1,a.c=2', "--x") == parse_value(option, 'a={"b":1,"c":2}', "--x") == \
        parse_value(option, '{"a":{"b":1,"c":2}}', "--x")


@pytest.mark.parametrize("raw, message", [
    ("overlap_comm", "is not key.path=value"), ("a.=1", "is not key.path=value"), ("a=", "is not key.path=value"),
    ("a.b=1,a.b=2", "a.b is given twice"), ("a=1,a.b=2", "a is given a value and keys"),
    ("a=NaN", "NaN is not a finite number"), ("a=1e400", "a is not a finite number"),
    ("a=" + "[" * 5000, "the limit is"), ('{"a":1', "is not a JSON object"), ("{", "is not a JSON object"),
])
def test_malformed_mappings_are_user_errors(raw: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        parse_value(Option("x", dict[str, Any], None), raw, "--x")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parsing_any_mapping_text_raises_only_user_errors(text: str) -> None:
    try:
        parse_value(Option("x", dict[str, Any], None), text, "--x")
    except UserError:
        pass


def test_paths_become_absolute(workdir: Path) -> None:
    assert parse_value(Option("root", Path, None), "data/val", "here") == str(workdir / "data" / "val")


@pytest.mark.parametrize("tp, raw", [(int, "six"), (float, "nan"), (bool, "maybe"), (Literal["a", "b"], "c"),
                                     (int, "")])
def test_wrong_types_are_user_errors(tp: object, raw: str) -> None:
    with pytest.raises(UserError, match="option x="):
        parse_value(Option("x", tp, None), raw, "--encoder vit")


def test_defaults_make_a_complete_run(registry: Registry) -> None:
    spec = resolve_run(registry, {}, {})
    assert [spec[s]["name"] for s in ("data", "encoder", "text_encoder", "loss", "sampler")] == \
        ["mnist", "vit", "text-transformer", "infonce", "random"]
    assert [e["name"] for e in spec["eval"]] == ["zs"]
    assert spec["encoder"]["plugin"]["distribution"] == "orch"
    assert spec["trainer"]["warmup"] == spec["trainer"]["steps"] // 10
    assert spec["encoder"]["options"]["depth"] == registry.get("encoder", "vit").option("depth").default


def test_hash_is_stable_and_changes_with_any_option(registry: Registry) -> None:
    a = resolve_run(registry, {"encoder": "vit:depth=2"}, {})
    b = resolve_run(registry, {"encoder": "vit:depth=2"}, {})
    c = resolve_run(registry, {"encoder": "vit:depth=3"}, {})
    assert spec_hash(a) == spec_hash(b) != spec_hash(c)
    default_depth = registry.get("encoder", "vit").option("depth").default
    explicit = resolve_run(registry, {"encoder": f"vit:depth={default_depth}"}, {})
    assert spec_hash(explicit) == spec_hash(resolve_run(registry, {}, {}))  # defaults are filled in


def test_repeated_flags_make_the_cartesian_product(registry: Registry) -> None:
    runs = expand_grid(registry, {"encoder": ["vit:depth=1", "vit:depth=2"], "eval": ["zs", "zs:split=train"]},
                       {"lr": ["1e-3", "3e-4"], "seed": ["0"]})
    assert len(runs) == 4
    assert len({r.hash for r in runs}) == 4
    assert all(len(r.spec["eval"]) == 2 for r in runs)  # --eval is a list per run, not a grid axis
    assert "depth=1" in runs[0].name


def test_unknown_plugin_suggests_the_nearest_name(registry: Registry) -> None:
    with pytest.raises(UserError, match="unknown loss 'infonse': did you mean infonce"):
        resolve_run(registry, {"loss": "infonse"}, {})


def test_unknown_option_lists_valid_keys_with_defaults(registry: Registry) -> None:
    with pytest.raises(UserError, match=r"unknown option 'dpeth'; valid options: .*depth=\d+"):
        resolve_run(registry, {"encoder": "vit:dpeth=3"}, {})


def test_text_encoder_as_image_tower_is_refused(registry: Registry) -> None:
    with pytest.raises(UserError, match="is a text encoder"):
        resolve_run(registry, {"encoder": "text-transformer"}, {})


def test_mismatched_embedding_widths_are_refused(registry: Registry) -> None:
    with pytest.raises(UserError, match="embeds into 64 dims but text encoder"):
        resolve_run(registry, {"encoder": "vit:embed_dim=64"}, {})


@pytest.mark.parametrize("trainer, message", [
    ({"steps": "0"}, "--steps must be at least 1"),
    ({"batch_size": "100", "gpus": "3"}, "not divisible"),
    ({"lr": "-1"}, "--lr must be positive"),
    ({"warmup": "10", "steps": "10"}, "--warmup 10 must be smaller"),
    ({"precision": "fp8"}, "one of auto, fp32, bf16, fp16"),
])
def test_trainer_options_are_checked(registry: Registry, trainer: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_run(registry, {}, trainer)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_choice_raises_only_user_errors(text: str) -> None:
    try:
        parse_choice(text)
    except UserError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_resolving_any_encoder_text_raises_only_user_errors(text: str) -> None:
    registry = Registry.load()
    try:
        resolve_run(registry, {"encoder": "vit:" + text}, {})
    except UserError:
        pass


@pytest.mark.parametrize("name, secret", [("api_key", True), ("hf_token", True), ("db_password", True),
                                          ("client-secret", True), ("max_tokens", False), ("tokenizer", False),
                                          ("keep", False), ("depth", False)])
def test_secret_looking_option_names(name: str, secret: bool) -> None:
    assert is_secret(name) is secret


def test_masked_spec_hides_secret_values_at_any_depth() -> None:
    spec = {"data": {"name": "hub", "options": {"api_key": "sk-123", "root": "/d"}},
            "eval": [{"options": {"token": 1}}]}
    assert masked(spec) == {"data": {"name": "hub", "options": {"api_key": "***", "root": "/d"}},
                            "eval": [{"options": {"token": "***"}}]}
