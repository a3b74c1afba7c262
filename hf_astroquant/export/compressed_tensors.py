"""Export an hf_astroquant checkpoint to compressed-tensors' `pack-quantized` format.

compressed-tensors (the format llm-compressor writes; vLLM and transformers read it) stores a
weight-only integer layer as

    weight_packed      (out, ⌈in / p⌉) int32, p = ⌊32 / b⌋ codes per word along the input
                       dimension, code j of a row in bits [(j mod p)·b, (j mod p + 1)·b) of word
                       ⌊j / p⌋ (unused high bits zero); each code is stored as q + 2^(b−1), q the
                       signed integer in [−2^(b−1), 2^(b−1))
    weight_scale       (out, groups) in the model's dtype
    weight_zero_point  (⌈out / p⌉, groups) int32, asymmetric only: the signed zero point plus
                       2^(b−1), packed the same way along the output dimension
    weight_g_idx       (in,) int32, only with actorder "group" (columns not in contiguous groups)
    weight_shape       (2,) int64: (out, in)

and decodes w = (q − zp) · scale, with the scale and zero point of column i's group (g_idx[i], or
i // group_size). Our codes u ∈ [0, 2^b) with zero point z decode as w = (u − z) · s; with
q = u − 2^(b−1) and zp = z − 2^(b−1) the two agree exactly, and the stored words are u and z
themselves. A symmetric grid's zero point is 2^(b−1) (ours always is), so zp = 0 and no zero
point is stored. Our scales are fp16 values already (the solver rounds them so), so a float16
export is exact; bfloat16 rounds them (reported).

What the format cannot hold is refused with the reason: groups that do not tile a layer's input
width, bits outside 1..8, and what every export refuses (see `source.read_config`). Linears left in
full precision (lm_head, `modules_to_not_convert`) are listed in `ignore`, as the format expects.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint.guard import read_headers
from ..modules.packing import unpack_cols, unpack_rows
from .card import format_bytes
from .engines import vllm_notes
from .registry import Exporter, ExportSummary, register_exporter
from .source import (DTYPE_OPTION, LAYER_TENSORS, ExportError, cast, check_out_dir, copy_side_files, files_in,
                     layer_inputs, read_config, reordered_modules, safetensors_bytes, shards, write_engine_config,
                     write_index)

FORMAT = "pack-quantized"
# The compressed-tensors release whose format definition this follows (written into the config).
FORMAT_VERSION = "0.17.0"
DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class CompressedTensorsSummary:
    out_dir: Path
    layers: int
    ignored: list[str]
    weights: dict  # the config group's QuantizationArgs
    bytes_written: int
    largest_scale_rounding: float  # relative; 0 when the scales are written exactly

    @property
    def actorder(self) -> str | None:
        return self.weights["actorder"]


# --------------------------------------------------------------------------- the layout (pure)

def codes_per_word(bits: int) -> int:
    """p = ⌊32 / b⌋: compressed-tensors never splits a code across words."""
    return 32 // bits


def pack_last_dim(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(r, n) codes in [0, 2^b) → (r, ⌈n / p⌉) int32, code j in bits [(j mod p)·b, …) of word ⌊j / p⌋."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} cannot be packed by compressed-tensors; allowed: 1 to 8")
    p = codes_per_word(bits)
    r, n = codes.shape
    v = codes.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"codes outside [0, {2 ** bits - 1}] cannot be packed in {bits} bits")
    words = math.ceil(n / p)
    v = torch.nn.functional.pad(v, (0, words * p - n)).view(r, words, p)
    shifts = torch.arange(p, dtype=torch.int64) * bits
    packed = (v << shifts).sum(dim=-1)  # the shifted codes never overlap: the sum is their bitwise or
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_last_dim(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_last_dim`: (r, words) int32 → (r, n) codes as int32."""
    p = codes_per_word(bits)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(p, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(packed.shape[0], -1)[:, :n].to(torch.int32)


def decode(tensors: dict[str, torch.Tensor], bits: int, symmetric: bool, group_size: int) -> torch.Tensor:
    """The float32 weight (out, in) a compressed-tensors reader rebuilds from one layer's tensors
    (`weight_packed`, `weight_scale`, `weight_shape`, and `weight_zero_point` / `weight_g_idx` when
    present): w = (q − zp) · scale, written from the format's definition above."""
    out_f, in_f = (int(x) for x in tensors["weight_shape"])
    offset = 2 ** (bits - 1)
    q = unpack_last_dim(tensors["weight_packed"], bits, in_f) - offset
    scale = tensors["weight_scale"].float()
    if symmetric:
        zp = torch.zeros_like(scale)
    else:
        zp = unpack_last_dim(tensors["weight_zero_point"].t(), bits, out_f).t().float() - offset
    if "weight_g_idx" in tensors:
        g = tensors["weight_g_idx"].long()
    else:
        g = torch.arange(in_f) // (in_f if group_size == -1 else group_size)
    return (q.float() - zp[:, g]) * scale[:, g]


def convert_layer(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                  bits: int, sym: bool, dtype: torch.dtype, store_g_idx: bool) -> dict[str, torch.Tensor]:
    """One of our packed layers (GPTQ layout: qweight (in·b/32, out), qzeros (groups, out·b/32),
    scales (groups, out), g_idx (in,)) → its compressed-tensors tensors."""
    in_f, out_f = g_idx.shape[0], scales.shape[1]
    codes = unpack_rows(qweight, bits, in_f).t()  # (out, in): u
    result = {
        "weight_packed": pack_last_dim(codes, bits),
        "weight_scale": scales.t().contiguous().to(dtype),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not sym:
        zeros = unpack_cols(qzeros, bits, out_f)  # (groups, out): z
        result["weight_zero_point"] = pack_last_dim(zeros, bits).t().contiguous()  # packed along out
    if store_g_idx:
        result["weight_g_idx"] = g_idx.to(torch.int32)
    return result


def weights_args(bits: int, group_size: int, sym: bool, actorder: str | None) -> dict:
    """The `weights` QuantizationArgs of the one config group."""
    return {
        "num_bits": bits, "type": "int", "symmetric": sym,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "block_structure": None, "dynamic": False, "actorder": actorder,
        "observer": "minmax", "observer_kwargs": {},
    }


def quantization_config(bits: int, group_size: int, sym: bool, actorder: str | None, ignore: list[str],
                        method: str | None = None) -> dict:
    """The `quantization_config` compressed-tensors readers (vLLM, transformers) expect."""
    from .. import __version__

    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": weights_args(bits, group_size, sym, actorder),
            "input_activations": None, "output_activations": None, "format": FORMAT}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": FORMAT_VERSION,
        "producer": {"name": "hf_astroquant", "version": __version__, "method": method},  # vLLM reads producer.name
    }


