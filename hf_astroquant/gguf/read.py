"""Read a GGUF file's weights back into a transformers model (the inverse of the writer's rewrites, names.py).

For checking a file, ours or anyone's, against the model it came from: every tensor is decoded
with gguf-py (what llama.cpp computes), llama's q/k row permutation and Gemma's +1 on norms are
undone, and each Linear's tensor type is reported, so that `llamacpp_harness.llamacpp_activations`
can round its inputs as llama.cpp's quantized matmul does.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from .architecture import architecture_of, text_config
from .header import check_gguf_file
from .names import text_name, unpermute_rows


def weights_from_gguf(path: str | Path, model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({parameter name of `model`: the file's tensor, decoded, in the parameter's shape},
    {Linear module name: its tensor type in the file}). A tied output reads token_embd. A corrupt or
    hostile header raises GGUFFileError (a ValueError) before gguf-py reads the file."""
    check_gguf_file(path)
    config = model.config.to_dict()
    arch = architecture_of(config)
    cfg = text_config(config, arch)
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    names = gguf.get_tensor_name_map(arch.gguf_arch, int(cfg["num_hidden_layers"]))
    def stored_for(key: str, name: str):
        g = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if g not in stored and name == "lm_head.weight":
            g = "token_embd.weight"
        if g not in stored:
            raise KeyError(f"{path}: no tensor for {key} (GGUF name {g})")
        return stored[g]

    types = {m: stored_for(m + ".weight", (text_name(m + ".weight", arch) or m)).tensor_type.name
             for m, module in model.named_modules() if hasattr(module, "in_features")}
    weights = {}
    for key, param in model.state_dict().items():
        name = text_name(key, arch)
        if name is None or not param.is_floating_point():
            continue  # another tower, or a packed layer's blocks (its type is in `types`)
        t = stored_for(key, name)
        data = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(param.shape)
        if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            heads = cfg["num_attention_heads"] if ".q_proj." in name else cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
            data = unpermute_rows(data, int(heads))
        if arch.norm_shift and name.endswith("norm.weight"):
            data = data - arch.norm_shift
        weights[key] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(param.dtype)
    return weights, types
