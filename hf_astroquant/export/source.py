"""Reading an hf_astroquant checkpoint directory for an export: its config, shards and layers.

Every exporter starts here, so each refuses the same things the same way: a directory that is not
ours, an option no engine format knows (a transform that is not folded into the weights), a
checkpoint without quantized layers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import CHECKPOINT_FORMAT, QUANT_METHOD, RECORD_KEYS, AstroQuantConfig
from .registry import ExportOption

# Config keys whose every value an export can serve (the solver that produced the codes does not
# matter to an engine; layout-related keys are checked by each format).
SERVABLE_KEYS = set(AstroQuantConfig._option_names()) | set(RECORD_KEYS)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class ExportError(ValueError):
    """The checkpoint uses a setting the target format cannot serve; the message says which."""


# The option both safetensors formats take (the CLI's --dtype of `export`).
DTYPE_OPTION = ExportOption("--dtype", choices=("float16", "bfloat16"), default="float16",
                            help="dtype of the unquantized tensors; gptq writes float16 scales always, compressed-"
                                 "tensors writes scales in this dtype (float16 holds ours exactly) (default: float16)")


def read_config(src: Path, format_name: str) -> tuple[dict, dict]:
    """(config.json as a dict, its quantization_config), after checking `src` is ours and servable."""
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} has no config.json: not a saved transformers model directory")
    config = json.loads(path.read_text())
    q = config.get("quantization_config")
    if not q or q.get("quant_method") != QUANT_METHOD:
        raise ExportError(f"{src} is not an hf_astroquant checkpoint (quantization_config.quant_method is "
                          f"{(q or {}).get('quant_method')!r}, expected {QUANT_METHOD!r})")
    if q.get("checkpoint_format") != CHECKPOINT_FORMAT:
        raise ExportError(f"{src}: checkpoint_format {q.get('checkpoint_format')!r} is not {CHECKPOINT_FORMAT!r}")
    unknown = sorted(set(q) - SERVABLE_KEYS)
    if unknown:
        raise ExportError(f"{src}: option(s) {unknown} are not known to the {format_name} export (for example a "
                          "preconditioning transform that is not folded into the weights): refusing to export")
    if not q.get("quantized_modules"):
        raise ExportError(f"{src}: the config lists no quantized modules")
    if q.get("gguf_type") is not None:
        raise ExportError(f"{src} was solved onto GGUF grids (gguf_type={q['gguf_type']!r}): its layers are GGML "
                          f"blocks, which the {format_name} format cannot hold; quantize again without gguf_type")
    if q.get("input_rotated_modules"):
        raise ExportError(f"{src}: {len(q['input_rotated_modules'])} layer(s) rotate their input online "
                          f"(online_rotation={q.get('online_rotation')!r}), which the {format_name} format cannot "
                          "describe; serve it with transformers, or quantize again with online_rotation='none'")
    renamed = q.get("checkpoint_names") or {}
    q["quantized_modules"] = [renamed.get(m, m) for m in q["quantized_modules"]]  # as the files name them
    return config, q


def shards(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src} holds no .safetensors files")
    return files


def block_prefix(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj' → 'model.layers.3.' (the decoder block it lives in)."""
    m = re.match(r"(.*?\.\d+\.)", name)
    return m.group(1) if m else None


def plain_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The column → group map of contiguous groups: i // group_size."""
    return torch.arange(in_features, dtype=torch.int32) // group_size


def layer_inputs(src: Path, quantized: list[str], shapes: dict, group_size: int, whole_groups_reason: str
                 ) -> dict[str, int]:
    """in_features per quantized module, read from the headers (`shapes`), after checking that each
    layer's packed tensors are there and that its groups tile its input (ExportError naming the layer)."""
    missing = [f"{m}.{t}" for m in quantized for t in LAYER_TENSORS if f"{m}.{t}" not in shapes]
    if missing:
        raise ExportError(f"{src}: quantized tensors missing from the checkpoint: {missing[:4]}")
    in_features = {m: shapes[f"{m}.g_idx"][0] for m in quantized}
    ragged = sorted(m for m, n in in_features.items() if group_size != -1 and n % group_size)
    if ragged:
        raise ExportError(f"group_size={group_size} does not divide the input width of {ragged[:4]} "
                          f"({in_features[ragged[0]]}); {whole_groups_reason}")
    return in_features


def reordered_modules(src: Path, in_features: dict[str, int], group_size: int) -> set[str]:
    """The quantized modules whose g_idx is not the plain i // group_size (act-order's own groups)."""
    reordered = set()
    for shard in shards(src):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                if leaf == "g_idx" and module in in_features:
                    n = in_features[module]
                    if not torch.equal(f.get_tensor(key).to(torch.int32),
                                       plain_g_idx(n, n if group_size == -1 else group_size)):
                        reordered.add(module)
    return reordered


def check_out_dir(src: Path, out: Path, overwrite: bool) -> None:
    from ..output_dir import check_apart

    check_apart(out, {"the checkpoint read": src}, flag="the export directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")


def cast(t: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """`t` in `dtype`; ExportError when finite values would overflow it."""
    out = t.to(dtype)
    if torch.isfinite(t).all() and not torch.isfinite(out).all():
        raise ExportError(f"{key}: values overflow {dtype} (largest magnitude {float(t.abs().max()):.3g})")
    return out


def write_index(src: Path, out: Path, weight_map: dict[str, str]) -> None:
    """The sharded checkpoint's index, when the source had one."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        meta = json.loads(index.read_text()).get("metadata", {})
        meta["total_size"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        (out / index.name).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2))


def write_engine_config(config: dict, out: Path, quantization_config: dict, dtype: torch.dtype) -> None:
    """config.json for an engine: its quantization_config, no remote code (our stub imports us)."""
    config = dict(config, quantization_config=quantization_config)
    config.pop("auto_map", None)
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def files_in(out: Path) -> list[str]:
    """Every file under the folder `out`, relative to it (an ExportSummary's `files`)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def safetensors_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def copy_side_files(src: Path, out: Path) -> None:
    import shutil

    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
