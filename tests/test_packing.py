import pytest
import torch
import torch.nn.functional as F

from hf_astroquant.algorithms import gptq_quantize, rtn_quantize
from hf_astroquant.modules import QuantLinear, pack_cols, pack_rows, packed_rows, unpack_cols, unpack_rows
from reference import correlated_problem

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 96, 100])
def test_pack_unpack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    v = torch.randint(0, 2**bits, (n, 7), generator=g)
    v[0] = 2**bits - 1  # all bits set: the sign bit of an int32 word must survive
    packed = pack_rows(v, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_rows(n, bits), 7)
    assert torch.equal(unpack_rows(packed, bits, n).long(), v)
    assert torch.equal(unpack_cols(pack_cols(v.t(), bits), bits, n).long(), v.t())


def test_gptq_word_layout():
    """Value j sits at bits [j·b, (j+1)·b) of a little-endian int32 stream, as GPTQ packs."""
    v = torch.arange(32).remainder(8)[:, None]  # 3-bit values 0..7 repeating
    words = pack_rows(v, 3).long() & 0xFFFFFFFF
    assert words.shape == (3, 1)
    stream = sum(int(words[k, 0]) << (32 * k) for k in range(3))
    assert [(stream >> (3 * j)) & 7 for j in range(32)] == v[:, 0].tolist()
    v4 = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]])
    assert int(pack_rows(v4, 4)[0, 0]) == int.from_bytes(bytes.fromhex("f7654321"), "big") - 2**32


def test_packed_sizes_match_gptq_when_whole():
    assert packed_rows(576, 4) == 72 and packed_rows(576, 3) == 54 and packed_rows(576, 2) == 36
    assert packed_rows(576, 8) == 144 and packed_rows(8, 4) == 1 and packed_rows(10, 4) == 2


def test_pack_rejects_out_of_range_values_and_bits():
    with pytest.raises(ValueError, match="outside"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="bits=5"):
        pack_rows(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="bits=6"):
        QuantLinear(8, 8, 6, 8, False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group_size,desc_act", [((24, 40), 16, False), ((10, 37), -1, False),
                                                       ((33, 64), 32, True), ((7, 50), 24, True)])
@pytest.mark.parametrize("device", DEVICES)
def test_quant_linear_forward_is_exact_against_dequantize_then_matmul(bits, shape, group_size, desc_act, device):
    out_f, in_f = shape
    W, H = correlated_problem(out_f, in_f, 200, seed=bits + in_f)
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, desc_act=desc_act)
    bias = torch.randn(out_f)
    layer = QuantLinear.from_result(res, group_size, bits, bias).to(device)
    layer.set_backend("reference")  # the oracle; the fast paths are compared with it in test_kernels.py
    # the solver's own de-quantized weight, independent of packing
    assert torch.equal(layer.dequantize_weight().cpu(), res.weight)
    codes, zeros = layer.unpack()
    assert torch.equal(codes.t().cpu(), res.codes) and torch.equal(zeros.cpu(), res.zeros)
    x = torch.randn(3, 5, in_f, device=device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        expected = F.linear(xd, res.weight.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype))
        assert torch.equal(layer(xd), expected), dtype


def test_quant_linear_state_dict_is_the_gptq_layout():
    W, _ = correlated_problem(64, 96, 10, seed=1)
    layer = QuantLinear.from_result(rtn_quantize(W, bits=4, group_size=32), 32, 4, None)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "g_idx"}
    assert sd["qweight"].shape == (12, 64) and sd["qweight"].dtype == torch.int32
    assert sd["qzeros"].shape == (3, 8) and sd["qzeros"].dtype == torch.int32
    assert sd["scales"].shape == (3, 64) and sd["scales"].dtype == torch.float16
    assert sd["g_idx"].shape == (96,) and sd["g_idx"].dtype == torch.int32


def test_quant_linear_rejects_wrong_group_count():
    W, _ = correlated_problem(8, 32, 10, seed=2)
    res = rtn_quantize(W, bits=4, group_size=16)
    with pytest.raises(ValueError, match="groups"):
        QuantLinear.from_result(res, 8, 4, None)
