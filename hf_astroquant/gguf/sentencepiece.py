"""A sentencepiece tokenizer.model read without its library: the few protobuf fields a GGUF
vocabulary needs (pieces, scores, types, add_dummy_prefix)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

from gguf import TokenType

from .tensors import GGUFWriteError


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