# --------------------------------------------------------------------------- the export

def export_compressed_tensors(src: str | Path, out: str | Path, dtype: torch.dtype = torch.float16,
                              overwrite: bool = False) -> CompressedTensorsSummary:
    """Write the compressed-tensors (`pack-quantized`) copy of the hf_astroquant checkpoint `src` into `out`."""
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype} is not valid; allowed: torch.float16, torch.bfloat16")
    check_out_dir(src, out, overwrite)
    config, q = read_config(src, "compressed-tensors")
    bits, group_size, sym = int(q["bits"]), int(q["group_size"]), bool(q.get("sym", False))
    if not 1 <= bits <= 8:
        raise ExportError(f"bits={bits}: compressed-tensors' pack-quantized format holds 1 to 8 bits")
    quantized = list(q["quantized_modules"])
    shapes = {key: shape for key, (shape, _) in read_headers(shards(src)).items()}
    in_features = layer_inputs(src, quantized, shapes, group_size,
                               "compressed-tensors' group strategy needs whole groups")
    actorder = "group" if reordered_modules(src, in_features, group_size) else None
    if actorder is None and q.get("desc_act") and q.get("method") != "rtn":
        actorder = "weight"  # solved in activation order, groups still contiguous: nothing extra to store
    ignore = _unquantized_linears(config, set(quantized), shapes)

    out.mkdir(parents=True, exist_ok=True)
    summary = CompressedTensorsSummary(out, len(quantized), ignore, weights_args(bits, group_size, sym, actorder),
                                       0, 0.0)
    layout = dict(bits=bits, sym=sym, dtype=dtype, g_idx=actorder == "group")  # "group": every layer has one
    weight_map = _write_tensors(src, out, set(quantized), layout, summary)
    write_index(src, out, weight_map)
    write_engine_config(config, out, quantization_config(bits, group_size, sym, actorder, ignore, q.get("method")),
                        dtype)
    copy_side_files(src, out)
    return summary


