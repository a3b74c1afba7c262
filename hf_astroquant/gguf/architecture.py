"""How each transformers architecture is written for llama.cpp: its hyperparameters, under
llama.cpp's names for that architecture (`llama`, `qwen2`, `qwen3`, `gemma3`), read from config.json
in both the transformers 5 spelling (`rope_parameters`) and the older one (`rope_theta`,
`rope_scaling`, `rope_local_base_freq`).

What llama.cpp's graph cannot express is refused with the reason (an unknown model_type, rope
scaling it has no equivalent for, Qwen sliding-window attention, Gemma 3 attention softcapping)
rather than written into a file that would load and then compute something else.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from .tensors import GGUFTensor, GGUFWriteError


@dataclass(frozen=True)
class Architecture:
    """How one transformers model_type is written for llama.cpp."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's graph uses interleaved RoPE pairs (see names.py)
    norm_shift: float  # added to every `*norm.weight` (Gemma's (1 + w) RMSNorm)
    tokenizer: str  # "auto" (BPE or sentencepiece, from the files), "bpe" or "spm"
    hidden_act: str  # the activation llama.cpp's graph for the architecture hard-codes
    interleaved_swa: bool = False  # Gemma 3: sliding-window and global layers, each with its own rope base
    text_config: bool = False  # a multimodal config: the language model's hyperparameters are in text_config

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, True, 0.0, "auto", "silu"),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, True, 0.0, "auto", "silu"),  # llama.cpp runs Mistral as llama
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, False, 0.0, "bpe", "silu"),
    "qwen3": Architecture(gguf.MODEL_ARCH.QWEN3, False, 0.0, "bpe", "silu"),
    "gemma3_text": Architecture(gguf.MODEL_ARCH.GEMMA3, False, 1.0, "spm", "gelu_pytorch_tanh", interleaved_swa=True),
    "gemma3": Architecture(gguf.MODEL_ARCH.GEMMA3, False, 1.0, "spm", "gelu_pytorch_tanh", interleaved_swa=True,
                           text_config=True),
}


# --------------------------------------------------------------------------- config (pure)

def architecture_of(config: dict) -> Architecture:
    """The record for config.json's model_type; GGUFWriteError naming it and the supported ones."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise GGUFWriteError(f"model_type {model_type!r} has no GGUF writer; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def text_config(config: dict, arch: Architecture) -> dict:
    """The language model's hyperparameters (a multimodal config nests them in text_config)."""
    if not arch.text_config:
        return config
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise GGUFWriteError(f"model_type {config.get('model_type')!r}: config.json has no text_config")
    # ids of special tokens may sit at the top level only
    return {**{k: v for k, v in config.items() if k.endswith("_token_id")}, **text}


def head_dim(cfg: dict) -> int:
    """Per-head width: config's head_dim when given (Qwen3, Gemma 3 set their own), else hidden / heads."""
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def rope_by_layer_type(cfg: dict) -> dict[str, dict]:
    """{"full_attention": params, "sliding_attention": params}, each with rope_theta and, when
    scaled, rope_type and its fields; from transformers 5's rope_parameters or the older keys."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "full_attention" in params or "sliding_attention" in params:
            full = dict(params.get("full_attention") or {})
            return {"full_attention": full, "sliding_attention": dict(params.get("sliding_attention") or full)}
        return {"full_attention": dict(params), "sliding_attention": dict(params)}
    full = {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {})}
    if "type" in full and "rope_type" not in full:  # the oldest spelling
        full["rope_type"] = full.pop("type")
    sliding = {"rope_theta": cfg.get("rope_local_base_freq", full["rope_theta"])}
    return {"full_attention": full, "sliding_attention": sliding}


def llama3_rope_factors(params: dict, dim: int) -> np.ndarray:
    """The per-frequency divisors of Llama 3's rope scaling, as llama.cpp's `rope_freqs` tensor.

    transformers scales each inverse frequency f by a piecewise rule on its wavelength 2π/f:
    unchanged below old_ctx / high_freq_factor, divided by `factor` above old_ctx / low_freq_factor,
    and in between blended: f · ((1 − s) / factor + s), s = (old_ctx / wavelength − low) / (high − low).
    llama.cpp divides f by the stored factor, so the tensor is the reciprocal of that multiplier."""
    base = float(params.get("rope_theta", 10000.0))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low) if high != low else np.zeros_like(freqs)
    multiplier = np.where(wavelen < old_ctx / high, 1.0,
                          np.where(wavelen > old_ctx / low, 1.0 / factor, (1 - smooth) / factor + smooth))
    return (1.0 / multiplier).astype(np.float32)


def layer_types(cfg: dict) -> list[str]:
    """Gemma 3's per-layer attention kind; config's layer_types, else its every-Nth-is-global pattern."""
    n = int(cfg["num_hidden_layers"])
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def _check_common(cfg: dict, arch: Architecture, model_type: str) -> None:
    act = cfg.get("hidden_act") or cfg.get("hidden_activation")
    if act is not None and act != arch.hidden_act:
        raise GGUFWriteError(f"{model_type}: hidden_act {act!r} is not {arch.hidden_act!r}, the activation "
                             f"llama.cpp's {arch.name} graph uses")
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise GGUFWriteError(f"{model_type}: use_sliding_window=True; llama.cpp's {arch.name} graph attends over the "
                             "whole context, so its outputs would differ past sliding_window tokens")


def _write_rope(writer: gguf.GGUFWriter, params: dict, model_type: str, arch: Architecture) -> np.ndarray | None:
    """The full-attention rope base and scaling keys; returns Llama 3's rope_freqs tensor when needed."""
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or "default"
    if rope_type == "default":
        return None
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return None
    if rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if params.get(key) is not None:
                add(float(params[key]))
        return None
    if rope_type == "llama3" and arch.gguf_arch == gguf.MODEL_ARCH.LLAMA:
        return None  # a tensor, not keys: made by the caller, which knows head_dim
    raise GGUFWriteError(f"{model_type}: rope_type {rope_type!r} has no llama.cpp equivalent written here; "
                         "supported: default, linear, yarn (and llama3 for llama/mistral)")


