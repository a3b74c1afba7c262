"""Saving extras and the Hub: model card, run report, remote-code stub, upload.

`install_save_hooks(model)` gives a quantized model (fresh or reloaded) its own `save_pretrained`
and `push_to_hub`: transformers' versions write the weights and config, then ours add
`astroquant_report.json`, the card (README.md + plot) and `modeling_astroquant.py`, the
remote-code stub that `config.json`'s `auto_map` names, so `trust_remote_code=True` loads the
checkpoint without an explicit `import hf_astroquant`. (transformers' own `push_to_hub` would
replace README.md with a generic card, hence the override.)

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

from ..file_modes import apply_umask
from .card import REPORT_FILE, is_ours, read_report, render_card, write_card, write_report

logger = logging.getLogger("hf_astroquant")
STUB_FILE = "modeling_astroquant.py"
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText", "AutoModel")
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


def _transformers_base_class(model) -> type | None:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls
    return None


def remote_code_stub(model) -> tuple[str, dict[str, str]] | None:
    """(source of modeling_astroquant.py, auto_map) for `model`'s architecture, or None when the
    model's class is not one of transformers' (its own remote code would be replaced)."""
    from transformers.models.auto import modeling_auto

    base = _transformers_base_class(model)
    if base is None:
        return None
    mappings = {
        "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "AutoModelForSeq2SeqLM": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "AutoModelForImageTextToText": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
    }
    stub_name = f"AstroQuant{base.__name__}"
    auto_map = {auto: f"{STUB_FILE[:-3]}.{stub_name}" for auto in _AUTO_CLASSES
                if base.__name__ in mappings[auto].values()}
    if not auto_map:
        return None
    source = (
        '"""Remote-code stub written by hf_astroquant: loading this checkpoint with\n'
        "trust_remote_code=True imports hf_astroquant, which registers the 'astroquant' quantization\n"
        'format with transformers before the weights are read."""\n\n'
        "import hf_astroquant  # noqa: F401  (pip install hf-astroquant)\n"
        f"from transformers import {base.__name__}\n\n\n"
        f"class {stub_name}({base.__name__}):\n"
        "    pass\n"
    )
    return source, auto_map


def write_extras(model, directory: str | Path, stub: tuple[str, dict[str, str]] | None) -> None:
    """Report, remote-code stub (`remote_code_stub(model)`) and card for a quantized model just saved
    into `directory`."""
    directory = Path(directory)
    report = dict(read_report(directory))
    report.update(getattr(model, "astroquant_report", None) or {})
    write_report(directory, report)
    if stub is not None and getattr(model.config, "auto_map", None) == stub[1]:  # never beside someone's own code
        (directory / STUB_FILE).write_text(stub[0])
    write_card(directory)


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
    stub = remote_code_stub(model)

    @functools.wraps(save_original)
    def save_pretrained(save_directory, *args, push_to_hub: bool = False, **kwargs):
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "private", "token", "commit_message", "create_pr",
                                                  "revision") if k in kwargs}
        if stub is not None and getattr(model.config, "auto_map", None) in (None, stub[1]):
            model.config.auto_map = stub[1]
        result = save_original(save_directory, *args, **kwargs)
        write_extras(model, save_directory, stub)
        apply_umask(save_directory)
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
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or _SKIP_UPLOAD.search(rel) or (rel == "README.md" and card_bytes is not None):
            continue
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    return api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", revision=revision,
                             create_pr=create_pr,
                             commit_message=commit_message or "Upload quantized model (hf_astroquant)")


__all__ = ["REPORT_FILE", "base_model_info", "install_save_hooks", "push_folder", "remote_code_stub",
           "write_extras"]