def _unquantized_linears(config: dict, qset: set, shapes: dict) -> list[str]:
    """The model's Linear modules we left in full precision (the format's `ignore`), found on an
    empty (meta) copy of the architecture; lm_head is a Linear even when its weight is tied."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        plain = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
        arch = AutoConfig.for_model(**plain)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(arch)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    except Exception:  # an architecture transformers cannot build here: the 2-D weights outside the embedding
        names = [k[: -len(".weight")] for k, s in shapes.items()
                 if k.endswith(".weight") and len(s) == 2 and "embed" not in k]
        names = sorted(set(names) | {"lm_head"})
    return [n for n in names if n not in qset]


def _write_tensors(src: Path, out: Path, qset: set, layout: dict, summary: CompressedTensorsSummary) -> dict:
    """Every shard rewritten: quantized layers in the format's tensors (in the shard holding their
    qweight), everything else cast to the export dtype; returns the weight map."""
    weight_map: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        handles = {shard: stack.enter_context(safe_open(str(shard), "pt")) for shard in shards(src)}
        home = {k: f for f in handles.values() for k in f.keys()}  # a layer's tensors may straddle two shards
        for shard, f in handles.items():
            tensors: dict[str, torch.Tensor] = {}
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                if module in qset:
                    if leaf == "qweight":
                        tensors.update(_convert(module, home, layout, summary))
                    elif leaf == "bias":
                        tensors[key] = cast(f.get_tensor(key), layout["dtype"], key)
                    continue  # qzeros, scales, g_idx went into the layer's tensors; .weight is our load guard
                t = f.get_tensor(key)
                tensors[key] = (cast(t, layout["dtype"], key) if t.is_floating_point() else t).contiguous()
            target = out / shard.name
            save_file(tensors, str(target), metadata={"format": "pt"})
            summary.bytes_written += target.stat().st_size
            weight_map.update({k: shard.name for k in tensors})
    return weight_map


def _convert(module: str, home: dict, layout: dict, summary: CompressedTensorsSummary) -> dict:
    parts = {leaf: home[f"{module}.{leaf}"].get_tensor(f"{module}.{leaf}") for leaf in LAYER_TENSORS}
    scales = parts["scales"].float()
    rounded = scales.to(layout["dtype"]).float()
    rel = float(((rounded - scales).abs() / scales.abs().clamp(min=1e-30)).max()) if scales.numel() else 0.0
    summary.largest_scale_rounding = max(summary.largest_scale_rounding, rel)
    tensors = convert_layer(parts["qweight"], parts["qzeros"], scales, parts["g_idx"], layout["bits"],
                            layout["sym"], layout["dtype"], store_g_idx=layout["g_idx"])
    return {f"{module}.{k}": v for k, v in tensors.items()}


class CompressedTensorsExporter(Exporter):
    """`hf-astroquant export --format compressed-tensors`: export_compressed_tensors, with vLLM's limits as notes."""

    name = display_name = "compressed-tensors"
    order = 20
    engines = "vLLM and transformers, asymmetric grids included"
    options = (DTYPE_OPTION,)

    def export(self, src: Path, out: Path, *, overwrite: bool = False, dtype: str = "float16") -> ExportSummary:
        summary = export_compressed_tensors(src, out, dtype=getattr(torch, dtype), overwrite=overwrite)
        rows = [("format", f"compressed-tensors ({FORMAT})"), ("actorder", summary.actorder or "none"),
                ("quantized layers", summary.layers), ("left in full precision", ", ".join(summary.ignored) or "none")]
        if summary.largest_scale_rounding:
            rows.append(("scales rounded to " + dtype, f"by at most {summary.largest_scale_rounding:.2%} (relative)"))
        w = summary.weights
        notes = vllm_notes("compressed-tensors", w["num_bits"], w["symmetric"], summary.actorder == "group")
        rows += [("vLLM", note) for note in notes] + [("size", format_bytes(safetensors_bytes(out)))]
        return ExportSummary(self.name, out, files_in(out), rows, notes, summary)


register_exporter(CompressedTensorsExporter())
