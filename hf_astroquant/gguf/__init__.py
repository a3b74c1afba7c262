"""GGUF, the file format of llama.cpp, Ollama and LM Studio: everything hf_astroquant does with it.

    types.py         GGUF tensor types (block sizes, grids) and llama.cpp's per-tensor mixture of each file type
    grid.py          fitting a weight onto a GGUF type's grid (the solvers in algorithms/ use it)
    blocks.py        packing solved codes into GGML's block layouts (and gguf-py's decoder)
    linear.py        GGUFLinear: a Linear stored as GGML blocks (what a gguf_type checkpoint holds)
    header.py        the checks of a GGUF file's header before any reader sees it
    source.py        a .gguf file as a model source: base model, licence, the de-quantized model
    tensors.py       what the writer takes (GGUFTensor) and its error (GGUFWriteError)
    architecture.py  an architecture's hyperparameters under llama.cpp's names
    vocabulary.py    the tokenizer (sentencepiece.py reads a tokenizer.model without its library)
    names.py         tensor names and the rewrites llama.cpp expects
    writer.py        write_gguf: a complete file from a model directory and a stream of tensors
    export.py        export_gguf: one .gguf file from a saved directory (export/gguf.py puts it in the CLI)
    read.py          weights_from_gguf: a file's weights back in a transformers model

Only the two helpers below are imported here, and source.py imports nothing at its top but pathlib:
`import hf_astroquant` loads this package early (options, algorithms/ and modules/ import types.py,
grid.py and linear.py), and gguf-py, an optional dependency, is imported only by the modules that
read or write files (architecture, vocabulary, names, tensors, writer, export, read, sentencepiece).
"""

from .source import drop_gguf_marker, gguf_base_model_info

__all__ = ["drop_gguf_marker", "gguf_base_model_info"]
