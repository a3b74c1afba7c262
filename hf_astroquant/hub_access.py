"""Whether the Hugging Face Hub can be reached, found out once and fast.

`datasets.load_dataset` and `from_pretrained` retry an unreachable Hub for up to a minute, printing
warnings each time, before their (clear) error. Named datasets ask here first: `HF_HUB_OFFLINE`
(or `HF_DATASETS_OFFLINE`) is honoured, and otherwise one TCP connection to the Hub's endpoint,
with a short timeout, decides.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 5.0
_TRUE = ("1", "on", "yes", "true")


def offline_setting() -> str | None:
    """The name of the environment variable that puts the Hub offline, or None."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def unreachable_reason() -> str | None:
    """None when the Hub accepts a connection; else why it cannot be used, in a few words."""
    setting = offline_setting()
    if setting:
        return f"{setting} is set"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({type(exc).__name__}: {exc})"
    return None


def offline_unless_reachable() -> str | None:
    """Put this process in Hugging Face's offline mode when the Hub cannot be reached, so that Hub ids
    resolve from the local cache at once (or fail at once) instead of after a minute of retries.
    Returns the reason when it did."""
    from huggingface_hub import constants

    if offline_setting():
        constants.HF_HUB_OFFLINE = True  # read once at import: a variable set later must still count
        return None
    reason = unreachable_reason()
    if reason:
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
    return reason
