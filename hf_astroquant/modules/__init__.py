from .packing import pack_cols, pack_rows, packed_rows, unpack_cols, unpack_rows
from .quant_linear import QuantLinear, set_backend

__all__ = ["QuantLinear", "pack_cols", "pack_rows", "packed_rows", "set_backend", "unpack_cols", "unpack_rows"]
