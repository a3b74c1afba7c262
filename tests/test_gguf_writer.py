"""The GGUF writer: metadata, tensor round trips, and llama.cpp's logits and tokens against transformers'.

Each family (SmolLM2-style Llama, Llama 3 with its rope scaling, Mistral, Qwen2, Qwen3, Gemma 3 and
the multimodal Gemma 3 config) is a tiny random model built here, with a tokenizer trained here on
a few sentences in that family's style (so nothing is downloaded). The llama.cpp checks run
llama-cpp-python in a subprocess with the interpreter named by LLAMACPP_PYTHON (default: the
project's .ci/llamacpp-env) and are skipped when it cannot import llama_cpp.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType

from hf_astroquant.gguf.architecture import ARCHITECTURES, llama3_rope_factors
from hf_astroquant.gguf.names import permute_rows, unpermute_rows
from hf_astroquant.gguf.sentencepiece import read_sentencepiece
from hf_astroquant.gguf.tensors import GGUFTensor, GGUFWriteError
from hf_astroquant.gguf.writer import export_gguf_full_precision, full_precision_tensors, write_gguf
from engines.llamacpp_harness import llamacpp_activations  # noqa: F401 (used by test_gguf_export too)

REPO = Path(__file__).resolve().parents[1]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model is trained on a few sentences so that tokenization has real merges.",
    "Quantization maps each weight to one of a few levels, and the scales are stored per group.",
    "In 2024 there were 366 days; 1234 + 5678 = 6912.",
    "def square(x):\n    return x * x\n",
    "I've been told they're here, we'll see what's next. You'd like some tea?",
    "llama.cpp reads GGUF files: a header of keys and values, then the tensors.",
    "Hello, world! Hello again, world of weights and tokens.",
    "The rotary embedding turns pairs of dimensions by an angle that grows with position.",
    "Tabs\tand  double  spaces   and newlines\n\nare whitespace too.",
]
TEXTS = [  # what llama.cpp's tokenizer and transformers' must split identically (accents and emoji fall back to bytes)
    "The quick brown fox, told in 2024, jumps over 12345 lazy dogs.",
    "def weights(x):\n    return x ** 2  # squares\n\n",
    "Café naïve — ✅ 🦙 and I've been 'told' he's there.",
]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


# --------------------------------------------------------------------------- tokenizers built here

def byte_level_tokenizer(kind: str, specials: list[str], vocab_size: int = 400):
    """A byte-level BPE trained on CORPUS with the pre-tokenizer of SmolLM2 ("smollm": every digit
    split, then GPT-2's regex), Llama 3 ("llama3") or Qwen2 ("qwen2"), as their tokenizer.json has it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from hf_astroquant.gguf.vocabulary import LLAMA3_SPLIT, QWEN2_SPLIT

    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    if kind == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        split = LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def byte_fallback_vocab(specials: list[str], prefix: bool, vocab_size: int = 256):
    """(vocab, merges) of a sentencepiece-style BPE: specials, the 256 <0xXX> byte tokens, then
    pieces with "▁" for spaces trained on CORPUS (Llama 2 / Mistral / Gemma's layout)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never")
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    trained = json.loads(tok.to_str())["model"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    return vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]


def save_bpe_tokenizer(path: Path, kind: str, bos: str | None, eos: str, specials: list[str], add_bos: bool):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_tokenizer(kind, specials)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token=specials[0])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


# --------------------------------------------------------------------------- tiny models

def randomize_vectors(model, norm_center: float) -> None:
    """Norm weights around `norm_center` and biases away from zero, so that a missed +1 or bias shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                center = norm_center if "norm" in name else 0.0
                p.copy_(center + 0.2 * torch.randn(p.shape, generator=g))


COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.05)


