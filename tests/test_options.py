"""Options come from one table (`options.OPTIONS`): a new option there reaches the config, the CLI,
the options table and the bad-value tests; presets are measured rows of the benchmark grid."""

import argparse
import sys
from pathlib import Path

import pytest

from hf_astroquant import AstroQuantConfig, cli
from hf_astroquant.checks import Integer, OneOf
from hf_astroquant.options import Option, options_table
from hf_astroquant.presets import _GRID, PRESETS, QUALITIES
from test_bad_input import bad_value_cases

ROOT = Path(__file__).resolve().parent.parent


class WiderConfig(AstroQuantConfig):
    OPTIONS = AstroQuantConfig.OPTIONS + (
        Option("lookahead", "solver", 2, Integer(0), "columns of look-ahead in a made-up solver"),
        Option("flavour", "grid", "plain", OneOf(("plain", "fancy")), "a made-up grid flavour"),
    )


def test_an_option_added_in_a_subclass_is_a_keyword_a_saved_key_and_checked():
    cfg = WiderConfig(lookahead=5, bits=3)
    assert (cfg.lookahead, cfg.flavour, cfg.bits) == (5, "plain", 3)
    assert cfg.to_dict()["lookahead"] == 5 and WiderConfig.from_dict(cfg.to_dict()).lookahead == 5
    with pytest.raises(ValueError, match=r"lookahead=-1 is not valid; allowed: an integer >= 0"):
        WiderConfig(lookahead=-1)
    with pytest.raises(TypeError, match="lookahead"):
        AstroQuantConfig(lookahead=1)  # the parent is unchanged
    assert "lookahead" in str(__import__("inspect").signature(WiderConfig))
    assert "lookahead" in WiderConfig.__doc__ and "lookahead" not in AstroQuantConfig.__doc__


def test_an_option_added_in_a_subclass_gets_a_shell_flag_with_help():
    parser = cli.ShellParser(prog="t")
    cli.add_config_flags(parser, WiderConfig)
    args = parser.parse_args(["--lookahead", "7", "--flavour", "fancy"])
    cfg = cli.config_from_args(args, WiderConfig)
    assert (cfg.lookahead, cfg.flavour) == (7, "fancy")
    text = parser.format_help()
    assert "--lookahead N" in text and "made-up solver (default: 2)" in text and "{plain,fancy}" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--flavour", "odd"])


def test_an_option_added_in_a_subclass_is_in_the_table_and_the_bad_value_cases():
    table = options_table(WiderConfig.OPTIONS)
    assert "| `lookahead` | `--lookahead` | `2` | an integer >= 0 | columns of look-ahead" in table
    cases = [c for c in bad_value_cases(WiderConfig) if c[0] in ("lookahead", "flavour")]
    assert {c[0] for c in cases} == {"lookahead", "flavour"} and len(cases) >= 5
    for name, value, allowed in cases:
        with pytest.raises(ValueError, match=allowed):
            WiderConfig(**{name: value})


def test_every_option_has_one_group_help_and_a_default_its_own_check_accepts():
    from hf_astroquant.options import GROUPS

    names = [o.name for o in AstroQuantConfig.OPTIONS]
    assert len(names) == len(set(names))
    for o in AstroQuantConfig.OPTIONS:
        assert o.group in GROUPS and len(o.help) > 15, o.name
        assert o.check(o.default) == o.default, o.name
    assert {o.name for o in AstroQuantConfig.OPTIONS if not o.saved} == {
        "dataset", "tokenizer", "backend", "resume_dir"}


def test_the_docs_options_table_is_the_generated_one():
    text = (ROOT / "docs" / "options.md").read_text()
    assert options_table(detail=True) in text
    readme = (ROOT / "README.md").read_text()
    assert options_table() in readme


# ------------------------------------------------------------------ presets

def _bench_rows():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_quality import ROWS
    finally:
        sys.path.pop(0)
    return ROWS


