"""Calibration data: whatever the user passes becomes a list of 1-D LongTensor token windows.

Text (a list of strings, a local file, a `datasets.Dataset`, or the names "wikitext2"/"c4") is
joined, tokenized once, and `n_samples` windows of `seqlen` tokens are drawn at random start
positions from a generator seeded with `seed`, so the same inputs always give the same windows.
Token windows (a list of int lists or a 2-D tensor) are used exactly as given.
"""

from __future__ import annotations

import os
from typing import Any

import torch

DATASET_NAMES = ("wikitext2", "c4")


class CalibrationDataError(ValueError):
    """The calibration data cannot be turned into token windows."""


def read_text_file(path: str | os.PathLike, what: str = "dataset") -> str:
    """The contents of a UTF-8 text file; a binary or otherwise undecodable file is refused by name."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise CalibrationDataError(f"{what} file {os.fspath(path)} is not UTF-8 text (byte 0x{err.object[err.start]:02x} "
                                   f"at offset {err.start}); pass a plain-text file") from None


def sample_windows(token_ids: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """Draw `n_samples` windows of `seqlen` tokens from one long 1-D token sequence."""
    total = int(token_ids.numel())
    if total < seqlen:
        raise CalibrationDataError(
            f"calibration text has {total} tokens, fewer than seqlen={seqlen}; pass more text or a smaller seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (n_samples,), generator=gen).tolist()
    return [token_ids[s:s + seqlen].clone() for s in starts]


def _token_windows(data: Any) -> list[torch.Tensor] | None:
    """Token windows given directly, or None when `data` is not token ids."""
    if isinstance(data, torch.Tensor):
        if (data.dim() != 2 or data.is_floating_point() or data.is_complex() or data.dtype == torch.bool
                or 0 in data.shape):
            raise CalibrationDataError(
                f"a tensor dataset must be 2-D integer token ids (windows × tokens, neither zero); got shape "
                f"{tuple(data.shape)} and dtype {data.dtype}"
            )
        return [row.long() for row in data]
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, (list, tuple, torch.Tensor)) for x in data):
        windows = []
        for i, row in enumerate(data):
            t = row if isinstance(row, torch.Tensor) else torch.tensor(row) if len(row) else torch.empty(0)
            if t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool:
                raise CalibrationDataError(
                    f"dataset[{i}] is not a non-empty list of integer token ids (got {str(row)[:60]!r})"
                )
            windows.append(t.long())
        return windows
    return None


def _text_of(data: Any) -> tuple[str, str]:
    """(text, description) for every text-like form of calibration data."""
    if isinstance(data, (str, os.PathLike)):
        check_source(data)  # a readable file, or a known name on a reachable Hub
        name = os.fspath(data)
        if os.path.isfile(name):
            return read_text_file(name), f"text file {os.path.basename(name)}"
        return _load_named(name), name
    if isinstance(data, (list, tuple)):
        if not data:
            raise CalibrationDataError("dataset is an empty list; pass texts or token windows")
        bad = [i for i, x in enumerate(data) if not isinstance(x, str)]
        if bad:
            raise CalibrationDataError(
                f"dataset mixes types: item {bad[0]} is {type(data[bad[0]]).__name__}; pass a list of strings "
                "or a list of token-id lists"
            )
        return "\n\n".join(data), f"{len(data)} texts"
    import datasets

    if isinstance(data, datasets.Dataset):
        columns = [c for c, f in data.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        column = "text" if "text" in data.column_names else (columns[0] if columns else None)
        if column is None:
            raise CalibrationDataError(f"the datasets.Dataset has no text column (columns: {data.column_names})")
        return "\n\n".join(t for t in data[column] if t), f"datasets.Dataset column {column!r} ({len(data)} rows)"
    raise CalibrationDataError(f"unsupported calibration data of type {type(data).__name__}")


OFFLINE_HINT = ("Offline, pass a list of strings, token windows, a local text file or a datasets.Dataset "
                "(set HF_HUB_OFFLINE=1 to skip the Hub everywhere)")


def check_source(data: Any) -> None:
    """Fail fast, before any model is loaded, on a dataset given by name or path that cannot be read:
    a path that is no file, an unknown name, or a named dataset while the Hub cannot be reached."""
    if not isinstance(data, (str, os.PathLike)):
        return
    name = os.fspath(data)
    if os.path.isfile(name):
        return
    if name not in DATASET_NAMES:
        raise CalibrationDataError(
            f"dataset={name!r} is neither an existing text file nor one of {', '.join(DATASET_NAMES)}"
        )
    from . import hub_access

    reason = hub_access.unreachable_reason()
    if reason:
        raise CalibrationDataError(f"calibration dataset {name!r} is on the Hugging Face Hub, but {reason}. "
                                   f"{OFFLINE_HINT}.")


def _load_named(name: str) -> str:
    import datasets

    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        else:
            ds = datasets.load_dataset(
                "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
            ).select(range(20000))
    except Exception as exc:  # network errors come in many types
        raise CalibrationDataError(
            f"could not load calibration dataset {name!r} with datasets.load_dataset ({type(exc).__name__}: "
            f"{exc}). {OFFLINE_HINT}."
        ) from exc
    return "\n\n".join(t for t in ds["text"] if t)


def prepare_calibration(data: Any, tokenizer: Any, n_samples: int, seqlen: int, seed: int):
    """Return (windows, description): the token windows and a short JSON-safe record of them."""
    if data is None:
        raise CalibrationDataError("no calibration data: set AstroQuantConfig(dataset=...)")
    windows = _token_windows(data)
    if windows is not None:
        lengths = sorted({len(w) for w in windows})
        return windows, {"source": "token windows", "n_samples": len(windows), "seqlen": lengths[-1]}
    text, source = _text_of(data)
    if not text.strip():
        raise CalibrationDataError(f"calibration data ({source}) contains no text")
    if tokenizer is None:
        raise CalibrationDataError(
            f"calibration data ({source}) is text, so AstroQuantConfig needs tokenizer=... to tokenize it"
        )
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as exc:  # missing files, no network, not a tokenizer: all end here
            raise CalibrationDataError(f"could not load tokenizer {tokenizer!r} with AutoTokenizer "
                                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    windows = sample_windows(ids, n_samples, seqlen, seed)
    return windows, {"source": source, "n_samples": n_samples, "seqlen": seqlen, "seed": seed}


def batch_windows(windows: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack windows into (batch, seqlen) tensors; windows of different lengths go to different batches."""
    return [torch.stack([windows[k] for k in rows]) for rows in batch_rows([len(w) for w in windows], batch_size)]


def batch_rows(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Which windows (by position, from their `lengths`) each batch of `batch_windows` stacks, row by row."""
    by_len: dict[int, list[int]] = {}
    for k, n in enumerate(lengths):
        by_len.setdefault(n, []).append(k)
    return [group[i:i + batch_size] for _, group in sorted(by_len.items()) for i in range(0, len(group), batch_size)]