def build_family(family: str, path: Path):
    """(model, tokenizer) of `family`, saved in `path` as transformers would save them."""
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GemmaTokenizer, LlamaConfig, LlamaTokenizer,
                              MistralConfig, Qwen2Config, Qwen3Config)

    torch.manual_seed(0)
    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if family == "smollm":
        tok = save_bpe_tokenizer(path, "smollm", "<|im_start|>", "<|im_end|>", chatml, add_bos=False)
        cfg = LlamaConfig(**COMMON, vocab_size=512, tie_word_embeddings=True, rope_theta=100000.0,
                          bos_token_id=1, eos_token_id=2, pad_token_id=2)
    elif family == "llama3":
        specials = ["<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"]
        tok = save_bpe_tokenizer(path, "llama3", "<|begin_of_text|>", "<|end_of_text|>", specials, add_bos=True)
        cfg = LlamaConfig(**COMMON, vocab_size=512, tie_word_embeddings=False, attention_bias=True,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64})
    elif family == "mistral":
        vocab, merges = byte_fallback_vocab(["<unk>", "<s>", "</s>"], prefix=True)
        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
        tok.save_pretrained(path)
        cfg = MistralConfig(**COMMON, vocab_size=640, sliding_window=None, tie_word_embeddings=False,
                            head_dim=64, bos_token_id=1, eos_token_id=2)
    elif family in ("qwen2", "qwen3"):
        tok = save_bpe_tokenizer(path, "qwen2", None, "<|im_end|>", chatml, add_bos=False)
        if family == "qwen2":
            cfg = Qwen2Config(**COMMON, vocab_size=512, tie_word_embeddings=True, rope_theta=1000000.0,
                              eos_token_id=2)
        else:  # head_dim 64 with 4 heads over a 128-wide residual: Qwen3's own head width
            cfg = Qwen3Config(**{**COMMON, "hidden_size": 128}, head_dim=64, vocab_size=512, tie_word_embeddings=False,
                              eos_token_id=2)
    elif family in ("gemma3", "gemma3_text"):
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
        vocab, merges = byte_fallback_vocab(specials, prefix=False)
        tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
        tok.save_pretrained(path)
        # a 4-token window over the 12+ tokens compared, and a layer order unlike llama.cpp's default
        cfg = Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3}, head_dim=64, vocab_size=640,
                               sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               query_pre_attn_scalar=64, final_logit_softcapping=30.0,
                               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                               pad_token_id=0, eos_token_id=1, bos_token_id=2)
    else:
        raise ValueError(family)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    randomize_vectors(model, norm_center=0.0 if family.startswith("gemma") else 1.0)
    model.save_pretrained(path)
    if family == "gemma3":
        as_multimodal(path)
    return model, tok


