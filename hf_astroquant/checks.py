"""Value checks for options: each says what it allows, normalizes what it accepts, refuses the rest,
and knows values it must refuse (for the generated bad-value tests) and how the shell types it.

A check is called with the user's value and returns the value to store, or raises `Invalid`
with the text of what is allowed; the config turns that into a ValueError naming the option.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Invalid(Exception):
    """A refused value: `allowed` says what would be accepted; `shown` replaces the value in the message."""

    def __init__(self, allowed: str, shown: Any = None):
        super().__init__(allowed)
        self.allowed, self.shown = allowed, shown


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def optional_int_word(words: tuple[str, ...]) -> Callable[[str], Any]:
    """A shell type: an integer, or one of `words` for None."""

    def parse(text: str):
        if text.lower() in words:
            return None
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer or {' / '.join(words)}") from None

    parse.__name__ = "integer"
    return parse


@dataclass(frozen=True)
class OneOf:
    """Exactly one of `values` (same type: 4.0 is not 4, True is not 1)."""

    values: tuple

    @property
    def allowed(self) -> str:
        return ", ".join(str(v) if _is_int(v) else repr(v) for v in self.values)

    def __call__(self, v: Any) -> Any:
        if not any(type(v) is type(x) and v == x for x in self.values):
            raise Invalid(self.allowed)
        return v

    def bad_examples(self) -> list:
        first = self.values[0]
        if _is_int(first):
            return [max(self.values) + 1, str(first), float(first), None]
        return ["not-" + str(first), None, 1]

    def flag(self) -> dict:
        kind = type(self.values[0])
        return dict(choices=self.values) if kind is str else dict(type=kind, choices=self.values)


@dataclass(frozen=True)
class Boolean:
    allowed: str = "True or False"

    def __call__(self, v: Any) -> bool:
        if not isinstance(v, bool):
            raise Invalid(self.allowed)
        return v

    def bad_examples(self) -> list:
        return [1, "yes", None]

    def flag(self) -> dict:
        return dict(action=argparse.BooleanOptionalAction)


@dataclass(frozen=True)
class Integer:
    """An integer in [`minimum`, `maximum`], or one of `also` (special values such as -1).

    `maximum` bounds the options whose value scales the work or the memory of a run (beam width,
    steps, candidates, windows), so a slip such as 10**6 is refused at once instead of exhausting
    the machine hours later."""

    minimum: int | None = None
    also: tuple[int, ...] = ()
    text: str = ""  # the allowed text, when the default wording does not say it well
    maximum: int | None = None

    @property
    def allowed(self) -> str:
        if self.text:
            return self.text
        if self.maximum is not None:
            return f"an integer in [{self.minimum}, {self.maximum}]"
        return "an integer" + ("" if self.minimum is None else f" >= {self.minimum}")

    def __call__(self, v: Any) -> int:
        if not _is_int(v) or (v not in self.also and (self.minimum is not None and v < self.minimum
                                                       or self.maximum is not None and v > self.maximum)):
            raise Invalid(self.allowed)
        return v

    def bad_examples(self) -> list:
        low = [self.minimum - 1] if self.minimum is not None and self.minimum - 1 not in self.also else []
        high = [self.maximum + 1, 10**6 * self.maximum] if self.maximum is not None else []
        return low + high + [float(self.minimum or 1), str(self.minimum or 1), True]

    def flag(self) -> dict:
        return dict(type=int, metavar="N")


@dataclass(frozen=True)
class Number:
    """A real number (not a bool) in the interval; stored as a float."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    text: str = ""

    @property
    def allowed(self) -> str:
        if self.text:
            return self.text
        if math.isinf(self.low) and math.isinf(self.high):
            return "a finite number"
        if math.isinf(self.high):
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return (f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def ok(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def __call__(self, v: Any) -> float:
        if not _is_real(v) or not self.ok(float(v)):
            raise Invalid(self.allowed)
        return float(v)

    def bad_examples(self) -> list:
        out = [float("nan"), "1", True]
        if not math.isinf(self.low):
            out.append(self.low if self.low_open else self.low - 1)
        if not math.isinf(self.high):
            out.append(self.high + 1)
        if math.isinf(self.high):
            out.append(float("inf"))
        return out

    def flag(self) -> dict:
        return dict(type=float, metavar="X")


@dataclass(frozen=True)
class Maybe:
    """None (typed in the shell as one of `words`), or what `inner` allows."""

    inner: Any
    words: tuple[str, ...] = ("none",)

    @property
    def allowed(self) -> str:
        return f"None or {self.inner.allowed}"

    def __call__(self, v: Any) -> Any:
        if v is None:
            return None
        try:
            return self.inner(v)
        except Invalid as err:
            raise Invalid(self.allowed, err.shown) from None

    def bad_examples(self) -> list:
        return [b for b in self.inner.bad_examples() if b is not None and b not in self.words]

    def flag(self) -> dict:
        kw = self.inner.flag()
        if kw.get("type") is int:
            kw = dict(kw, type=optional_int_word(self.words), metavar="{N," + ",".join(self.words) + "}")
        return kw


@dataclass(frozen=True)
class Custom:
    """A check written as a function (value -> stored value, raising Invalid)."""

    fn: Callable[[Any], Any]
    allowed: str
    bad: tuple = ()
    shell: dict = field(default_factory=dict)

    def __call__(self, v: Any) -> Any:
        return self.fn(v)

    def bad_examples(self) -> list:
        return list(self.bad)

    def flag(self) -> dict:
        return dict(self.shell)


# ------------------------------------------------------------------ the options' own custom checks

ASYM_ALPHA_WORDS = ("auto", "projected")
_ASYM_ALLOWED = "None, a number in [0, 1], 'auto' or 'projected'"


def check_asym_alpha(v: Any) -> Any:
    if v is None or isinstance(v, str) and v in ASYM_ALPHA_WORDS:
        return v
    if _is_real(v) and 0 <= v <= 1:
        return float(v)
    raise Invalid(_ASYM_ALLOWED)


def shell_asym_alpha(text: str):
    if text in ASYM_ALPHA_WORDS:
        return text
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1], 'auto', 'projected' or 'none'") from None


def check_module_patterns(v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(m, str) for m in v):
        raise Invalid("None or a list of module names/patterns (strings)")
    for pattern in v:  # transformers matches each one as a regular expression
        if not pattern:
            raise Invalid("module names or regular expressions, none empty (an empty one matches every module)",
                          shown=list(v))
        try:
            re.compile(pattern)
        except re.error as err:
            raise Invalid(f"module names or valid regular expressions; {pattern!r} is not one ({err})",
                          shown=list(v)) from None
    return list(v)


def check_directory(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        raise Invalid("None or a directory path")
    return os.fspath(v)




_DATASET_ALLOWED = ("a list of strings, a list of token-id lists, a 2-D tensor of token ids, a text file path, "
                    "a datasets.Dataset with a text column, or one of 'wikitext2', 'c4'")


def check_dataset(v: Any) -> Any:
    """Shallow type check; the contents are checked when calibration runs."""
    import torch

    if v is None or isinstance(v, (str, os.PathLike, torch.Tensor, list, tuple)):
        return v
    try:
        import datasets

        if isinstance(v, datasets.Dataset):
            return v
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    raise Invalid(_DATASET_ALLOWED, shown=type(v).__name__)


def check_tokenizer(v: Any) -> Any:
    if v is None or isinstance(v, (str, os.PathLike)) or callable(v):
        return v
    raise Invalid("None, a tokenizer, or a tokenizer name or path", shown=type(v).__name__)
