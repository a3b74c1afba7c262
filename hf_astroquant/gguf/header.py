"""Check a GGUF file's header within bounds before anything else reads it.

gguf-py's `GGUFReader` (which transformers' `from_pretrained(gguf_file=...)` also uses) believes
every count it reads: a 49-byte file that declares an array of 2^40 entries makes it loop 2^40
times, building one numpy object per entry (gigabytes, minutes, then a traceback), and a truncated
file or an absurd count ends in a raw `struct.error`/`IndexError`. `check_gguf_file` walks the same
layout with explicit bounds instead, and refuses a bad file with one line naming the byte offset,
the field and what is wrong (`GGUFFileError`, a `ValueError`):

    magic "GGUF"; version (2 or 3; little- or big-endian, detected as gguf-py does); tensor count
    and key-value count (u64 each);
    each key-value: key (u64 length + UTF-8 bytes), value type (u32), value:
        a scalar (u8/i8/u16/i16/u32/i32/f32/bool/u64/i64/f64), a string (u64 length + UTF-8 bytes),
        or an array: element type (u32), count (u64), elements (arrays of arrays are refused: neither
        llama.cpp nor transformers reads them);
    each tensor info: name (string), n_dims (u32), dims (n_dims u64), tensor type (u32), offset (u64);
    padding to `general.alignment` (a u32 power of two; 32 when absent); the tensor data.

Every count and length is compared with the bytes left in the file *before* it is used (n
elements of a fixed-size type need n*size bytes, n strings at least 8*n), so nothing is allocated
or looped over beyond what the file holds. Also refused: unknown value and tensor types, n_dims
outside 1..4 (GGML_MAX_DIMS), a shape of more than INT64_MAX bytes, a first dim that the type's
block does not tile, an unaligned tensor offset, tensor data (offset + bytes from the type's
block/type size in gguf-py's `GGML_QUANT_SIZES`) that ends past the file, duplicate keys or tensor
names (gguf-py raises on them), text that is not UTF-8 (transformers decodes every string), and
counts past the limits below: gguf-py spends about 0.7 KB and 13 µs per array element (gguf
0.19), so a file that stays inside its own bytes can still ask it for many gigabytes; the limits
are far above real files (vocabularies of ~260k tokens, ~500k merges, a few thousand tensors).

The file is memory-mapped and only the header is touched: a 10 GB model costs the size of its
header, and a valid 150k-token vocabulary is walked in about a tenth of a second (gguf-py: 8 s).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what gguf-py reads (version 1 had 32-bit counts)
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
INT64_MAX = 2**63 - 1

MAX_KV = 1 << 16  # key-values in one file (real files: ~20-60)
MAX_TENSORS = 1 << 18  # tensor infos in one file (real files: up to a few thousand)
MAX_ARRAY_ELEMENTS = 1 << 21  # elements of one array (real files: up to ~500k merges)
MAX_TOTAL_ARRAY_ELEMENTS = 1 << 22  # elements of all arrays together

# GGUF value types: number -> (name, bytes of one value); None for the variable-sized ones.
STRING, ARRAY = 8, 9
VALUE_TYPES: dict[int, tuple[str, int | None]] = {
    0: ("UINT8", 1), 1: ("INT8", 1), 2: ("UINT16", 2), 3: ("INT16", 2), 4: ("UINT32", 4),
    5: ("INT32", 4), 6: ("FLOAT32", 4), 7: ("BOOL", 1), STRING: ("STRING", None), ARRAY: ("ARRAY", None),
    10: ("UINT64", 8), 11: ("INT64", 8), 12: ("FLOAT64", 8),
}
UINT32 = 4
MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
RESERVED_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # gguf-py's own field names


class GGUFFileError(ValueError):
    """A GGUF file that cannot be read safely; the message is one line naming the file, the byte
    offset, the field and what is wrong."""


class GGUFHeader(NamedTuple):
    """What a checked header declares."""
    version: int
    byte_order: str  # "<" little-endian, ">" big-endian
    kv_count: int
    tensor_count: int
    alignment: int
    data_offset: int  # where the tensor data starts


class TensorInfo(NamedTuple):
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section
    at: int  # where this tensor info starts in the file


def quant_sizes() -> dict[int, tuple[int, int]]:
    """{tensor type number: (block size in elements, bytes per block)}, from gguf-py."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError as err:
        raise ImportError("reading GGUF files needs gguf-py: pip install 'hf-astroquant[gguf]'") from err
    return {int(t): (int(block), int(size)) for t, (block, size) in GGML_QUANT_SIZES.items()}