def as_multimodal(path: Path) -> None:
    """Rewrite a saved Gemma 3 text model as Gemma3ForConditionalGeneration's checkpoint would look:
    config nested in text_config, language-model tensors under model.language_model., a vision
    tensor beside them (which the writer must leave out)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((path / "config.json").read_text())
    outer = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
             "text_config": config, "vision_config": {"model_type": "siglip_vision_model"},
             "eos_token_id": config["eos_token_id"], "bos_token_id": config["bos_token_id"]}
    (path / "config.json").write_text(json.dumps(outer))
    state = load_file(str(path / "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
    renamed["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(8, 3, 2, 2)
    save_file(renamed, str(path / "model.safetensors"), metadata={"format": "pt"})


FAMILIES = ["smollm", "llama3", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3"]
EXPECTED = {  # family → (gguf arch, tokenizer model, pre-tokenizer, permuted q/k)
    "smollm": ("llama", "gpt2", "smollm", True), "llama3": ("llama", "gpt2", "llama-bpe", True),
    "mistral": ("llama", "llama", "default", True), "qwen2": ("qwen2", "gpt2", "qwen2", False),
    "qwen3": ("qwen3", "gpt2", "qwen2", False), "gemma3_text": ("gemma3", "llama", "default", False),
    "gemma3": ("gemma3", "llama", "default", False),
}


# --------------------------------------------------------------------------- llama.cpp in a subprocess

def need_llamacpp() -> None:
    from engines import llamacpp_harness

    reason = llamacpp_harness.unavailable_reason()
    if reason:
        pytest.skip(reason)


def run_llamacpp(gguf_path: Path, ids: list[list[int]], texts: list[str], work: Path, threads: int = 2):
    """(llama.cpp's logits per id sequence as (n, vocab) arrays, with an F32 KV cache; its tokens for
    each text)."""
    from engines import llamacpp_harness

    need_llamacpp()
    logits = llamacpp_harness.logits(gguf_path, ids, threads=threads, f32_kv_cache=True)
    return logits, (llamacpp_harness.tokenize(gguf_path, texts) if texts else [])


def position_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """max |Δlogit| of each position, relative to the largest |logit| of b."""
    return np.abs(a - b).max(axis=1) / np.abs(b).max()


# Where our rounding of the activations reproduces llama.cpp's matmul to float round-off (measured:
# Q4_0, Q8_0 and the K-quants, in every family test). Gemma's GELU (llama.cpp looks it up in an fp16
# table) leaves about 1 % at every position. Q5_0 (llama.cpp's tinyBLAS kernel) agrees to round-off
# at most positions and by about 1 % at others: on a tiny SmolLM-style Llama, exact at every position
# with only its attention or only its MLP matrices in Q5_0, not with both; Q4_1 and Q5_1 agreed to
# round-off there, so they are left out only for want of a family test that shows it.
EXACT_ACTIVATION_TYPES = {"Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def check_against_rounded_activations(name: str, llama_logits: np.ndarray, ours: np.ndarray, exact: bool = True
                                      ) -> None:
    """llama.cpp against our model with its activations rounded the same way. `exact`: most positions
    agree to float round-off (measured 2e-7..6e-7); a position where one activation sits on a half step
    and rounds the other way differs more (measured up to 1.7e-2), so all must stay below 3e-2.
    Otherwise every position within 3e-2. A wrong block, permutation or norm is tens of percent."""
    errs = position_errors(llama_logits, ours)
    print(f"{name}: llama.cpp vs ours with llama.cpp's activation rounding: median {np.median(errs):.1e}, "
          f"max {errs.max():.1e} over {len(errs)} positions")
    assert errs.max() < 3e-2, errs
    if exact:
        assert np.median(errs) < 1e-5, errs


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, model dir, model, tokenizer, F32 GGUF path, summary) per family, built once."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    model, tok = build_family(name, path / "hf")
    out = path / f"{name}-f32.gguf"
    summary = export_gguf_full_precision(path / "hf", out, "F32")
    return name, path / "hf", model, tok, out, summary


def fields_of(path: Path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


# --------------------------------------------------------------------------- metadata and round trips

def test_metadata(family):
    name, hf_dir, model, tok, out, summary = family
    arch, tok_model, pre, _ = EXPECTED[name]
    cfg = model.config
    f = fields_of(out)
    assert summary["arch"] == arch and f["general.architecture"] == arch
    assert f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    expected = {
        "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.key_length": head_dim, "attention.value_length": head_dim, "rope.dimension_count": head_dim,
        "vocab_size": cfg.vocab_size,
    }
    for key, value in expected.items():
        assert f[f"{arch}.{key}"] == value, key
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(rope["rope_theta"])

    assert f["tokenizer.ggml.model"] == tok_model and f["tokenizer.ggml.pre"] == pre
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size  # padded: one token per embedding row
    assert tokens[len(tok):] == [f"[PAD{i}]" for i in range(len(tok), cfg.vocab_size)]
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items() if t not in tok.get_added_vocab())
    types = f["tokenizer.ggml.token_type"]
    for t, i in tok.get_added_vocab().items():
        assert tokens[i] == t and types[i] == TokenType.CONTROL
    if tok_model == "gpt2":
        assert len(f["tokenizer.ggml.merges"]) == len(json.loads((hf_dir / "tokenizer.json").read_text())["model"]["merges"])
    else:
        assert len(f["tokenizer.ggml.scores"]) == cfg.vocab_size
        assert types[vocab["<0x41>"]] == TokenType.BYTE
        assert f["tokenizer.ggml.add_space_prefix"] is (name == "mistral")
    assert f.get("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    if tok.bos_token_id is not None:
        assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert f["tokenizer.ggml.add_bos_token"] is (name in ("llama3", "mistral", "gemma3", "gemma3_text"))
    if name in ("smollm", "llama3", "qwen2", "qwen3"):
        assert f["tokenizer.chat_template"] == CHAT_TEMPLATE

    if arch == "gemma3":
        assert f["gemma3.attention.sliding_window"] == 4
        assert f["gemma3.attention.sliding_window_pattern"] == [True, False, True]
        assert f["gemma3.rope.freq_base_swa"] == pytest.approx(10000.0)
        assert f["gemma3.final_logit_softcapping"] == pytest.approx(30.0)
    if name == "llama3":
        assert "llama.rope.scaling.type" not in f  # Llama 3's scaling is the rope_freqs tensor


def test_tensors_round_trip(family):
    """Every tensor of the model is in the file under its GGUF name, equal to transformers' once
    llama.cpp's rewrites are undone (q/k rows un-permuted, Gemma's +1 taken off); a tied output is absent."""
    name, hf_dir, model, tok, out, _ = family
    arch_name, _, _, permuted = EXPECTED[name]
    cfg = model.config
    reader = GGUFReader(str(out))
    stored = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(ARCHITECTURES[cfg.model_type].gguf_arch, cfg.num_hidden_layers)
    expected_names = set()
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        expected_names.add(gname)
        t = stored[gname]
        assert t.tensor_type == GGMLQuantizationType.F32
        data = np.array(t.data).reshape(value.shape)
        if permuted and (".q_proj." in key or ".k_proj." in key):
            heads = cfg.num_attention_heads if ".q_proj." in key else cfg.num_key_value_heads
            data = unpermute_rows(data, heads)
        if name.startswith("gemma") and key.endswith("norm.weight"):
            data = data - 1.0
            np.testing.assert_allclose(data, value.numpy(), atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(data, value.numpy(), err_msg=key)
    extra = set(stored) - expected_names
    assert extra == ({"rope_freqs.weight"} if name == "llama3" else set())
    assert ("output.weight" in stored) is (not cfg.tie_word_embeddings)


# --------------------------------------------------------------------------- llama.cpp

def test_llamacpp_logits_and_tokens(family, tmp_path):
    """The real check of the metadata: llama.cpp runs the F32 file to transformers' logits, and its
    tokenizer splits text into transformers' ids.

    Tolerance 1e-3 of the largest |logit|: with F32 weights the two differ only by summation order
    and llama.cpp's F32 kernels (rope, softmax, rms_norm in float); measured 1e-6..1e-5 here. A wrong
    permutation, norm shift, rope base, head width or window moves logits by tens of percent."""
    name, hf_dir, model, tok, out, _ = family
    ids = tok(TEXTS[0], add_special_tokens=True)["input_ids"][:24]
    assert len(ids) >= 12
    logits, tokens = run_llamacpp(out, [ids], TEXTS, tmp_path)
    expected = hf_logits(model, ids)
    err = relative_error(logits[0][:, : model.config.vocab_size], expected)
    print(f"{name}: llama.cpp vs transformers, F32 file, max |Δlogit| / max |logit| = {err:.2e}")
    assert err < 1e-3, f"{name}: relative logits error {err:.3g}"
    for text, got in zip(TEXTS, tokens):
        assert got == tok(text, add_special_tokens=True)["input_ids"], f"{name}: tokens differ on {text!r}"


def q8_0_tensors(model_dir: Path):
    """The checkpoint with every matrix as Q8_0 packed rows (what a quantizer hands write_gguf)."""
    for t in full_precision_tensors(model_dir, "F32"):
        if t.data.ndim == 2 and t.data.shape[1] % 32 == 0:
            yield GGUFTensor(t.name, gguf.quants.quantize(t.data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        else:
            yield t


@pytest.mark.parametrize("name", ["smollm", "qwen3"])
def test_packed_q8_0_file(name, tmp_path):
    """Raw quantized rows go in as given (permuted row-wise for llama); llama.cpp runs the file to the
    logits of the transformers model holding the same Q8_0-rounded weights.

    llama.cpp's Q8_0 matmul also rounds each activation row to 8 bits (block scale per 32 values),
    which alone moves these logits by about 2 %; the PyTorch side does the same rounding
    (`llamacpp_activations`), and then `check_against_rounded_activations` holds."""
    model, tok = build_family(name, tmp_path / "hf")
    out = tmp_path / "q8.gguf"
    summary = write_gguf(out, tmp_path / "hf", q8_0_tensors(tmp_path / "hf"), file_type=gguf.LlamaFileType.MOSTLY_Q8_0)
    assert summary["tensor_types"]["Q8_0"] > 0
    reader = GGUFReader(str(out))
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert q.tensor_type == GGMLQuantizationType.Q8_0
    rows = gguf.quants.dequantize(np.array(q.data), GGMLQuantizationType.Q8_0)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    rounded = gguf.quants.dequantize(gguf.quants.quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    if EXPECTED[name][3]:
        rows = unpermute_rows(rows, model.config.num_attention_heads)
    np.testing.assert_array_equal(rows, rounded)

    with torch.no_grad():  # the transformers model with the same rounded matrices
        for p in model.parameters():
            if p.dim() == 2 and p.shape[1] % 32 == 0:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(
                    gguf.quants.quantize(p.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)))
    ids = tok(TEXTS[0])["input_ids"][:24]
    logits, _ = run_llamacpp(out, [ids], [], tmp_path / "run")
    plain = relative_error(logits[0][:, : model.config.vocab_size], hf_logits(model, ids))
    types = {n: "Q8_0" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0}
    with llamacpp_activations(model, types):
        ours = hf_logits(model, ids)
    print(f"{name}: Q8_0 file, {plain:.2e} relative logits error without rounding the activations")
    check_against_rounded_activations(name, logits[0][:, : model.config.vocab_size], ours)


# --------------------------------------------------------------------------- pure pieces

def test_permutation_matches_llamacpp_layout():
    """permute_rows is W.reshape(h, 2, d/2, in).swapaxes(1, 2).reshape(out, in), applies to any row
    payload (packed bytes too), and unpermute_rows undoes it."""
    h, d, n_in = 3, 8, 5
    w = np.arange(h * d * n_in, dtype=np.float32).reshape(h * d, n_in)
    expected = w.reshape(h, 2, d // 2, n_in).swapaxes(1, 2).reshape(h * d, n_in)
    np.testing.assert_array_equal(permute_rows(w, h), expected)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, h), h), w)
    packed = np.random.default_rng(0).integers(0, 256, (h * d, 34), dtype=np.uint8)
    np.testing.assert_array_equal(permute_rows(packed, h)[1], packed[d // 2])  # row 1 ← head 0, second half, 0
    bias = np.arange(h * d, dtype=np.float32)
    np.testing.assert_array_equal(permute_rows(bias, h), expected[:, 0] / n_in)
    with pytest.raises(GGUFWriteError, match="heads"):
        permute_rows(np.zeros((10, 4)), 3)


def test_llama3_rope_factors_match_transformers():
    """Our rope_freqs are the ratio of transformers' unscaled to scaled inverse frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=256, rope_parameters=params)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    np.testing.assert_allclose(llama3_rope_factors(params, 64), (plain / scaled.double()).numpy(), rtol=1e-5)


