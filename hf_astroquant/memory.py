"""Giving memory back: freed heap to the OS, a solved Linear's full-size weight."""

from __future__ import annotations

import torch
from torch import nn

def trim_heap() -> None:
    """Hand memory that glibc keeps after large frees back to the OS. Without it the heap holds
    every freed solver buffer and hidden state for reuse, and RSS climbs block after block well
    past what is live. A no-op where malloc_trim does not exist."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_weight(linear: nn.Linear) -> None:
    """Free a solved Linear's full-size weight: its packed layer has replaced it in the block."""
    linear.weight.data = torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device)