class Cursor:
    """A read position in a buffer (a mapped file) that never reads past its end."""

    def __init__(self, name: str, buf, order: str = "<"):
        self.name, self.buf, self.size, self.pos = name, buf, len(buf), 0
        self.array_elements = 0  # read so far, against MAX_TOTAL_ARRAY_ELEMENTS
        self.set_order(order)

    def set_order(self, order: str) -> None:
        self.order = order
        self.u32_at = struct.Struct(order + "I").unpack_from
        self.u64_at = struct.Struct(order + "Q").unpack_from

    def error(self, at: int, field: str, problem: str) -> GGUFFileError:
        return GGUFFileError(f"{self.name}: not a readable GGUF file: byte {at}, {field}: {problem}")

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, field: str) -> int:
        """Step over n bytes; returns where they start."""
        if n > self.size - self.pos:
            raise self.error(self.pos, field, f"needs {n} bytes but the file ends after {self.size - self.pos}")
        start = self.pos
        self.pos += n
        return start

    def u32(self, field: str) -> int:
        return self.u32_at(self.buf, self.take(4, field))[0]

    def u64(self, field: str) -> int:
        return self.u64_at(self.buf, self.take(8, field))[0]

    def string(self, field: str) -> str:
        at = self.pos
        length = self.u64(field + " length")
        start = self.take(length, f"{field} (a string of {length} bytes)")
        return decode_utf8(self, self.buf[start:start + length], at, field)


