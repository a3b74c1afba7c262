"""Export an hf_astroquant checkpoint to the plain GPTQ format that serving engines load.

Our packed layout already is GPTQ's (qweight, qzeros, scales, g_idx in int32 words); what differs:

    zero points   ours store z; GPTQ's v1 format ("checkpoint_format": "gptq", what vLLM, SGLang,
                  TGI and transformers read) stores z − 1 and adds the 1 back when loading, so a
                  zero point of 0 cannot be written there (it would come back as 2^b). "gptq_v2"
                  (GPTQModel) stores z as we do.
    scales/bias   fp16 (engines' GPTQ kernels compute in fp16)
    g_idx         desc_act=False promises g_idx[i] = i // group_size for every layer; any other
                  column order (act-order without static groups) needs desc_act=True.
    config        quantization_config = {quant_method: "gptq", bits, group_size, desc_act, sym,
                  checkpoint_format, ...}, also written as quantize_config.json (GPTQModel).

Settings the format cannot express are refused with the reason, never written approximately:
a group size that does not divide a layer's input width (GPTQ requires whole groups), an
unquantized Linear inside a decoder block (engines quantize every Linear of a block), a zero
point of 0 in v1, and any option this exporter does not know (for example a preconditioning
transform that is not folded into the weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint.guard import read_headers
from ..experts import ROUTER_NAMES
from ..modules.packing import pack_cols, unpack_cols
from .card import format_bytes
from .engines import vllm_notes
from .registry import ExportOption, Exporter, ExportSummary, register_exporter
from .source import (DTYPE_OPTION, ExportError, block_prefix, cast, check_out_dir, copy_side_files, files_in,
                     layer_inputs, read_config, reordered_modules, safetensors_bytes, write_engine_config, write_index)
from .source import shards as _shards

GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass
class GPTQSummary:
    out_dir: Path
    checkpoint_format: str
    desc_act: bool
    layers: int
    bytes_written: int




def v1_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, layer: str) -> torch.Tensor:
    """Repack true zero points z as GPTQ v1's z − 1; refuses z = 0, which v1 cannot hold."""
    zeros = unpack_cols(qzeros, bits, out_features)
    if int(zeros.min()) < 1:
        n = int((zeros < 1).sum())
        raise ExportError(
            f"{layer}: {n} group(s) have zero point 0, which GPTQ's v1 format (checkpoint_format='gptq') "
            "stores as z-1 and cannot represent; export with checkpoint_format='gptq_v2' (GPTQModel) or "
            "quantize with sym=True")
    return pack_cols(zeros - 1, bits)


def export_gptq(src: str | Path, out: str | Path, checkpoint_format: str = "gptq",
                dtype: torch.dtype = torch.float16, overwrite: bool = False) -> GPTQSummary:
    """Write the GPTQ-format copy of the hf_astroquant checkpoint `src` into `out`."""
    src, out = Path(src), Path(out)
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is not valid; allowed: {', '.join(GPTQ_FORMATS)}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype} is not valid; allowed: torch.float16, torch.bfloat16")
    check_out_dir(src, out, overwrite)
    config, q = read_config(src, "GPTQ")
    bits, group_size = int(q["bits"]), int(q["group_size"])
    quantized, shapes, in_features = _check_layers(src, q, group_size)
    qset = set(quantized)
    # desc_act is one flag for the whole model: True as soon as one layer's columns are reordered.
    desc_act = bool(reordered_modules(src, in_features, group_size))

    out.mkdir(parents=True, exist_ok=True)
    summary = GPTQSummary(out, checkpoint_format, desc_act, len(quantized), 0)
    weight_map = _write_tensors(src, out, qset, shapes, bits, checkpoint_format, dtype, summary)
    write_index(src, out, weight_map)
    gptq_config = gptq_quantization_config(q, desc_act, checkpoint_format)
    write_engine_config(config, out, gptq_config, dtype)
    (out / "quantize_config.json").write_text(json.dumps(gptq_config, indent=2) + "\n")
    copy_side_files(src, out)
    return summary