def encode_sentencepiece(pieces: list[tuple[str, float, int]], add_dummy_prefix: bool) -> bytes:
    """A minimal sentencepiece ModelProto (pieces and normalizer_spec.add_dummy_prefix)."""
    def varint(n):
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    def field(number, wire, payload):
        return varint(number << 3 | wire) + (varint(len(payload)) + payload if wire == 2 else payload)

    body = b""
    for piece, score, kind in pieces:
        body += field(1, 2, field(1, 2, piece.encode()) + field(2, 5, struct.pack("<f", score)) + field(3, 0, varint(kind)))
    return body + field(3, 2, field(3, 0, varint(int(add_dummy_prefix))))


def test_tokenizer_model_gives_the_same_vocabulary(tmp_path):
    """A Gemma directory with a tokenizer.model (read without the sentencepiece package) writes the
    vocabulary its tokenizer.json implies: same pieces, byte tokens, and merge-order scores."""
    build_family("gemma3_text", tmp_path / "hf")
    from_json = fields_of(Path(export_gguf_full_precision(tmp_path / "hf", tmp_path / "a.gguf", "F32")["path"]))
    n = len(json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["vocab"])
    pieces = [(from_json["tokenizer.ggml.tokens"][i], from_json["tokenizer.ggml.scores"][i],
               int(from_json["tokenizer.ggml.token_type"][i])) for i in range(n)]
    (tmp_path / "hf" / "tokenizer.model").write_bytes(encode_sentencepiece(pieces, add_dummy_prefix=False))
    read, prefix = read_sentencepiece(tmp_path / "hf" / "tokenizer.model")
    assert [p for p, _, _ in read] == [p for p, _, _ in pieces] and prefix is False
    from_model = fields_of(Path(export_gguf_full_precision(tmp_path / "hf", tmp_path / "b.gguf", "F32")["path"]))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix"):
        assert from_model[key] == from_json[key], key
    np.testing.assert_allclose(from_model["tokenizer.ggml.scores"], from_json["tokenizer.ggml.scores"])


