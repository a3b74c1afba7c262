"""What the GGUF writer takes: one tensor under its transformers name (`GGUFTensor`), the float
types it casts to, the full-precision file types, and the one error every part of the writer raises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

FLOAT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
FULL_PRECISION_FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16}


class GGUFWriteError(ValueError):
    """The model, its tokenizer or a tensor cannot be written as a GGUF llama.cpp would run
    correctly; the message names the value and what would be accepted."""



@dataclass
class GGUFTensor:
    """One tensor to write, under its transformers state-dict name.

    F32 / F16: `data` is the float array of the transformers shape, (out, in) for a matrix (any
    float dtype; it is cast to `ggml_type`). Quantized types: `data` is uint8 of shape
    (out, bytes_per_row), each row already packed in GGML's block layout for `ggml_type`."""

    name: str
    data: np.ndarray
    ggml_type: GGMLQuantizationType

