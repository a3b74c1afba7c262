from .packing import pack_cols, pack_rows, packed_rows, unpack_cols, unpack_rows
from ..gguf.linear import GGUFLinear
from .input_rotation import InputRotation
from .quant_linear import QuantLinear, set_backend

QUANTIZED_LAYERS = (QuantLinear, GGUFLinear)  # what a quantized Linear is replaced by


def make_layer(result, cfg, bias, input_rotation=None):
    """The packed module of a solver's result: GGML blocks on a GGUF grid, else our packed format
    (rotating its input by `input_rotation` when given)."""
    if result.gguf is not None:
        return GGUFLinear.from_result(result, bias)
    return QuantLinear.from_result(result, cfg.group_size, cfg.bits, bias, input_rotation)


def empty_layer(in_features: int, out_features: int, cfg, tensor_type, bias: bool, dtype=None, device=None,
                rotated_input: bool = False):
    """An empty packed module of this shape, to load a checkpoint's tensors into (with an empty
    online input rotation when `rotated_input`)."""
    if tensor_type is not None:
        return GGUFLinear(in_features, out_features, tensor_type, bias, dtype=dtype, device=device)
    layer = QuantLinear(in_features, out_features, cfg.bits, cfg.group_size, bias, dtype=dtype, device=device)
    if rotated_input:
        layer.input_rotation = InputRotation(in_features, device=device)
    return layer

__all__ = ["GGUFLinear", "InputRotation", "QUANTIZED_LAYERS", "QuantLinear", "empty_layer", "make_layer", "pack_cols", "pack_rows", "packed_rows", "set_backend", "unpack_cols", "unpack_rows"]
