"""Write complete GGUF files (the format llama.cpp, Ollama and LM Studio read) from a transformers
model directory and a stream of tensors.

A GGUF file is a key/value header plus named tensors. llama.cpp finds everything it needs in that
header, so the writer's real work is the metadata:

- the architecture's hyperparameters, under llama.cpp's names for that architecture (`llama`,
  `qwen2`, `qwen3`, `gemma3`), read from config.json, in both the transformers 5 spelling
  (`rope_parameters`) and the older one (`rope_theta`, `rope_scaling`, `rope_local_base_freq`);
- the tokenizer, rebuilt from tokenizer.json / tokenizer.model: a byte-level BPE (`gpt2`) with its
  merges and the name of llama.cpp's pre-tokenizer that splits text the way tokenizer.json does,
  or a sentencepiece vocabulary (`llama`) with the scores llama.cpp's merge order comes from;
- special token ids, whether a BOS/EOS is added, the chat template.

Tensors keep transformers' (out, in) layout; the writer renames them (gguf's TensorNameMap) and
applies the two rewrites llama.cpp expects. Its `llama` graph applies RoPE to adjacent pairs of
each head's dimensions, transformers' Llama to the two halves, so q_proj / k_proj output rows are
permuted: row r = h·d + i·(d/2) + j (head h, half i, j < d/2) moves to h·d + 2j + i. The permutation
only reorders output rows, so it applies unchanged to already-packed quantized rows. And Gemma 3's
RMSNorm multiplies by (1 + w) where llama.cpp multiplies by w, so norm weights are written w + 1.
Qwen2/3 and Gemma 3 already use the half-split RoPE llama.cpp calls NEOX: no permutation.

What llama.cpp's graph cannot express is refused with the reason (an unknown model_type, rope
scaling it has no equivalent for, Qwen sliding-window attention, Gemma 3 attention softcapping, a
pre-tokenizer whose llama.cpp counterpart is unknown) rather than written into a file that would
load and then compute something else.
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, TokenType

FLOAT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
FULL_PRECISION_FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16}


class GGUFWriteError(ValueError):
    """The model, its tokenizer or a tensor cannot be written as a GGUF llama.cpp would run
    correctly; the message names the value and what would be accepted."""


@dataclass(frozen=True)
class Architecture:
    """How one transformers model_type is written for llama.cpp."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's graph uses interleaved RoPE pairs (see the module docstring)
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

# Where a multimodal checkpoint keeps its language model (transformers 5, then 4.x), and what
# belongs to the other towers (not written: a GGUF for llama.cpp's text model holds the text model).
TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                 "language_model.lm_head.": "lm_head."}
OTHER_TOWERS = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


@dataclass
class GGUFTensor:
    """One tensor to write, under its transformers state-dict name.

    F32 / F16: `data` is the float array of the transformers shape, (out, in) for a matrix (any
    float dtype; it is cast to `ggml_type`). Quantized types: `data` is uint8 of shape
    (out, bytes_per_row), each row already packed in GGML's block layout for `ggml_type`."""

    name: str
    data: np.ndarray
    ggml_type: GGMLQuantizationType


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


# --------------------------------------------------------------------------- tokenizer (pure)

# The Split regexes of Llama 3's and Qwen2's tokenizer.json: data of those tokenizers, matched to
# recognise them (llama.cpp's pre-tokenizers `llama-bpe` and `qwen2` implement exactly these).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# A pre-tokenizer summarised as a tuple of steps → llama.cpp's name for the same splitting.
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",  # GPT-2's regex after splitting every digit
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


@dataclass
class Vocabulary:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (sentencepiece)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None  # sentencepiece only
    add_space_prefix: bool = False


