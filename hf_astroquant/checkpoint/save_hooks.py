"""Saving a quantized model: its own `save_pretrained` and `push_to_hub`.

`install_save_hooks(model)` gives a quantized model (fresh or reloaded) its own `save_pretrained`
and `push_to_hub`: transformers' versions write the weights and config, then ours add
`astroquant_report.json` and the card (README.md + plot). (transformers' own `push_to_hub` would
replace README.md with a generic card, hence the override.) The upload is export/hub.py's `push_folder`.

No remote code is written (see export/hub.py): the `auto_map` of the remote-code stub that versions
before 0.1.1 wrote is dropped on saving.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

from ..export.card import read_report, write_card, write_report
from ..export.hub import push_folder
from ..file_modes import apply_umask, snapshot, written_since

logger = logging.getLogger("hf_astroquant")
OLD_STUB_MODULE = "modeling_astroquant"  # the remote-code stub that versions before 0.1.1 wrote


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


__all__ = ["install_save_hooks", "write_extras"]