def test_stock_gemma3_pattern_writes_no_layer_array(tmp_path):
    """Five sliding layers then a global one is llama.cpp's default for gemma3: no per-layer key
    (older readers know only that layout); the rope bases are still both written."""
    build_family("gemma3_text", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(num_hidden_layers=3, layer_types=["sliding_attention"] * 3)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    f = fields_of(Path(export_gguf_full_precision(tmp_path / "hf", tmp_path / "g.gguf", "F32")["path"]))
    assert "gemma3.attention.sliding_window_pattern" not in f
    assert f["gemma3.attention.sliding_window"] == 4 and f["gemma3.rope.freq_base_swa"] == pytest.approx(10000.0)


def test_f16_export_types(tmp_path):
    """F16: matrices F16, norms and biases F32 (as llama.cpp's converter keeps them)."""
    build_family("qwen2", tmp_path / "hf")
    summary = export_gguf_full_precision(tmp_path / "hf", tmp_path / "f16.gguf", "F16")
    reader = GGUFReader(summary["path"])
    for t in reader.tensors:
        want = GGMLQuantizationType.F16 if len(t.shape) == 2 else GGMLQuantizationType.F32
        assert t.tensor_type == want, t.name
    assert summary["file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)


# --------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("refusals") / "hf"
    build_family("qwen2", path)
    return path


def edited_copy(src: Path, dst: Path, config_edit=None, tokenizer_edit=None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if config_edit:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    if tokenizer_edit:
        tj = json.loads((dst / "tokenizer.json").read_text())
        tokenizer_edit(tj)
        (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def test_unknown_model_type_is_refused(qwen_dir, tmp_path):
    d = edited_copy(qwen_dir, tmp_path / "m", config_edit=lambda c: c.update(model_type="gpt_neox"))
    with pytest.raises(GGUFWriteError, match=r"'gpt_neox'.*supported: \['gemma3', 'gemma3_text', 'llama'"):
        export_gguf_full_precision(d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}), "'dynamic'"),
])
def test_configs_llamacpp_cannot_run_are_refused(qwen_dir, tmp_path, edit, match):
    d = edited_copy(qwen_dir, tmp_path / "m", config_edit=edit)
    with pytest.raises(GGUFWriteError, match=match):
        export_gguf_full_precision(d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_gemma3_attention_softcapping_is_refused(tmp_path):
    build_family("gemma3_text", tmp_path / "hf")
    d = edited_copy(tmp_path / "hf", tmp_path / "m", config_edit=lambda c: c.update(attn_logit_softcapping=50.0))
    with pytest.raises(GGUFWriteError, match="attn_logit_softcapping"):
        export_gguf_full_precision(d, tmp_path / "x.gguf")
    d = edited_copy(tmp_path / "hf", tmp_path / "n", config_edit=lambda c: c.update(query_pre_attn_scalar=32))
    with pytest.raises(GGUFWriteError, match="query_pre_attn_scalar=32"):
        export_gguf_full_precision(d, tmp_path / "y.gguf")


def test_unknown_pre_tokenizer_is_refused_unless_named(qwen_dir, tmp_path):
    def whitespace(tj):
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}

    d = edited_copy(qwen_dir, tmp_path / "m", tokenizer_edit=whitespace)
    with pytest.raises(GGUFWriteError, match="WhitespaceSplit.*tokenizer_pre="):
        export_gguf_full_precision(d, tmp_path / "x.gguf")
    summary = write_gguf(tmp_path / "y.gguf", d, full_precision_tensors(d, "F32"), file_type=0, tokenizer_pre="gpt-2")
    assert fields_of(Path(summary["path"]))["tokenizer.ggml.pre"] == "gpt-2"


