"""Loading guards: an hf_astroquant checkpoint never loads into silently random weights.

1. Without the plugin, transformers skips the unknown `quantization_config` and would initialise
   every quantized Linear at random (only a warning). So the checkpoint also holds
   `<first quantized layer>.weight` as a 1-element tensor: a loader that builds plain Linear layers
   meets a size mismatch and raises (transformers' default `ignore_mismatched_sizes=False`). With
   the plugin that key is an expected leftover and ignored.
2. With the plugin, `check_checkpoint` reads the safetensors headers before any weight is loaded
   and refuses a checkpoint whose packed tensors are missing or have the wrong shape or dtype, whose
   header is corrupt, or that holds packed tensors its config does not explain (a layer missing from
   quantized_modules, a rotation missing from input_rotated_modules), naming the tensor.
3. Once the weights are loaded, checkpoint/validate.py checks the packed values (scales, zero points,
   g_idx, rotations, GGUF block factors, biases).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..gguf.linear import GGUFLinear
from ..modules.packing import packed_rows

GUARD_DTYPE = torch.float16
GUARD_METADATA = {"hf_astroquant": "packed weights in the 'astroquant' format: `import hf_astroquant` "
                                   "(pip install hf-astroquant) before from_pretrained"}


_EXPERT = re.compile(r"\.experts\.\d+\.")


def guard_key(quantized_modules: list[str] | None) -> str | None:
    """The first quantized module's ``.weight``, preferring one that is not an MoE expert: transformers
    merges a checkpoint's per-expert ``.weight`` tensors into the fused experts parameter, so a guard
    there would be renamed rather than refused."""
    if not quantized_modules:
        return None
    dense = [m for m in quantized_modules if not _EXPERT.search(m)]
    return f"{(dense or quantized_modules)[0]}.weight"


def guard_tensor() -> torch.Tensor:
    return torch.zeros(1, dtype=GUARD_DTYPE)


def ignore_pattern(key: str) -> str:
    return "^" + re.escape(key) + "$"


def expected_tensors(module_name: str, layer) -> dict[str, tuple[tuple[int, ...], str]]:
    """The checkpoint tensors of one packed layer: name → (shape, dtype kind: 'int32' | 'uint8' | 'float')."""
    if isinstance(layer, GGUFLinear):  # one row of GGML blocks per output channel
        out = {f"{module_name}.qblocks": (tuple(layer.qblocks.shape), "uint8")}
        if layer.bias is not None:
            out[f"{module_name}.bias"] = ((layer.out_features,), "float")
        return out
    n_in, n_out, bits = layer.in_features, layer.out_features, layer.bits
    out = {
        f"{module_name}.qweight": ((packed_rows(n_in, bits), n_out), "int32"),
        f"{module_name}.qzeros": ((layer.n_groups, packed_rows(n_out, bits)), "int32"),
        f"{module_name}.scales": ((layer.n_groups, n_out), "float"),
        f"{module_name}.g_idx": ((n_in,), "int32"),
    }
    if layer.bias is not None:
        out[f"{module_name}.bias"] = ((n_out,), "float")
    if layer.input_rotation is not None:
        out[f"{module_name}.input_rotation.signs"] = ((n_in,), "float")
        out[f"{module_name}.input_rotation.mix"] = (tuple(layer.input_rotation.mix.shape), "float")
    return out


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def read_headers(files: list[str | Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name → (shape, safetensors dtype string) over all files; a corrupt file raises ValueError."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as err:
            raise ValueError(f"hf_astroquant: cannot read the safetensors file {file}: {err} "
                             "(truncated or corrupt download? delete it and download again)") from err
    return found


def saved_names(model, keys) -> dict[str, str]:
    """{state-dict key: the name save_pretrained writes it under}: transformers 5 renames some families'
    keys on save, back to their original checkpoints' layout (Gemma 3's multimodal model writes
    "model.language_model.X" as "language_model.model.X"). Identity where it renames nothing."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # another transformers: its loader reports missing tensors itself
        return {k: k for k in keys}
    marks = {k: torch.empty(0) for k in keys}  # one distinct tensor per key, to find it again after renaming
    by_mark = {id(t): k for k, t in marks.items()}
    return {by_mark[id(t)]: name for name, t in revert_weight_conversion(model, marks).items() if id(t) in by_mark}


def renamed_modules(model, modules: list[str]) -> dict[str, str] | None:
    """{module: the name save_pretrained writes its tensors under} for the `modules` it renames; None
    when it renames none."""
    saved = saved_names(model, [f"{m}.qweight" for m in modules])
    renamed = {k[:-len(".qweight")]: v[:-len(".qweight")] for k, v in saved.items() if k != v}
    return renamed or None


# The leaves of a packed layer's tensors (QuantLinear, GGUFLinear, an online input rotation); the
# markers are those no full-precision layer has, so a header key with one belongs to a packed layer.
PACKED_LEAVES = ("qweight", "qzeros", "scales", "g_idx", "qblocks", "input_rotation.signs", "input_rotation.mix")
_MARKERS = ("qweight", "qzeros", "qblocks", "input_rotation.signs", "input_rotation.mix")


def split_key(key: str, leaves=PACKED_LEAVES + ("bias",)) -> tuple[str, str] | None:
    """(module, leaf) of a key ending in one of `leaves`, else None."""
    for leaf in leaves:
        if key.endswith("." + leaf):
            return key[:-len(leaf) - 1], leaf
    return None


