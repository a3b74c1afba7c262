"""Files we write are as readable as any other file the user writes, and no other file changes mode.

transformers' `save_pretrained` writes `model.safetensors` through a private temporary file and
renames it, so it lands with mode 0600 whatever the umask. Saved directories are shared (a cache,
a server that serves them, `cp -r` to another user), so such files get the umask's mode instead.

Only the files a save wrote are touched: a folder saved into may hold the user's own private
files (`.env`, `.ssh/id_ed25519`, mode 0600 on purpose), and those keep their mode. What a save
wrote is told by comparing the folder before and after it (`snapshot`, `written_since`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

FileState = tuple[int, int, int]  # (inode, mtime in ns, size): a file replaced or rewritten changes one of them


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def snapshot(directory: str | os.PathLike) -> dict[str, FileState]:
    """{path relative to `directory`: its state} for every regular file under it (symbolic links are
    neither followed nor listed); empty when `directory` does not exist."""
    root = Path(directory)
    states: dict[str, FileState] = {}
    for folder, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(folder, name)
            st = path.lstat()
            if path.is_symlink() or not path.is_file():
                continue
            states[path.relative_to(root).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return states


def written_since(directory: str | os.PathLike, before: dict[str, FileState]) -> list[Path]:
    """The regular files under `directory` that are new or changed since `before = snapshot(directory)`."""
    root = Path(directory)
    return [root / rel for rel, state in snapshot(root).items() if before.get(rel) != state]


def apply_umask(paths: Iterable[str | os.PathLike]) -> None:
    """Give each private (0600) regular file of `paths` the mode 0666 & ~umask; other files, links and
    modes stay as they are."""
    mode = 0o666 & ~current_umask()
    if mode == 0o600:
        return
    for path in map(Path, paths):
        if not path.is_symlink() and path.is_file() and path.stat().st_mode & 0o777 == 0o600:
            path.chmod(mode)
