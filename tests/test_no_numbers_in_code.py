"""Measured figures live in docs/results.md (rendered from benchmarks/results/), never in the package:
a help text, error message, docstring or comment says what an option does and links to the
results, so a rerun of the benchmarks never leaves a stale number in the code.

What counts as a measured figure (every perplexity we report is a decimal number of 19 or more with
one or two decimals, e.g. 21.37, 221.7; timings and gains are given as percentages):

- in an option's help or detail text (the shell help, the config docstring, docs/options.md): a
  decimal number of 1 or more, or a percentage (`15%`, `5 %`). Settings below 1 (0.1, 0.25) stay;
- in any string, docstring or comment of `hf_astroquant/`: a decimal number of 10 or more with one
  or two decimals, unless a size unit follows it (`117.3 KiB` in a formatting example).
"""

import io
import re
import tokenize
from pathlib import Path

from hf_astroquant import AstroQuantConfig

PACKAGE = Path(__file__).resolve().parent.parent / "hf_astroquant"
OPTION_FIGURE = re.compile(r"(?<![\w.])[1-9]\d*\.\d+(?![\w.])|\d+\s?%")
PERPLEXITY_LIKE = re.compile(r"(?<![\w.])[1-9]\d+\.\d{1,2}(?![\w.])(?!\s*(?:[KMGT]i?B|B)\b)")
TEXT_TOKENS = {tokenize.STRING, tokenize.COMMENT} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def option_figures(text: str) -> list[str]:
    return OPTION_FIGURE.findall(text)


def perplexity_like(source: str) -> list[tuple[int, str]]:
    """(line, figure) for each perplexity-like figure in the source's strings and comments."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in TEXT_TOKENS:
            found += [(tok.start[0], m.group()) for m in PERPLEXITY_LIKE.finditer(tok.string)]
    return found


def test_the_checks_catch_the_figures_they_are_for():
    assert option_figures("0.1 gave a mean of 21.37 over five seeds (about 15% slower)") == ["21.37", "15%"]
    assert option_figures("damping 0.1, alpha 0.25, offsets in [-0.5, 0.5], 1e-3, 2^(bits-1)") == []
    assert perplexity_like('x = 1  # 221.7 against 208.8\n') == [(1, "221.7"), (1, "208.8")]
    assert perplexity_like('"W2 g32 best 174.07 -> 136.26"\n') == [(1, "174.07"), (1, "136.26")]
    assert perplexity_like('"""\'117.3 KiB\', torch 2.13, 1.35 GiB, 6.5× the state"""\n') == []


def test_no_option_help_states_a_measured_figure():
    bad = {o.name: option_figures(f"{o.help} {o.detail}") for o in AstroQuantConfig.OPTIONS}
    assert not {k: v for k, v in bad.items() if v}, "link docs/results.md#... instead of stating the figure"


def test_no_string_or_comment_in_the_package_states_a_perplexity():
    bad = {f"{path.relative_to(PACKAGE.parent)}:{line}": figure for path in sorted(PACKAGE.rglob("*.py"))
           for line, figure in perplexity_like(path.read_text(encoding="utf-8"))}
    assert not bad, "link docs/results.md#... instead of stating the figure"