def decode_utf8(cur: Cursor, raw: bytes, at: int, field: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as err:
        raise cur.error(at, field, f"not UTF-8 text ({err.reason} at byte {err.start} of the string)") from None


def check_gguf_file(path: str | os.PathLike) -> GGUFHeader:
    """Check that `path` is a GGUF file whose header gguf-py and transformers can read within the
    file's own bytes; raises GGUFFileError (one line) if not. Reads only the header (memory-mapped)."""
    name = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise GGUFFileError(f"{name}: not a readable GGUF file: the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return check_gguf_bytes(buf, name)


def check_gguf_bytes(buf, name: str = "<bytes>") -> GGUFHeader:
    """`check_gguf_file` on a bytes-like object holding a whole file."""
    sizes = quant_sizes()
    cur = Cursor(name, buf)
    version, tensor_count, kv_count = read_preamble(cur)
    seen = set(RESERVED_KEYS)
    alignment = DEFAULT_ALIGNMENT
    for i in range(kv_count):
        key, value = read_kv(cur, i, seen)
        if key == "general.alignment":
            alignment = value
    tensors = [read_tensor_info(cur, i, sizes) for i in range(tensor_count)]
    check_unique_names(cur, tensors)
    data_offset = -(-cur.pos // alignment) * alignment
    for i, info in enumerate(tensors):
        check_tensor_data(cur, i, info, sizes, alignment, data_offset)
    return GGUFHeader(version, cur.order, kv_count, tensor_count, alignment, data_offset)


def read_preamble(cur: Cursor) -> tuple[int, int, int]:
    """(version, tensor count, kv count), after the magic; sets the cursor's byte order."""
    start = cur.take(4, "magic")
    magic = bytes(cur.buf[start:start + 4])
    if magic != GGUF_MAGIC:
        raise cur.error(0, "magic", f"{magic!r} is not {GGUF_MAGIC!r}")
    version = cur.u32("version")
    if version & 0xFFFF == 0:  # gguf-py's test: a file written in the other byte order
        cur.set_order(">")
        version = cur.u32_at(cur.buf, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        raise cur.error(4, "version", f"version {version} is not one of {SUPPORTED_VERSIONS}")
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("key-value count")
    check_counts(cur, tensor_count, kv_count)
    return version, tensor_count, kv_count


def check_counts(cur: Cursor, tensor_count: int, kv_count: int) -> None:
    if kv_count > MAX_KV:
        raise cur.error(16, "key-value count", f"{kv_count} key-values (at most {MAX_KV} are read)")
    if tensor_count > MAX_TENSORS:
        raise cur.error(8, "tensor count", f"{tensor_count} tensors (at most {MAX_TENSORS} are read)")
    need = kv_count * MIN_KV_BYTES + tensor_count * MIN_TENSOR_INFO_BYTES
    if need > cur.left():
        raise cur.error(8, "tensor and key-value counts", f"{tensor_count} tensors and {kv_count} key-values "
                        f"need at least {need} bytes but the file ends after {cur.left()}")


def read_kv(cur: Cursor, index: int, seen: set[str]) -> tuple[str, int | None]:
    """(key, the value when the key is general.alignment, else None); steps over the key-value."""
    at = cur.pos
    key = cur.string(f"key-value {index} key")
    if key in seen:
        raise cur.error(at, f"key-value {index} key", f"{key!r} appears twice")
    seen.add(key)
    field = f"key-value {index} ({key!r})"
    vtype = read_value_type(cur, field + " value type")
    if key == "general.alignment":
        return key, read_alignment(cur, field, vtype)
    skip_value(cur, vtype, field + " value")
    return key, None


def read_value_type(cur: Cursor, field: str) -> int:
    at = cur.pos
    vtype = cur.u32(field)
    if vtype not in VALUE_TYPES:
        raise cur.error(at, field, f"unknown value type {vtype}")
    return vtype


def read_alignment(cur: Cursor, field: str, vtype: int) -> int:
    at = cur.pos
    if vtype != UINT32:
        raise cur.error(at, field, f"general.alignment is a {VALUE_TYPES[vtype][0]}, not a UINT32")
    alignment = cur.u32(field)
    if alignment == 0 or alignment & (alignment - 1):
        raise cur.error(at, field, f"alignment {alignment} is not a power of two")
    return alignment


def skip_value(cur: Cursor, vtype: int, field: str) -> None:
    size = VALUE_TYPES[vtype][1]
    if size is not None:
        cur.take(size, field)
    elif vtype == STRING:
        cur.string(field)
    else:
        skip_array(cur, field)


def skip_array(cur: Cursor, field: str) -> None:
    etype = read_value_type(cur, field + " element type")
    if etype == ARRAY:
        raise cur.error(cur.pos - 4, field + " element type", "an array of arrays (llama.cpp and transformers "
                        "read none)")
    at = cur.pos
    count = cur.u64(field + " count")
    name, size = VALUE_TYPES[etype]
    need = count * (size or 8)  # a string takes at least its 8-byte length
    if need > cur.left():
        raise cur.error(at, field + " count", f"{count} {name} elements need at least {need} bytes but the "
                        f"file ends after {cur.left()}")
    if count > MAX_ARRAY_ELEMENTS:
        raise cur.error(at, field + " count", f"{count} elements (at most {MAX_ARRAY_ELEMENTS} are read)")
    cur.array_elements += count
    if cur.array_elements > MAX_TOTAL_ARRAY_ELEMENTS:
        raise cur.error(at, field + " count", f"{cur.array_elements} array elements in all "
                        f"(at most {MAX_TOTAL_ARRAY_ELEMENTS} are read)")
    if size is not None:
        cur.take(need, f"{field} ({count} {name} values)")
    else:
        skip_strings(cur, count, field)


def skip_strings(cur: Cursor, count: int, field: str) -> None:
    """Step over `count` strings (the hot loop of a vocabulary): every length is bounded and every
    string decoded as UTF-8."""
    buf, size, pos, u64_at = cur.buf, cur.size, cur.pos, cur.u64_at
    for i in range(count):
        start = pos + 8
        if start > size:
            raise cur.error(pos, f"{field}[{i}] length", f"needs 8 bytes but the file ends after {size - pos}")
        length = u64_at(buf, pos)[0]
        if length > size - start:
            raise cur.error(start, f"{field}[{i}]", f"a string of {length} bytes but the file ends after "
                            f"{size - start}")
        end = start + length
        try:
            str(buf[start:end], "utf-8")
        except UnicodeDecodeError:
            decode_utf8(cur, buf[start:end], pos, f"{field}[{i}]")
        pos = end
    cur.pos = pos


def read_tensor_info(cur: Cursor, index: int, sizes: dict[int, tuple[int, int]]) -> TensorInfo:
    at = cur.pos
    name = cur.string(f"tensor info {index} name")
    field = f"tensor {index} ({name!r})"
    dims_at = cur.pos
    n_dims = cur.u32(field + " n_dims")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise cur.error(dims_at, field + " n_dims", f"{n_dims} dimensions (1 to {GGML_MAX_DIMS} are read)")
    dims = tuple(cur.u64(f"{field} dim {d}") for d in range(n_dims))
    type_at = cur.pos
    ggml_type = cur.u32(field + " type")
    if ggml_type not in sizes:
        raise cur.error(type_at, field + " type", f"unknown tensor type {ggml_type}")
    offset = cur.u64(field + " offset")
    return TensorInfo(name, dims, ggml_type, offset, at)


def check_extent(cur: Cursor, field: str, info: TensorInfo, sizes: dict[int, tuple[int, int]]) -> None:
    """The tensor's bytes, as an array shape with zeros counted as ones (numpy's test of a shape,
    even an empty one), fit an int64: gguf-py reshapes the data to it."""
    block, type_size = sizes[info.ggml_type]
    extent = max(info.dims[0] // block * type_size, 1)
    for d in info.dims[1:]:
        extent *= max(d, 1)
    if extent > INT64_MAX:
        raise cur.error(info.at, field + " dims", f"{list(info.dims)} spans more than {INT64_MAX} bytes")


def check_unique_names(cur: Cursor, tensors: list[TensorInfo]) -> None:
    seen: set[str] = set()
    for i, info in enumerate(tensors):
        if info.name in seen:
            raise cur.error(info.at, f"tensor {i} name", f"{info.name!r} appears twice")
        seen.add(info.name)


def tensor_nbytes(info: TensorInfo, sizes: dict[int, tuple[int, int]]) -> int:
    block, type_size = sizes[info.ggml_type]
    n = 1
    for d in info.dims:
        n *= d
    return n // block * type_size


def check_tensor_data(cur: Cursor, index: int, info: TensorInfo, sizes: dict[int, tuple[int, int]],
                      alignment: int, data_offset: int) -> None:
    """The tensor's rows tile into its type's blocks, its shape fits an int64 and its bytes lie,
    aligned, inside the file."""
    field = f"tensor {index} ({info.name!r})"
    block = sizes[info.ggml_type][0]
    if info.dims[0] % block:
        raise cur.error(info.at, field + " dims", f"first dim {info.dims[0]} is not a multiple of the type's "
                        f"block of {block}")
    check_extent(cur, field, info, sizes)
    if info.offset % alignment:
        raise cur.error(info.at, field + " offset", f"{info.offset} is not a multiple of the alignment {alignment}")
    nbytes = tensor_nbytes(info, sizes)
    start = data_offset + info.offset
    if start + nbytes > cur.size:
        raise cur.error(info.at, field + " data", f"{nbytes} bytes at byte {start} end past the file's "
                        f"{cur.size} bytes")
