"""Files we write are as readable as any other file the user writes.

transformers' `save_pretrained` writes `model.safetensors` through a private temporary file and
renames it, so it lands with mode 0600 whatever the umask. Saved directories are shared (a cache,
a server that serves them, `cp -r` to another user), so such files get the umask's mode instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(directory: str | os.PathLike) -> None:
    """Give every private (0600) regular file under `directory` the mode 0666 & ~umask."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            path.chmod(mode)