@pytest.mark.parametrize("quality,bits", sorted(PRESETS))
def test_every_preset_is_exactly_a_measured_row_of_the_benchmark_grid(quality, bits):
    options, row = PRESETS[(quality, bits)]
    measured = AstroQuantConfig(**_bench_rows()[row]).to_dict()
    preset = AstroQuantConfig.recommended(bits=bits, quality=quality).to_dict()
    # the record of what the preset chose: every option it sets, none overridden here
    assert preset.pop("preset") == {"quality": quality, "bits": bits, "options": sorted(set(options) | set(_GRID))}
    measured.pop("preset")
    if preset["transform"] == "auto":  # on the benchmark's pre-norm Llama, auto is the rotation (test_families)
        assert measured["transform"] == "rotate", row
        preset["transform"] = "rotate"
    assert preset == measured, row
    assert options["bits"] == bits


def _benchmarks(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_the_results_have_every_preset_row():
    measured = {r["label"] for r in _benchmarks("results_rows").read_rows()}  # a row's label names its bench row
    assert {row for _, row in PRESETS.values()} <= measured


def test_every_generated_table_is_rendered_from_the_current_rows():
    """README.md and docs/*.md hold what `python benchmarks/update_readme.py` renders (its --check)."""
    stale = [f.name for f, text in _benchmarks("update_readme").rendered_files().items() if f.read_text() != text]
    assert not stale, f"{stale}: run python benchmarks/update_readme.py"


def test_every_result_row_has_the_schema_and_a_command_in_benchmarks():
    rows = _benchmarks("results_rows").read_rows()
    assert rows and all(set(r) == {"table", "label", "columns", "command", "sitting", "machine"} for r in rows)
    assert len({(r["table"], r["label"]) for r in rows}) == len(rows)
    assert all("benchmarks/" in r["command"] for r in rows)


def test_recommended_takes_overrides_and_refuses_bad_values():
    cfg = AstroQuantConfig.recommended(bits=3, quality="best", group_size=128, dataset=["text"])
    assert (cfg.bits, cfg.group_size, cfg.method, cfg.astro, cfg.dataset) == (3, 128, "gptaq", True, ["text"])
    with pytest.raises(ValueError, match=r"quality='max' is not valid; allowed: 'fast', 'balanced', 'best'"):
        AstroQuantConfig.recommended(bits=4, quality="max")
    with pytest.raises(ValueError, match=r"bits=8 is not valid; allowed: 2, 3, 4"):
        AstroQuantConfig.recommended(bits=8)
    with pytest.raises(ValueError, match="group_size=0"):
        AstroQuantConfig.recommended(bits=4, group_size=0)
    assert set(QUALITIES) == {q for q, _ in PRESETS}


def test_the_cli_preset_flag_uses_bits_and_lets_other_flags_override():
    parser = cli.build_parser()
    args = parser.parse_args(["quantize", "m", "--out", "o", "--preset", "best", "--bits", "3", "--no-astro"])
    cfg = cli.config_from_args(args)
    assert (cfg.bits, cfg.method, cfg.transform, cfg.astro, cfg.group_size) == (3, "gptaq", "auto", False, 64)
    assert cfg.preset["quality"] == "best" and "astro" not in cfg.preset["options"]  # --no-astro is the caller's
    args = parser.parse_args(["quantize", "m", "--out", "o", "--preset", "fast"])
    assert cli.config_from_args(args).to_dict() == AstroQuantConfig.recommended(4, "fast").to_dict()
    assert isinstance(args, argparse.Namespace)


def test_defaults_are_the_fast_preset_but_for_the_group_size():
    fast = AstroQuantConfig.recommended(bits=4, quality="fast").to_dict()
    default = AstroQuantConfig(group_size=64).to_dict()
    assert fast.pop("preset")["quality"] == "fast" and default.pop("preset") is None
    assert fast == default


def test_no_function_in_the_package_is_longer_than_60_lines():
    import ast

    long = []
    for path in (ROOT / "hf_astroquant").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long