def test_bad_tensors_are_refused(qwen_dir, tmp_path):
    bad_rows = GGUFTensor("model.layers.0.self_attn.q_proj.weight", np.zeros((256, 33), np.uint8),
                          GGMLQuantizationType.Q8_0)
    with pytest.raises(GGUFWriteError, match="33 bytes per row.*Q8_0"):
        write_gguf(tmp_path / "a.gguf", qwen_dir, [bad_rows], file_type=7)
    unknown = GGUFTensor("model.layers.0.mystery.weight", np.zeros((4, 4), np.float32), GGMLQuantizationType.F32)
    with pytest.raises(GGUFWriteError, match="mystery.*no GGUF name"):
        write_gguf(tmp_path / "b.gguf", qwen_dir, [unknown], file_type=0)
    huge = GGUFTensor("model.norm.weight", np.full(4, 1e6, np.float32), GGMLQuantizationType.F16)
    with pytest.raises(GGUFWriteError, match="overflow F16"):
        write_gguf(tmp_path / "c.gguf", qwen_dir, [huge], file_type=1)
    assert not any(tmp_path.glob("*.gguf"))
    with pytest.raises(ValueError, match="gguf_type='Q4'"):
        export_gguf_full_precision(qwen_dir, tmp_path / "d.gguf", "Q4")
