"""The tokenizer of a GGUF file, rebuilt from tokenizer.json / tokenizer.model: a byte-level BPE
(`gpt2`) with its merges and the name of llama.cpp's pre-tokenizer that splits text the way
tokenizer.json does, or a sentencepiece vocabulary (`llama`) with the scores llama.cpp's merge order
comes from; special token ids, whether a BOS/EOS is added, the chat template.

A pre-tokenizer whose llama.cpp counterpart is unknown is refused with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import TokenType

from .architecture import Architecture
from .sentencepiece import read_sentencepiece
from .tensors import GGUFWriteError


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


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

