"""Write complete GGUF files (the format llama.cpp, Ollama and LM Studio read) from a transformers
model directory and a stream of tensors.

A GGUF file is a key/value header plus named tensors. llama.cpp finds everything it needs in that
header, so the writer's real work is the metadata, each part in its own module:

- architecture.py: the architecture's hyperparameters, under llama.cpp's names for it;
- vocabulary.py (and sentencepiece.py): the tokenizer, special token ids, the chat template;
- names.py: tensor names and the rewrites llama.cpp expects (q/k row permutation, Gemma's norms).

What llama.cpp's graph cannot express is refused with the reason (GGUFWriteError) rather than
written into a file that would load and then compute something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import gguf
from gguf import GGMLQuantizationType, LlamaFileType

from .architecture import architecture_of, text_config, write_architecture
from .names import prepare_tensor
from .tensors import FLOAT_TYPES, FULL_PRECISION_FILE_TYPES, GGUFTensor, GGUFWriteError
from .vocabulary import read_vocabulary, write_tokenizer


def read_model_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a saved transformers model directory")
    return json.loads(path.read_text(encoding="utf-8"))


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
