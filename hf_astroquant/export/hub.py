"""Saving extras and the Hub: model card, run report, upload.

`install_save_hooks(model)` gives a quantized model (fresh or reloaded) its own `save_pretrained`
and `push_to_hub`: transformers' versions write the weights and config, then ours add
`astroquant_report.json` and the card (README.md + plot). (transformers' own `push_to_hub` would
replace README.md with a generic card, hence the override.)

No remote code is written: loading needs `import hf_astroquant`, never `trust_remote_code=True`,
which would run whatever Python file a repository holds (anyone can upload a hostile one under a
card that looks like ours).

`push_folder` uploads a directory in one commit through `huggingface_hub.HfApi.create_commit`,
with the card re-rendered so that its usage snippet names the repository.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

from ..file_modes import apply_umask, snapshot, written_since
from ..output_dir import MANIFEST, output_files
from .card import REPORT_FILE, is_ours, read_report, render_card, write_card, write_report

logger = logging.getLogger("hf_astroquant")
OLD_STUB_MODULE = "modeling_astroquant"  # the remote-code stub that versions before 0.1.1 wrote
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


def write_extras(model, directory: str | Path) -> None:
    """Report and card for a quantized model just saved into `directory`."""
    directory = Path(directory)
    report = dict(read_report(directory))
    report.update(getattr(model, "astroquant_report", None) or {})
    write_report(directory, report)
    write_card(directory)


def drop_old_remote_code(config) -> None:
    """Forget the `auto_map` that versions before 0.1.1 wrote for their remote-code stub: we no longer
    write the stub (its file would be missing) nor ask anyone to load with trust_remote_code."""
    auto_map = getattr(config, "auto_map", None)
    if isinstance(auto_map, dict) and auto_map and all(
            str(v).startswith(OLD_STUB_MODULE + ".") for v in auto_map.values()):
        del config.auto_map


def _saved_report_of(model) -> dict[str, Any]:
    """A reloaded model carries the report of the directory it came from (so a re-save keeps it)."""
    src = getattr(model, "name_or_path", None)
    return read_report(src) if src and Path(src).is_dir() else {}


def install_save_hooks(model) -> None:
    """Give `model` the save_pretrained/push_to_hub that write the extras (idempotent)."""
    if getattr(model, "_astroquant_hooks", False):
        return
    if getattr(model, "astroquant_report", None) is None:
        model.astroquant_report = _saved_report_of(model)
    save_original = model.save_pretrained  # the bound class method

    @functools.wraps(save_original)
    def save_pretrained(save_directory, *args, push_to_hub: bool = False, **kwargs):
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "private", "token", "commit_message", "create_pr",
                                                  "revision") if k in kwargs}
        drop_old_remote_code(model.config)
        before = snapshot(save_directory)
        result = save_original(save_directory, *args, **kwargs)
        write_extras(model, save_directory)
        apply_umask(written_since(save_directory, before))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", None) or Path(save_directory).name
            push_folder(save_directory, repo_id, **hub_kwargs)
        return result

    def push_to_hub(repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "50GB", tags: list[str] | None = None, **kwargs):
        if kwargs:
            logger.warning("push_to_hub: ignoring options %s", sorted(kwargs))
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            return push_folder(tmp, repo_id, private=private, token=token, commit_message=commit_message,
                               revision=revision, create_pr=create_pr, tags=tags)

    model.save_pretrained = save_pretrained
    model.push_to_hub = push_to_hub
    model._astroquant_hooks = True


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


__all__ = ["REPORT_FILE", "base_model_info", "install_save_hooks", "push_folder", "write_extras"]
