"""`push`: a saved folder to the Hub, in one commit."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import WorkflowError


@dataclass
class PushResult:
    directory: Path
    repo_id: str
    commit: Any  # huggingface_hub's CommitInfo
    rows: list[tuple[str, Any]]  # the table `hf-astroquant push` prints


def push(directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | bool | None = None,
         commit_message: str | None = None, revision: str | None = None, create_pr: bool = False) -> PushResult:
    """Upload the saved `directory` to the Hub model repository `repo_id` (created if missing) in one
    commit, with its card naming the repository (`hf-astroquant push`). An output of ours uploads only
    the files it recorded writing."""
    from ..export.hub import push_folder

    folder = Path(directory)
    if not (folder / "config.json").is_file():
        raise WorkflowError(f"{folder} is not a saved model directory (no config.json)")
    info = push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message,
                       revision=revision, create_pr=create_pr)
    return PushResult(directory=folder, repo_id=repo_id, commit=info,
                      rows=[("folder", str(folder)), ("repository", repo_id),
                            ("commit", getattr(info, "commit_url", info))])