def pre_tokenizer_steps(pre_tokenizer: dict | None) -> tuple:
    """tokenizer.json's pre_tokenizer as a tuple of (kind, the one setting that changes the split)."""
    if not pre_tokenizer:
        return ()
    items = pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    steps = []
    for p in items:
        kind = p.get("type")
        if kind == "ByteLevel":
            if p.get("add_prefix_space"):
                raise GGUFWriteError("tokenizer.json: ByteLevel(add_prefix_space=True) has no llama.cpp equivalent "
                                     "(its BPE pre-tokenizers never prepend a space)")
            steps.append((kind, bool(p.get("use_regex", True))))
        elif kind == "Digits":
            steps.append((kind, bool(p.get("individual_digits"))))
        elif kind == "Split":
            pattern = p.get("pattern", {})
            steps.append((kind, pattern.get("Regex", pattern.get("String"))))
        else:
            steps.append((kind, None))
    return tuple(steps)


def bpe_pre(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for tokenizer.json's; GGUFWriteError when none is known."""
    steps = pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"))
    if steps not in PRE_TOKENIZERS:
        raise GGUFWriteError(f"tokenizer.json's pre-tokenizer {steps} matches none whose llama.cpp counterpart is "
                             f"known ({sorted(set(PRE_TOKENIZERS.values()))}); pass tokenizer_pre= with llama.cpp's "
                             "name for it if you know it")
    return PRE_TOKENIZERS[steps]


def _added_tokens(model_dir: Path, tokenizer_json: dict | None) -> list[dict]:
    """Added tokens ({id, content, special}) from tokenizer.json, else tokenizer_config.json."""
    if tokenizer_json is not None:
        return list(tokenizer_json.get("added_tokens", []))
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    return [{"id": int(i), **t} for i, t in (config.get("added_tokens_decoder") or {}).items()]


def _place(tokens: list, types: list, scores: list | None, token_id: int, text: str, kind: int, vocab_size: int,
           score: float = 0.0) -> None:
    if not 0 <= token_id < vocab_size:
        raise GGUFWriteError(f"token {text!r} has id {token_id}, outside the model's vocab_size {vocab_size}")
    tokens[token_id], types[token_id] = text, kind
    if scores is not None:
        scores[token_id] = score


def _padded(vocab_size: int, scores: bool) -> tuple[list, list, list | None]:
    """Token slots for every embedding row; rows no token names are llama.cpp's unused [PADi]."""
    return ([f"[PAD{i}]" for i in range(vocab_size)], [TokenType.UNUSED] * vocab_size,
            [-10000.0] * vocab_size if scores else None)


def _overlay_added(tokens, types, scores, added: list[dict], vocab_size: int, spm: bool) -> None:
    """Added tokens: CONTROL when special (llama.cpp matches and never splits them), else
    USER_DEFINED; sentencepiece user tokens are stored with spaces, as llama.cpp matches raw text."""
    for t in added:
        text = t["content"]
        if t.get("special"):
            _place(tokens, types, scores, int(t["id"]), text, TokenType.CONTROL, vocab_size, 0.0)
        else:
            _place(tokens, types, scores, int(t["id"]), text.replace("\u2581", " ") if spm else text,
                   TokenType.USER_DEFINED, vocab_size, -1000.0)


def bpe_vocabulary(tokenizer_json: dict, added: list[dict], vocab_size: int, pre: str) -> Vocabulary:
    """A byte-level BPE vocabulary (tokens stay in tokenizer.json's byte-to-unicode spelling, as
    llama.cpp's BPE expects)."""
    tokens, types, _ = _padded(vocab_size, scores=False)
    for text, token_id in tokenizer_json["model"]["vocab"].items():
        _place(tokens, types, None, int(token_id), text, TokenType.NORMAL, vocab_size)
    _overlay_added(tokens, types, None, added, vocab_size, spm=False)
    return Vocabulary("gpt2", pre, tokens, types)


def merge_scores(merges: list) -> dict[str, float]:
    """Sentencepiece scores for a BPE-with-byte-fallback vocabulary (Gemma's tokenizer.json):
    llama.cpp's sentencepiece tokenizer repeatedly joins the adjacent pair whose joined token has
    the highest score, transformers applies the merge of lowest rank, so the token a merge of rank
    r makes scores −r (its earliest merge when several make it)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether the tokenizer prepends "▁" to the text (Llama 2 / Mistral do, Gemma does not)."""
    def steps(node):
        if not node:
            return []
        inner = node.get("normalizers") or node.get("pretokenizers")
        return [s for n in inner for s in steps(n)] if inner else [node]

    for s in steps(tokenizer_json.get("normalizer")) + steps(tokenizer_json.get("pre_tokenizer")):
        if s.get("type") == "Prepend" and s.get("prepend") == "\u2581":
            return True
        if s.get("type") == "Metaspace" and (s.get("prepend_scheme") in ("always", "first") or s.get("add_prefix_space")):
            return True
    return False


def spm_vocabulary_from_json(tokenizer_json: dict, added: list[dict], vocab_size: int) -> Vocabulary:
    model = tokenizer_json["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise GGUFWriteError("tokenizer.json: a sentencepiece vocabulary needs tokenizer.model or a BPE model with "
                             f"byte_fallback (found type={model.get('type')!r}, byte_fallback={model.get('byte_fallback')})")
    scores_of = merge_scores(model.get("merges") or [])
    tokens, types, scores = _padded(vocab_size, scores=True)
    for text, token_id in model["vocab"].items():
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind, score = TokenType.BYTE, 0.0
        elif text == model.get("unk_token"):
            kind, score = TokenType.UNKNOWN, 0.0
        else:
            kind, score = TokenType.NORMAL, scores_of.get(text, 0.0 if len(text) == 1 else -1e9)
        _place(tokens, types, scores, int(token_id), text, kind, vocab_size, score)
    _overlay_added(tokens, types, scores, added, vocab_size, spm=True)
    return Vocabulary("llama", "default", tokens, types, scores, adds_space_prefix(tokenizer_json))


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def protobuf_fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message: varints as int, 32-bit fields as
    4 bytes, length-delimited as bytes (enough to read a sentencepiece model without its library)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise GGUFWriteError(f"tokenizer.model: protobuf wire type {wire} is not one sentencepiece writes")
        yield field, wire, value


def read_sentencepiece(path: Path) -> tuple[list[tuple[str, float, int]], bool]:
    """([(piece, score, type)], add_dummy_prefix) of a sentencepiece tokenizer.model.

    ModelProto field 1 is the repeated SentencePiece {1: piece, 2: score (float), 3: type}, whose
    type numbers (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6) are GGUF's own
    token types; field 3 is the NormalizerSpec, whose field 3 is add_dummy_prefix (default true)."""
    pieces, dummy_prefix = [], True
    for field, wire, value in protobuf_fields(path.read_bytes()):
        if field == 1 and wire == 2:
            piece, score, kind = "", 0.0, int(TokenType.NORMAL)
            for f, w, v in protobuf_fields(value):
                if f == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            pieces.append((piece, score, kind))
        elif field == 3 and wire == 2:
            for f, w, v in protobuf_fields(value):
                if f == 3 and w == 0:
                    dummy_prefix = bool(v)
    if not pieces:
        raise GGUFWriteError(f"{path}: no sentencepiece pieces found (not a sentencepiece model?)")
    return pieces, dummy_prefix


def spm_vocabulary_from_model(path: Path, added: list[dict], vocab_size: int) -> Vocabulary:
    pieces, dummy_prefix = read_sentencepiece(path)
    tokens, types, scores = _padded(vocab_size, scores=True)
    for token_id, (piece, score, kind) in enumerate(pieces):
        _place(tokens, types, scores, token_id, piece, kind, vocab_size, score)
    _overlay_added(tokens, types, scores, added, vocab_size, spm=True)
    return Vocabulary("llama", "default", tokens, types, scores, dummy_prefix)


def read_vocabulary(model_dir: Path, arch: Architecture, vocab_size: int, tokenizer_pre: str | None = None) -> Vocabulary:
    """The GGUF vocabulary of the tokenizer files in `model_dir`, padded to the model's vocab_size."""
    tokenizer_json = _read_json(model_dir / "tokenizer.json")
    spm_file = model_dir / "tokenizer.model"
    added = _added_tokens(model_dir, tokenizer_json)
    kind = arch.tokenizer
    if kind == "auto":
        byte_fallback = bool(tokenizer_json and tokenizer_json["model"].get("byte_fallback"))
        kind = "spm" if byte_fallback or (tokenizer_json is None and spm_file.is_file()) else "bpe"
    if kind == "spm":
        if spm_file.is_file():
            vocab = spm_vocabulary_from_model(spm_file, added, vocab_size)
            if tokenizer_json is not None:  # the fast tokenizer is what transformers runs: its prefix rule wins
                vocab.add_space_prefix = adds_space_prefix(tokenizer_json)
        elif tokenizer_json is not None:
            vocab = spm_vocabulary_from_json(tokenizer_json, added, vocab_size)
        else:
            raise GGUFWriteError(f"{model_dir} has neither tokenizer.model nor tokenizer.json")
    else:
        if tokenizer_json is None:
            raise GGUFWriteError(f"{model_dir} has no tokenizer.json (a BPE vocabulary is read from it)")
        if tokenizer_json["model"].get("type") != "BPE":
            raise GGUFWriteError(f"tokenizer.json: model type {tokenizer_json['model'].get('type')!r} is not BPE")
        vocab = bpe_vocabulary(tokenizer_json, added, vocab_size, tokenizer_pre or bpe_pre(tokenizer_json))
    if tokenizer_pre and vocab.model == "llama":
        raise GGUFWriteError(f"tokenizer_pre={tokenizer_pre!r}: a sentencepiece vocabulary has no pre-tokenizer")
    seen: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        if t in seen:
            raise GGUFWriteError(f"token {t!r} appears at ids {seen[t]} and {i}; llama.cpp needs unique tokens")
        seen[t] = i
    return vocab


def special_tokens_added(model_dir: Path) -> tuple[bool, bool] | None:
    """(BOS added, EOS added) by the transformers tokenizer itself when asked for special tokens;
    None when it cannot be loaded here. Asking it is the reliable way: the files spell this in
    tokenizer_config.json, a TemplateProcessing post-processor or the tokenizer class's default."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        ids = tok("Hello world", add_special_tokens=True)["input_ids"]
        plain = tok("Hello world", add_special_tokens=False)["input_ids"]
    except Exception:
        return None
    bos, eos = tok.bos_token_id, tok.eos_token_id
    added_bos = bos is not None and len(ids) > len(plain) and ids[0] == bos and (not plain or plain[0] != bos)
    added_eos = eos is not None and len(ids) > len(plain) and ids[-1] == eos and (not plain or plain[-1] != eos)
    return added_bos, added_eos


def write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types([int(t) for t in vocab.types])
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    if vocab.model == "gpt2" and not special.merges:
        raise GGUFWriteError(f"{model_dir}: the BPE tokenizer has no merges (tokenizer.json model.merges or merges.txt)")
    added = special_tokens_added(model_dir)
    if added is not None:
        special.add_special_token["bos"], special.add_special_token["eos"] = added
    special.add_special_token.setdefault("bos", False)  # llama.cpp's default differs by pre-tokenizer: say it
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------- tensors (pure)

def permute_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q_proj / k_proj (or their bias) from transformers' half-split RoPE order to
    llama.cpp's interleaved one; any trailing shape (packed bytes included) rides along."""
    out = data.shape[0]
    if out % (2 * n_head):
        raise GGUFWriteError(f"{out} rows cannot be split into {n_head} heads of an even width")
    return (data.reshape(n_head, 2, out // n_head // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape))


def unpermute_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows` (for reading a file back)."""
    out = data.shape[0]
    return (data.reshape(n_head, out // n_head // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape))


def text_name(name: str, arch: Architecture) -> str | None:
    """The language-model state-dict name of `name`; None for another tower's tensor or a buffer."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if arch.text_config:
        if name.startswith(OTHER_TOWERS):
            return None
        for prefix, plain in TEXT_PREFIXES.items():
            if name.startswith(prefix):
                return plain + name[len(prefix):]
    return name


def _cast_float(t: GGUFTensor) -> np.ndarray:
    data = np.asarray(t.data)
    if not np.issubdtype(data.dtype, np.floating):
        raise GGUFWriteError(f"{t.name}: ggml_type {t.ggml_type.name} needs float data, got {data.dtype}")
    out = data.astype(FLOAT_TYPES[t.ggml_type])
    if np.isfinite(data).all() and not np.isfinite(out).all():
        raise GGUFWriteError(f"{t.name}: values overflow {t.ggml_type.name} "
                             f"(largest magnitude {float(np.abs(data).max()):.3g})")
    return np.ascontiguousarray(out)


def _check_packed(t: GGUFTensor) -> np.ndarray:
    data = np.asarray(t.data)
    block, type_size = gguf.GGML_QUANT_SIZES[t.ggml_type]
    if data.dtype != np.uint8 or data.ndim != 2:
        raise GGUFWriteError(f"{t.name}: a {t.ggml_type.name} tensor must be uint8 of shape (out, bytes_per_row), "
                             f"got {data.dtype} {data.shape}")
    if data.shape[1] % type_size:
        raise GGUFWriteError(f"{t.name}: {data.shape[1]} bytes per row is not a whole number of {t.ggml_type.name} "
                             f"blocks ({type_size} bytes per {block} weights)")
    return np.ascontiguousarray(data)


def prepare_tensor(t: GGUFTensor, arch: Architecture, cfg: dict, names: gguf.TensorNameMap) -> tuple[str, np.ndarray] | None:
    """(GGUF name, the array to store) for one tensor, or None when it is not written."""
    name = text_name(t.name, arch)
    if name is None or (name == "lm_head.weight" and cfg.get("tie_word_embeddings")):
        return None  # tied: llama.cpp reuses token_embd as the output matrix
    gguf_name = t.name if t.name == "rope_freqs.weight" else names.get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise GGUFWriteError(f"tensor {t.name!r} has no GGUF name for llama.cpp's {arch.name} architecture")
    data = _cast_float(t) if t.ggml_type in FLOAT_TYPES else _check_packed(t)
    if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        heads = cfg["num_attention_heads"] if ".q_proj." in name else cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        data = np.ascontiguousarray(permute_rows(data, int(heads)))
    if arch.norm_shift and name.endswith("norm.weight"):
        if t.ggml_type not in FLOAT_TYPES:
            raise GGUFWriteError(f"{t.name}: a norm weight must be F32 or F16 (it is written with +{arch.norm_shift})")
        data = (data.astype(np.float32) + arch.norm_shift).astype(data.dtype)
    if gguf_name == "token_embd.weight" and data.shape[0] != int(cfg["vocab_size"]):
        raise GGUFWriteError(f"{t.name}: {data.shape[0]} rows, but config's vocab_size is {cfg['vocab_size']}")
    return gguf_name, data


# --------------------------------------------------------------------------- the file

def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_model_config(model_dir: Path) -> dict:
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise FileNotFoundError(f"{model_dir} has no config.json: not a saved transformers model directory")
    return config


WRITTEN_BY = "hf-astroquant"


def write_gguf(out_path: str | Path, model_dir: str | Path, tensors: Iterable[GGUFTensor], *,
               file_type: LlamaFileType | int, name: str | None = None, tokenizer_pre: str | None = None) -> dict:
    """Write the GGUF file `out_path` for the model in `model_dir` (its config.json and tokenizer
    files) holding `tensors`; returns a summary: path, arch, tensors, bytes, file_type, tokenizer.

    `tokenizer_pre` names llama.cpp's BPE pre-tokenizer when it cannot be recognised from
    tokenizer.json. Tensors are spooled to a temporary file as they arrive (memory stays bounded
    for a generator over a large model)."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = read_model_config(model_dir)
    arch = architecture_of(config)
    cfg = text_config(config, arch)
    model_type = config["model_type"]
    vocab = read_vocabulary(model_dir, arch, int(cfg["vocab_size"]), tokenizer_pre)

    writer = gguf.GGUFWriter(str(out_path), arch.name, use_temp_file=True)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_quantized_by(WRITTEN_BY)  # marks the file ours: `--overwrite` replaces only such a file
        writer.add_name(name or Path(str(config.get("_name_or_path") or model_dir.name)).name or model_dir.name)
        extra = write_architecture(writer, cfg, arch, model_type)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, model_dir, vocab)
        names = gguf.get_tensor_name_map(arch.gguf_arch, int(cfg["num_hidden_layers"]))
        count, types = 0, {}
        for t in _chain(extra, tensors):
            prepared = prepare_tensor(t, arch, cfg, names)
            if prepared is None:
                continue
            gguf_name, data = prepared
            raw = None if t.ggml_type in FLOAT_TYPES else t.ggml_type
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
            count += 1
            types[t.ggml_type.name] = types.get(t.ggml_type.name, 0) + 1
        if count == 0:
            raise GGUFWriteError("no tensors to write")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        out_path.unlink(missing_ok=True)
        raise
    writer.close()
    return {"path": str(out_path), "arch": arch.name, "model_type": model_type, "tensors": count,
            "tensor_types": types, "bytes": out_path.stat().st_size, "file_type": int(file_type),
            "tokenizer": vocab.model, "tokenizer_pre": vocab.pre}


def _chain(first: Iterable[GGUFTensor], rest: Iterable[GGUFTensor]) -> Iterator[GGUFTensor]:
    yield from first
    yield from rest


def _shards(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no .safetensors files")
    return files


def full_precision_tensors(model_dir: str | Path, dtype: str = "F16") -> Iterator[GGUFTensor]:
    """Every tensor of a full-precision checkpoint, matrices as `dtype` ("F16" or "F32"), vectors
    (norms, biases) as F32 (llama.cpp's convert keeps them so: they are small and F16 norms lose digits)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    if dtype not in FULL_PRECISION_FILE_TYPES:
        raise ValueError(f"dtype={dtype!r} is not valid; allowed: {sorted(FULL_PRECISION_FILE_TYPES)}")
    q = read_model_config(model_dir).get("quantization_config")
    if q:
        raise GGUFWriteError(f"{model_dir} is a quantized checkpoint (quant_method {q.get('quant_method')!r}); "
                             "full_precision_tensors reads full-precision ones")
    matrix_type = GGMLQuantizationType[dtype]
    for shard in _shards(model_dir):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if not t.is_floating_point():
                    raise GGUFWriteError(f"{shard.name}: tensor {key!r} is {t.dtype}, not a float")
                data = t.float().numpy()
                yield GGUFTensor(key, data, matrix_type if data.ndim >= 2 else GGMLQuantizationType.F32)


def export_gguf_full_precision(model_dir: str | Path, out_path: str | Path, gguf_type: str = "F16",
                               name: str | None = None) -> dict:
    """A GGUF copy of a full-precision checkpoint directory, its matrices in F16 or F32."""
    if gguf_type not in FULL_PRECISION_FILE_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is not valid; allowed: {sorted(FULL_PRECISION_FILE_TYPES)}")
    return write_gguf(out_path, model_dir, full_precision_tensors(model_dir, gguf_type),
                      file_type=FULL_PRECISION_FILE_TYPES[gguf_type], name=name)