def check_rotated_listed(rotated: set[str], quantized: list[str], gguf: set[str] = frozenset()) -> None:
    """Every module in input_rotated_modules is a packed (non-GGUF) layer of quantized_modules: the
    loader gives a rotation to those only, so any other listed one would load without it."""
    bad = sorted(set(rotated) - set(quantized)) + sorted(set(rotated) & set(gguf))
    if bad:
        why = "not in quantized_modules" if bad[0] not in quantized else "a GGUF layer (those have no online rotation)"
        raise ValueError(f"hf_astroquant: the config's input_rotated_modules lists {bad[0]}, which is {why}"
                         f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; refusing to load this checkpoint")


def _lookup(found: dict, key: str, prefix: str, saved: str | None = None) -> str | None:
    """The header name of `key`, also when the checkpoint was saved from the bare base model
    (no "model." prefix) or from a task model (prefix) while loading the other, or under the name
    save_pretrained gave it (`saved`)."""
    for name in (key, saved, f"{prefix}.{key}" if prefix else None,
                 key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None):
        if name is not None and name in found:
            return name
    return None


def _mismatch(key: str, entry: tuple[tuple[int, ...], str], shape: tuple[int, ...], kind: str) -> str | None:
    """What differs between a header entry and the expected (shape, dtype kind), or None."""
    got_shape, got_dtype = entry
    if got_shape != shape:
        return f"{key}: shape {list(got_shape)}, expected {list(shape)}"
    if kind == "int32" and got_dtype != "I32":
        return f"{key}: dtype {got_dtype}, expected I32"
    if kind == "uint8" and got_dtype != "U8":
        return f"{key}: dtype {got_dtype}, expected U8"
    if kind == "float" and got_dtype not in _FLOAT_DTYPES:
        return f"{key}: dtype {got_dtype}, expected a float type"
    return None


def _missing(missing: list[str], expected: dict) -> list[str]:
    """One problem per missing key, or one per module whose expected tensors (or whose rotation's) are
    all missing: the config lists a layer (or its rotation) the checkpoint does not hold."""
    by_module: dict[str, list[str]] = {}
    for key in expected:
        by_module.setdefault(split_key(key)[0] if split_key(key) else key, []).append(key)
    gone = set(missing)
    out, told = [], set()
    for module, keys in sorted(by_module.items()):
        rotation = [k for k in keys if ".input_rotation." in k]
        if gone.issuperset(keys):
            out.append(f"{module}: listed in quantized_modules, but the checkpoint has no packed tensors for it")
            told.update(keys)
        elif rotation and gone.issuperset(rotation):
            out.append(f"{module}: listed in input_rotated_modules, but the checkpoint has no input_rotation "
                       "tensors for it")
            told.update(rotation)
    return out + [f"{k}: missing" for k in missing if k not in told]


def unexplained_tensors(found: dict, matched: set[str]) -> list[str]:
    """A problem for every module with packed tensors in the headers that the config does not explain
    (`matched`: the header names of the expected tensors): a layer the config does not quantize, or a
    rotation it does not list. Either would load as a random or unrotated layer, silently."""
    packed = {m for m, leaf in filter(None, (split_key(k, PACKED_LEAVES) for k in found)) if leaf in _MARKERS}
    known = {split_key(k)[0] for k in matched if split_key(k)}
    extra: dict[str, list[str]] = {}
    for key in sorted(found):
        parts = split_key(key, PACKED_LEAVES)
        if key not in matched and parts is not None and parts[0] in packed:
            extra.setdefault(parts[0], []).append(parts[1])
    problems = []
    for module, leaves in extra.items():
        if module not in known:
            problems.append(f"{module}: the checkpoint holds its packed tensors ({', '.join(leaves)}), but the "
                            "config's quantized_modules does not list it")
        elif all(leaf.startswith("input_rotation.") for leaf in leaves):
            problems.append(f"{module}: the checkpoint holds its input_rotation tensors, but the config's "
                            "input_rotated_modules does not list it")
        else:
            problems.append(f"{module}: the checkpoint holds {', '.join(leaves)}, which its packed layout as the "
                            "config describes it does not have")
    return problems


def check_checkpoint(files: list[str | Path], expected: dict[str, tuple[tuple[int, ...], str]],
                     prefix: str = "", saved: dict[str, str] | None = None) -> None:
    """Raise ValueError naming every missing, mismatched or unexplained packed tensor (at most 5
    listed); `saved`: the name each expected key is written under, when transformers renames it on save."""
    files = [f for f in files if str(f).endswith(".safetensors")]
    if not files:
        return  # .bin checkpoints: transformers' own loader reports them
    found = read_headers(files)
    problems, missing, matched = [], [], set()
    for key, (shape, kind) in expected.items():
        name = _lookup(found, key, prefix, (saved or {}).get(key))
        if name is None:
            missing.append(key)
            continue
        matched.add(name)
        problem = _mismatch(key, found[name], shape, kind)
        if problem:
            problems.append(problem)
    problems = _missing(missing, expected) + problems + unexplained_tensors(found, matched)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("hf_astroquant: this checkpoint does not match its quantization config; refusing to "
                         "load it (the layers would hold garbage): " + "; ".join(problems[:5]) + more)
