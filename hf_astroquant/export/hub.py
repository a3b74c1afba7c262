"""The Hub: what the card says about the base model, and the upload.

`base_model_info` finds the base model's Hub id and licence for the card (from a Hub id, a local
directory or the Hub cache). The save hooks that write the card and report on `save_pretrained` /
`push_to_hub` are in checkpoint/save_hooks.py; they upload with `push_folder`.

No remote code is written: loading needs `import hf_astroquant`, never `trust_remote_code=True`,
which would run whatever Python file a repository holds (anyone can upload a hostile one under a
card that looks like ours).

`push_folder` uploads a directory in one commit through `huggingface_hub.HfApi.create_commit`,
with the card re-rendered so that its usage snippet names the repository.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

from ..output_dir import MANIFEST, output_files
from .card import REPORT_FILE, is_ours, render_card

logger = logging.getLogger("hf_astroquant")
_SKIP_UPLOAD = re.compile(r"(^|/)(\.|__pycache__/)|\.tmp$")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id_of(text: Any) -> str | None:
    """`text` as a Hub model id ("org/name"), from an id or a huggingface.co URL; else None. A string
    naming an existing local path is never taken for an id."""
    if not isinstance(text, str) or not text:
        return None
    m = re.match(r"^https?://(?:www\.)?huggingface\.co/(?!datasets/|spaces/)([\w.-]+/[\w.-]+)", text)
    if m:
        return m.group(1)
    if _HUB_ID.fullmatch(text) and not Path(text).exists():
        return text
    return None


def base_model_info(name_or_path: str | os.PathLike | None) -> dict[str, Any]:
    """What the card says about the base model: `source` (a Hub id, or a local directory's name:
    never a path of this machine), and when known `base_model` (a Hub id) and `license`.

    A local directory's Hub id comes from the Hub cache's folder names, its own model card's
    `base_model`, or config.json's `_name_or_path`; a Hub card is read only when the Hub is reachable."""
    info: dict[str, Any] = {"source": None, "base_model": None, "license": None}
    if not name_or_path:
        return info
    path = Path(name_or_path)
    if path.exists():
        info["source"] = path.resolve().name
        # A snapshot in the Hub cache: .../models--org--name/snapshots/<rev>
        m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", path.resolve().as_posix())
        if m:
            info["base_model"] = f"{m.group(1)}/{m.group(2)}"
        readme = path / "README.md" if path.is_dir() else None
        if readme is not None and readme.is_file() and not is_ours(readme):
            data = ModelCard.load(readme).data
            info["license"] = getattr(data, "license", None)
            bm = getattr(data, "base_model", None)
            info["base_model"] = info["base_model"] or hub_id_of(bm)
        config = path / "config.json" if path.is_dir() else None
        if info["base_model"] is None and config is not None and config.is_file():
            try:
                info["base_model"] = hub_id_of(json.loads(config.read_text()).get("_name_or_path"))
            except (ValueError, AttributeError):  # not a JSON object: nothing to learn from it
                pass
        if info["base_model"]:
            info["source"] = info["base_model"]
        return info
    info["source"] = str(name_or_path)
    if hub_id_of(str(name_or_path)):
        info["base_model"] = str(name_or_path)
        from .. import hub_access

        reason = hub_access.unreachable_reason()
        if reason:
            logger.info("not reading the base model card of %s: %s", name_or_path, reason)
            return info
        try:
            info["license"] = getattr(ModelCard.load(str(name_or_path)).data, "license", None)
        except Exception as err:  # gated, or no card: the licence stays unknown
            logger.info("could not read the base model card of %s: %s", name_or_path, err)
    return info


def push_folder(folder: str | Path, repo_id: str, private: bool | None = None, token: str | bool | None = None,
                commit_message: str | None = None, revision: str | None = None, create_pr: bool = False,
                tags: list[str] | None = None):
    """Create (if needed) the model repo `repo_id` and upload `folder` in one commit; a card written
    by hf_astroquant is re-rendered so its usage snippet loads `repo_id`. Returns the CommitInfo."""
    from .. import __version__

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a saved model directory")
    if not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repository id ('name' or 'namespace/name')")
    api = HfApi(token=token, library_name="hf_astroquant", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    operations = []
    readme = folder / "README.md"
    card_bytes = None
    if is_ours(readme):
        card = render_card(folder, model_id=repo_id)
        if tags:
            card.data.tags = sorted(set(card.data.tags or []) | set(tags))
        card_bytes = str(card).encode()
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_bytes))
    ours = output_files(folder)  # a CLI output lists what it wrote: nothing else in the folder is uploaded
    left_out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or _SKIP_UPLOAD.search(rel) or (rel == "README.md" and card_bytes is not None):
            continue
        if ours is not None and rel not in ours:
            left_out.append(rel)
            continue
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    if left_out:
        logger.warning("push: not uploading %s: hf-astroquant did not write %s (its list of files, %s, does not "
                       "name %s)", ", ".join(left_out[:5]), "them" if len(left_out) > 1 else "it", MANIFEST,
                       "them" if len(left_out) > 1 else "it")
    return api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", revision=revision,
                             create_pr=create_pr,
                             commit_message=commit_message or "Upload quantized model (hf_astroquant)")


__all__ = ["REPORT_FILE", "base_model_info", "hub_id_of", "push_folder"]
