from .packing import pack_cols, pack_rows, packed_rows, unpack_cols, unpack_rows
from .gguf_linear import GGUFLinear
from .quant_linear import QuantLinear, set_backend

QUANTIZED_LAYERS = (QuantLinear, GGUFLinear)  # what a quantized Linear is replaced by


def make_layer(result, cfg, bias):
    """The packed module of a solver's result: GGML blocks on a GGUF grid, else our packed format."""
    if result.gguf is not None:
        return GGUFLinear.from_result(result, bias)
    return QuantLinear.from_result(result, cfg.group_size, cfg.bits, bias)


def empty_layer(in_features: int, out_features: int, cfg, tensor_type, bias: bool, dtype=None, device=None):
    """An empty packed module of this shape, to load a checkpoint's tensors into."""
    if tensor_type is not None:
        return GGUFLinear(in_features, out_features, tensor_type, bias, dtype=dtype, device=device)
    return QuantLinear(in_features, out_features, cfg.bits, cfg.group_size, bias, dtype=dtype, device=device)

__all__ = ["GGUFLinear", "QUANTIZED_LAYERS", "QuantLinear", "empty_layer", "make_layer", "pack_cols", "pack_rows", "packed_rows", "set_backend", "unpack_cols", "unpack_rows"]
