"""The Triton de-quantize-matmul against the reference path.

Without a GPU (CI) the kernel runs under Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before triton is imported): the same kernel source, its bit unpacking, g_idx
gathers, masks and split-K, executed by NumPy. The tests marked CUDA run the compiled kernel.
"""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_astroquant import AstroQuantConfig, QuantLinear, set_backend
from hf_astroquant.modules import kernels
from test_kernels import TOL, _compare, _layer
from tiny import calib_ids, save_tiny

triton_kernel = pytest.importorskip("hf_astroquant.modules.triton_kernel")
if triton_kernel.available():
    pytest.skip(triton_kernel.available(), allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_interpreter = pytest.mark.skipif(not triton_kernel.interpreting(),
                                       reason="runs on CPU only under Triton's interpreter (TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
if not CUDA and not triton_kernel.interpreting():
    pytest.skip("neither a CUDA device nor Triton's interpreter (TRITON_INTERPRET=1 before importing triton)",
                allow_module_level=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group_size", [((96, 256), 64), ((33, 100), 32), ((40, 96), 48), ((17, 160), -1)])
@pytest.mark.parametrize("order", ["plain", "act-order", "act-order static"])
def test_triton_matches_reference_for_every_width_group_layout_and_order(bits, shape, group_size, order):
    layer = _layer(bits, *shape, group_size, desc_act=order != "plain", static_groups=order.endswith("static"),
                   seed=bits + shape[0])
    assert _compare(layer, "triton", torch.float32, device=DEVICE) == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [3, 4])
def test_triton_keeps_half_precision_activations(bits, dtype):
    layer = _layer(bits, 40, 192, 64, desc_act=True, seed=bits)
    assert _compare(layer, "triton", dtype, device=DEVICE) == "triton"


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 3},  # K slices that end mid-group
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 8},  # more slices than K tiles: some add nothing
])
@pytest.mark.parametrize("rows", [1, 37])
def test_every_tile_shape_and_split_k_gives_the_same_product(config, rows):
    layer = _layer(3, 33, 200, 40, desc_act=True, seed=11).to(DEVICE)  # 3 bits: codes straddle words
    x = torch.randn(rows, 200, device=DEVICE)
    ref = x @ layer.dequantize_weight().t()
    got = triton_kernel.dequant_matmul(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 3, config=config)
    assert float((got - ref).abs().max() / ref.abs().max()) <= TOL[torch.float32]


def test_non_contiguous_inputs_and_any_leading_shape():
    layer = _layer(4, 32, 128, 32, bias=False).to(DEVICE)
    layer.set_backend("triton")
    wide = torch.randn(6, 256, device=DEVICE)
    x = wide[:, ::2]  # a strided view: the kernel takes its strides
    assert not x.is_contiguous()
    want = x @ layer.dequantize_weight().t()
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for lead in [(1,), (2, 3, 4)]:
        x = torch.randn(*lead, 128, device=DEVICE)
        assert layer(x).shape == (*lead, 32)


def test_the_kernel_reads_the_layer_buffers_without_a_copy():
    layer = _layer(4, 32, 128, 32).to(DEVICE)
    layer.set_backend("triton")
    layer.prepare(torch.float32)
    weights = layer._fast[3]
    assert isinstance(weights, kernels.TritonWeights)
    assert weights.qweight.data_ptr() == layer.qweight.data_ptr()
    assert weights.scales.data_ptr() == layer.scales.data_ptr()


def test_a_triton_kernel_that_disagrees_with_the_reference_is_never_used(monkeypatch):
    layer = _layer(4, 32, 128, 32).to(DEVICE)
    real = kernels.TritonWeights.forward
    monkeypatch.setattr(kernels.TritonWeights, "forward", lambda self, x: real(self, x) * 1.1)
    layer.set_backend("triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run this layer: .*disagrees with the reference"):
        layer.prepare(torch.float32)


def test_missing_triton_is_a_clear_refusal(monkeypatch):
    monkeypatch.setattr(triton_kernel, "triton", None)
    layer = _layer(8, 32, 128, 32).to(DEVICE)
    layer.set_backend("triton")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this layer: triton is not installed"):
        layer.prepare(torch.float32)


@needs_interpreter
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_kernel, "interpreting", lambda: False)
    layer = _layer(4, 32, 128, 32)
    layer.set_backend("triton")
    with pytest.raises(ValueError, match="the Triton kernel runs on CUDA, not cpu"):
        layer.prepare(torch.float32)


def test_auto_never_picks_triton_on_cpu_and_orders_the_cuda_candidates():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.auto_backends(4, 2, cpu, torch.float32) == ["int4"]
    assert kernels.auto_backends(8, 1, cpu, torch.float32) == ["int8"]
    assert kernels.auto_backends(8, 4, cpu, torch.float32) == []
    assert kernels.auto_backends(4, 2, cuda, torch.bfloat16) == ["int4", "triton"]
    assert kernels.auto_backends(3, 2, cuda, torch.float16) == ["triton", "int4"]
    assert kernels.auto_backends(8, 4, cuda, torch.float16) == ["triton"]
    assert kernels.auto_backends(4, 2, torch.device("meta"), torch.float16) == []


def test_auto_falls_through_to_the_next_candidate(monkeypatch, caplog):
    """When the first candidate cannot run a layer, auto uses the second, and says nothing."""
    monkeypatch.setattr(kernels, "auto_backends", lambda *a: ["int8", "triton"])  # int8 refuses 4-bit groups
    layer = _layer(4, 32, 128, 32).to(DEVICE)
    with caplog.at_level(logging.WARNING, logger="hf_astroquant"):
        assert layer.prepare(torch.float32) == "triton"
    assert "reference forward" not in caplog.text


def test_a_quantized_model_runs_triton_end_to_end_and_compiles(tmp_path):
    src = tmp_path / "tiny"
    save_tiny(src, hidden=64, inter=128)
    cfg = AstroQuantConfig(bits=3, group_size=32, dataset=calib_ids(8, 32), method="rtn")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).to(DEVICE)
    ids = calib_ids(2, 12, seed=3).to(DEVICE)
    set_backend(model, "reference")
    with torch.no_grad():
        want = model(ids).logits
    assert set_backend(model, "triton") == {"triton": 14}
    with torch.no_grad():
        got = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        traced = compiled(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert torch.allclose(traced, got, rtol=1e-5, atol=1e-5)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {m.active_backend for m in layers} == {"triton"}


@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_auto_on_cuda_matches_reference_for_every_dtype(bits, desc_act):
    layer = _layer(bits, 96, 256, 64, desc_act=desc_act, seed=bits)
    for dtype, first in [(torch.float16, "triton"), (torch.float32, "triton"),
                         (torch.bfloat16, "int4" if bits <= 4 else "triton")]:
        assert _compare(layer, "auto", dtype, device="cuda", lead=(4,)) == first