def _check_layers(src: Path, q: dict, group_size: int):
    """(quantized module names, tensor shapes, in_features per module), after checking from the
    headers alone that GPTQ can hold every layer; ExportError naming what it cannot."""
    quantized = list(q["quantized_modules"])
    qset = set(quantized)

    # One pass over the headers: every check happens before anything is written.
    shapes = {key: shape for key, (shape, _) in read_headers(_shards(src)).items()}
    in_features = layer_inputs(src, quantized, shapes, group_size, "GPTQ engines need whole groups")
    blocks = {block_prefix(m) for m in quantized} - {None}
    experts_parents = {k.split(".experts.")[0] for k in shapes if ".experts." in k}
    unquantized = sorted(k[: -len(".weight")] for k, s in shapes.items()
                         if k.endswith(".weight") and len(s) == 2 and block_prefix(k) in blocks
                         and k[: -len(".weight")] not in qset and not _is_router(k, experts_parents))
    if unquantized:
        raise ExportError(
            f"Linear layers inside decoder blocks were left unquantized ({unquantized[:4]}"
            f"{' ...' if len(unquantized) > 4 else ''}); GPTQ engines quantize every Linear of a block")
    return quantized, shapes, in_features


def _is_router(key: str, experts_parents: set[str]) -> bool:
    """An MoE router's weight (experts.ROUTER_NAMES beside an experts module): engines keep it in
    full precision, as we do."""
    parent, _, name = key[: -len(".weight")].rpartition(".")
    return name in ROUTER_NAMES and parent in experts_parents


def _write_tensors(src: Path, out: Path, qset: set, shapes: dict, bits: int, checkpoint_format: str,
                   dtype: torch.dtype, summary: GPTQSummary) -> dict[str, str]:
    """Write every shard in GPTQ's conventions (v1 zero points, fp16 scales, `dtype` elsewhere, no load
    guard); return the weight map (tensor -> shard file)."""
    weight_map: dict[str, str] = {}
    for shard in _shards(src):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                module, _, leaf = key.rpartition(".")
                if module in qset:
                    if leaf == "weight":  # the load guard of our own format (see hf_astroquant.checkpoint.guard)
                        continue
                    if leaf == "qzeros" and checkpoint_format == "gptq":
                        t = v1_qzeros(t, bits, shapes[f"{module}.scales"][1], module)
                    elif leaf in ("scales", "bias"):
                        t = cast(t, torch.float16, key)
                    elif leaf == "g_idx":
                        t = t.to(torch.int32)
                elif t.is_floating_point():
                    t = cast(t, dtype, key)
                tensors[key] = t.contiguous()
        target = out / shard.name
        save_file(tensors, str(target), metadata={"format": "pt"})
        summary.bytes_written += target.stat().st_size
        weight_map.update({k: shard.name for k in tensors})
    return weight_map


def gptq_quantization_config(q: dict, desc_act: bool, checkpoint_format: str) -> dict:
    """The `quantization_config` GPTQ loaders read (transformers/optimum, GPTQModel, vLLM)."""
    from .. import __version__

    return {
        "quant_method": "gptq",
        "bits": int(q["bits"]),
        "group_size": int(q["group_size"]),
        "desc_act": bool(desc_act),
        "sym": bool(q.get("sym", False)),
        "static_groups": bool(q.get("static_groups", False)),
        "true_sequential": bool(q.get("true_sequential", True)),
        "damp_percent": float(q.get("damp_percent", 0.01)),
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"hf_astroquant:{__version__}"], "method": q.get("method")},
    }


class GPTQExporter(Exporter):
    """`hf-astroquant export --format gptq`: export_gptq, with vLLM's limits as notes."""

    name, display_name, order = "gptq", "GPTQ", 10
    engines = "vLLM, SGLang, TGI, transformers, GPTQModel; symmetric grids for vLLM"
    options = (ExportOption("--checkpoint-format", choices=GPTQ_FORMATS, default=None,
                            help="--format gptq only. gptq: v1, read by vLLM/SGLang/TGI/transformers; gptq_v2: "
                                 "GPTQModel (default: gptq)"),
               DTYPE_OPTION)

    def export(self, src: Path, out: Path, *, overwrite: bool = False, checkpoint_format: str | None = None,
               dtype: str = "float16") -> ExportSummary:
        summary = export_gptq(src, out, checkpoint_format=checkpoint_format or "gptq", dtype=getattr(torch, dtype),
                              overwrite=overwrite)
        q = json.loads((out / "config.json").read_text())["quantization_config"]
        notes = vllm_notes("gptq", q["bits"], q["sym"], summary.desc_act)
        rows = [("format", f"gptq ({summary.checkpoint_format})"), ("desc_act", summary.desc_act),
                ("quantized layers", summary.layers)] + [("vLLM", note) for note in notes]
        rows.append(("size", format_bytes(safetensors_bytes(out))))
        return ExportSummary(self.name, out, files_in(out), rows, notes, summary)


register_exporter(GPTQExporter())
