"""What token windows a model can read: ids inside its vocabulary, and no longer than its learned
position table.

An id outside the embedding table, or a window longer than a learned absolute position table
(GPT-2's `wpe`, OPT's `embed_positions`), ends in an IndexError deep inside torch's embedding
lookup; these checks refuse such data by name before any forward pass. Models with rotary or
ALiBi positions have no table, so any length is accepted.
"""

from __future__ import annotations

import torch
from torch import nn


def _input_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return None
    name = next((n for n, m in model.named_modules() if m is emb), None)
    return None if name is None else (name, emb)


def vocab_limit(model: nn.Module) -> int | None:
    """The number of rows of the model's input embedding (ids must lie in [0, this)), or None."""
    found = _input_embedding(model)
    return getattr(found[1], "num_embeddings", None) if found else None


def position_limit(model: nn.Module) -> int | None:
    """The longest window the model's learned position table holds, or None when it has none.

    The position table is an nn.Embedding beside the input embedding (same parent module); OPT's
    keeps `offset` extra rows."""
    found = _input_embedding(model)
    if found is None:
        return None
    name, emb = found
    parent = name.rpartition(".")[0]
    tables = [m for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m is not emb
              and n.rpartition(".")[0] == parent and n != name]
    if not tables:
        return None
    return min(m.num_embeddings - int(getattr(m, "offset", 0) or 0) for m in tables)


def check_token_ids(ids: torch.Tensor, model: nn.Module, what: str) -> None:
    """Refuse token ids outside [0, vocabulary size), naming the first one and where it is."""
    vocab = vocab_limit(model)
    if vocab is None or ids.numel() == 0:
        return
    bad = ((ids < 0) | (ids >= vocab)).nonzero()
    if len(bad):
        at = tuple(int(i) for i in bad[0])
        raise ValueError(f"{what} holds token id {int(ids[at])} at {list(at)}; the model's vocabulary has ids "
                         f"0 to {vocab - 1} (was it tokenized for another model?)")


def check_window_length(length: int, model: nn.Module, what: str) -> None:
    """Refuse windows longer than the model's learned position table."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise ValueError(f"{what}={length} is longer than {type(model).__name__} can read: its learned position "
                         f"table holds {limit} positions; use {what} <= {limit}")


def check_windows(windows: list[torch.Tensor], model: nn.Module) -> None:
    """Calibration windows that the model can read (ids and lengths), else one ValueError naming the first problem."""
    for i, w in enumerate(windows):
        check_token_ids(w, model, f"calibration window {i}")
    if windows:
        check_window_length(max(len(w) for w in windows), model, "seqlen")