def write_architecture(writer: gguf.GGUFWriter, cfg: dict, arch: Architecture, model_type: str) -> list[GGUFTensor]:
    """Every hyperparameter key llama.cpp reads for `arch`; returns tensors the metadata implies
    (Llama 3's rope_freqs)."""
    _check_common(cfg, arch, model_type)
    n_layer, d = int(cfg["num_hidden_layers"]), head_dim(cfg)
    n_head = int(cfg["num_attention_heads"])
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(d)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    rope = rope_by_layer_type(cfg)
    _write_rope(writer, rope["full_attention"], model_type, arch)
    extra: list[GGUFTensor] = []
    if (rope["full_attention"].get("rope_type") or "default") == "llama3":
        extra.append(GGUFTensor("rope_freqs.weight", llama3_rope_factors(rope["full_attention"], d),
                                GGMLQuantizationType.F32))
    if arch.interleaved_swa:
        _write_gemma3(writer, cfg, rope, model_type, n_layer)
    elif cfg.get("sliding_window") and model_type == "mistral":
        if int(cfg["sliding_window"]) < int(cfg["max_position_embeddings"]):
            warnings.warn(f"mistral: sliding_window={cfg['sliding_window']} is not written (llama.cpp's llama graph "
                          "attends over the whole context); outputs agree up to that many tokens", stacklevel=3)
    return extra


def _write_gemma3(writer: gguf.GGUFWriter, cfg: dict, rope: dict, model_type: str, n_layer: int) -> None:
    """Gemma 3's extras: sliding window and its layer pattern, the local rope base, final softcap.

    llama.cpp's gemma3 reader assumes five sliding layers then one global (pattern 6) unless the
    file says otherwise, so a per-layer pattern is written only when the model's differs (files
    for the stock models then read the same in older llama.cpp builds). It scales the attention by
    1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B) and never softcaps attention
    logits, so a config asking for anything else is refused."""
    if cfg.get("attn_logit_softcapping"):
        raise GGUFWriteError(f"{model_type}: attn_logit_softcapping={cfg['attn_logit_softcapping']}: llama.cpp's "
                             "gemma3 graph has no attention softcapping")
    d = head_dim(cfg)
    expected = cfg["hidden_size"] // cfg["num_attention_heads"] if n_layer == 62 else d
    scalar = cfg.get("query_pre_attn_scalar", expected)
    if scalar != expected:
        raise GGUFWriteError(f"{model_type}: query_pre_attn_scalar={scalar}: llama.cpp's gemma3 graph scales queries "
                             f"by 1/sqrt({expected}) for a {n_layer}-layer model")
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    kinds = layer_types(cfg)
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown or len(kinds) != n_layer:
        raise GGUFWriteError(f"{model_type}: layer_types {kinds} must list {n_layer} of 'sliding_attention' / "
                             "'full_attention'")
    sliding = [k == "sliding_attention" for k in kinds]
    if not any(sliding) or not cfg.get("sliding_window"):
        return  # no key: llama.cpp runs every layer with global attention
    writer.add_sliding_window(int(cfg["sliding_window"]))
    if sliding != [i % 6 < 5 for i in range(n_layer)]:
        writer.add_sliding_window_pattern(sliding)
    local = rope["sliding_attention"]
    if (local.get("rope_type") or "default") != "default":
        raise GGUFWriteError(f"{model_type}: sliding layers' rope_type {local.get('rope_type')!r}: llama.cpp scales "
                             "no rope on gemma3's sliding layers")
    writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))

