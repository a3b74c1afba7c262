"""The fast forward paths (PyTorch's int4/int8 weight-only kernels) against the reference path."""

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_astroquant
from hf_astroquant import AstroQuantConfig, QuantLinear, set_backend
from hf_astroquant.algorithms import gptq_quantize, rtn_quantize
from hf_astroquant.modules import kernels
from reference import correlated_problem
from tiny import calib_ids, save_tiny

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
# relative to the largest output: fp32 differs only in summation order; half types round W and x
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def _layer(bits, out_f, in_f, group_size, desc_act=False, static_groups=False, bias=True, seed=0):
    W, H = correlated_problem(out_f, in_f, 300, seed=seed)
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, desc_act=desc_act, static_groups=static_groups)
    return QuantLinear.from_result(res, group_size, bits, torch.randn(out_f) if bias else None)


def _compare(layer, backend, dtype, device="cpu", lead=(3, 5)):
    layer = layer.to(device)
    x = torch.randn(*lead, layer.in_features, device=device).to(dtype)
    layer.set_backend("reference")
    ref = layer(x).float()
    layer.set_backend(backend)
    got = layer(x)
    assert got.dtype == dtype and got.shape == ref.shape
    err = float((got.float() - ref).abs().max() / ref.abs().max())
    compute = kernels.INT4_COMPUTE_DTYPE if layer.active_backend == "int4" else dtype
    assert err <= TOL[compute], (backend, dtype, err)
    return layer.active_backend


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape,group_size", [((96, 256), 64), ((40, 192), 32), ((48, 256), 128),
                                              ((33, 256), -1), ((64, 576), 128), ((17, 512), 256)])
@pytest.mark.parametrize("order", ["plain", "act-order", "act-order static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_cpu_matches_reference(bits, shape, group_size, order, dtype):
    layer = _layer(bits, *shape, group_size, desc_act=order != "plain", static_groups=order.endswith("static"),
                   seed=bits + shape[0])
    assert _compare(layer, "int4", dtype) == "int4"


def test_int4_handles_any_leading_shape_and_no_bias():
    layer = _layer(4, 32, 128, 32, bias=False)
    for lead in [(1,), (7,), (2, 3, 4)]:
        assert _compare(layer, "int4", torch.float32, lead=lead) == "int4"


def test_act_order_layer_really_takes_the_permuted_path():
    layer = _layer(4, 32, 256, 32, desc_act=True, seed=3)
    perm, kg = kernels.group_order(layer.g_idx, 32, 256)
    assert perm is not None and kg == 32
    static = _layer(4, 32, 256, 32, desc_act=True, static_groups=True, seed=3)
    assert kernels.group_order(static.g_idx, 32, 256) == (None, 32)


def test_int8_cpu_matches_reference_for_one_group_per_row():
    for dtype in (torch.float32, torch.bfloat16):
        layer = _layer(8, 48, 200, -1, seed=5)
        assert _compare(layer, "int8", dtype) == "int8"


@pytest.mark.parametrize("bits,shape,group_size,why", [
    (4, (32, 100), 32, "no run of 32"),  # in_features not a multiple of 32
    (4, (32, 96), 48, "no run of 32"),  # groups of 48 columns
    (8, (32, 128), 32, "one scale per row"),  # 8 bits with groups
])
def test_auto_falls_back_to_reference_with_a_reason(caplog, bits, shape, group_size, why):
    layer = _layer(bits, *shape, group_size)
    with caplog.at_level(logging.WARNING, logger="hf_astroquant"):
        assert _compare(layer, "auto", torch.float32) == "reference"
    kernels_name = "int8" if bits == 8 else "int4"
    with pytest.raises(ValueError, match=f"backend='{kernels_name}' cannot run this layer: .*{why}"):
        layer.set_backend(kernels_name)
        layer.prepare()


def test_int4_refuses_8_bit_codes():
    layer = _layer(8, 32, 128, 32)
    layer.set_backend("int4")
    with pytest.raises(ValueError, match="8-bit codes do not fit the int4 kernel"):
        layer.prepare()


def test_a_kernel_that_disagrees_with_the_reference_is_never_used(monkeypatch, caplog):
    layer = _layer(4, 32, 128, 32)
    real = kernels.Int4Weights.forward
    monkeypatch.setattr(kernels.Int4Weights, "forward", lambda self, x: real(self, x) * 1.1)
    with caplog.at_level(logging.WARNING, logger="hf_astroquant"):
        assert layer.prepare() == "reference"
    assert "disagrees with the reference" in caplog.text
    layer.set_backend("int4")
    with pytest.raises(ValueError, match="disagrees with the reference"):
        layer.prepare()


def test_bad_backend_names_are_refused():
    layer = _layer(4, 32, 128, 32)
    with pytest.raises(ValueError, match="backend='fast' is not one of 'auto', 'reference', 'int4', 'int8', 'triton'"):
        layer.set_backend("fast")
    with pytest.raises(ValueError, match="backend='int5'"):
        set_backend(torch.nn.Sequential(layer), "int5")
    with pytest.raises(ValueError, match="backend"):
        AstroQuantConfig(backend="gpu")


def test_prepare_keeps_the_checkpoint_layout_and_moves_with_the_module():
    layer = _layer(4, 32, 128, 32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.prepare() == "int4"
    after = layer.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(2, 128)
    y32 = layer(x)
    layer.to(torch.bfloat16)  # casts the bias; the prepared kernel is rebuilt for bf16 inputs
    assert layer._fast is None
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and layer.active_backend == "int4"
    assert torch.allclose(layer(x.bfloat16()).float(), y32, rtol=0.05, atol=0.05 * float(y32.abs().max()))


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    src = tmp_path_factory.mktemp("tiny")
    save_tiny(src, hidden=64, inter=128)
    cfg = AstroQuantConfig(bits=4, group_size=32, dataset=calib_ids(8, 32), desc_act=True)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    out = tmp_path_factory.mktemp("q")
    model.save_pretrained(out)
    return model, str(out)


def test_loaded_model_runs_the_fast_path_and_saved_config_does_not_record_it(tiny_quantized):
    model, out = tiny_quantized
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {m.active_backend for m in layers} == {"int4"}
    import json
    from pathlib import Path

    saved = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    assert "backend" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert {m.active_backend for m in reloaded.modules() if isinstance(m, QuantLinear)} == {"int4"}
    ids = calib_ids(2, 32, seed=4)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_backend_is_a_loading_option_of_from_pretrained(tiny_quantized):
    model, out = tiny_quantized
    ref = AutoModelForCausalLM.from_pretrained(out, quantization_config=AstroQuantConfig(backend="reference"))
    assert {m.active_backend for m in ref.modules() if isinstance(m, QuantLinear)} == {"reference"}
    ids = calib_ids(2, 32, seed=5)
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < 3e-2  # the int4 kernel computes in bf16


def test_generate_uses_the_fast_path_and_matches_the_reference(tiny_quantized, monkeypatch):
    model, _ = tiny_quantized
    calls = []
    real = kernels.Int4Weights.forward
    monkeypatch.setattr(kernels.Int4Weights, "forward", lambda self, x: calls.append(x.shape) or real(self, x))
    prompt = calib_ids(1, 8, seed=6)
    fast = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert len(calls) >= 14 * 6  # every quantized layer, every step
    assert any(s[0] == 1 for s in calls)  # decode steps: one token
    set_backend(model, "reference")
    try:
        slow = model.generate(prompt, max_new_tokens=6, do_sample=False)
    finally:
        set_backend(model, "auto")
    assert torch.equal(fast, slow)


def test_torch_compile_runs_the_model(tiny_quantized):
    model, _ = tiny_quantized
    assert model.hf_quantizer.is_compileable
    ids = calib_ids(2, 16, seed=7)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
        got = compiled(ids).logits
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size,backend,dtype", [
    (4, 32, "int4", torch.float32), (4, 32, "int4", torch.bfloat16), (3, 64, "int4", torch.bfloat16),
    (8, -1, "int8", torch.bfloat16), (3, 32, "reference", torch.float32)])
def test_every_fast_path_traces_as_one_graph(bits, group_size, backend, dtype):
    # fullgraph=True: a graph break anywhere in the packed forward (an untraceable kernel call, a
    # Python-side branch on tensor values) fails here instead of silently falling back to eager
    layer = _layer(bits, 64, 128, group_size, seed=bits).to(dtype)
    layer.set_backend(backend)
    x = torch.randn(3, 5, 128).to(dtype)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer(x)
        assert layer.active_backend == backend
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(got, eager)


@CUDA
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("desc_act", [False, True])
def test_int4_cuda_matches_reference(bits, desc_act):
    layer = _layer(bits, 96, 256, 64, desc_act=desc_act, seed=bits)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert _compare(layer, "auto", dtype, device="cuda") == "int4"


def test_rtn_layers_take_the_fast_path_too():
    W = torch.randn(64, 256)
    layer = QuantLinear.from_result(rtn_quantize(W, bits=3, group_size=64), 64, 3, None)
    assert _compare(layer, "auto", torch.float32) == "int4"
    assert hf_astroquant.set_backend is set_backend


@pytest.mark.parametrize("bits,desc_act,out_f", [(4, False, 96), (3, True, 40), (2, True, 33)])
def test_cpu_int4_layers_keep_one_copy_of_the_codes_and_save_the_gptq_layout(bits, desc_act, out_f, tmp_path):
    layer = _layer(bits, out_f, 256, 64, desc_act=desc_act, seed=bits)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 256)
    layer.set_backend("reference")
    ref = layer(x)
    layer.set_backend("auto")
    assert layer.prepare() == "int4" and layer.qweight.numel() > 0  # fp32: kept for the de-quantizing prefill
    assert layer.prepare(torch.bfloat16) == "int4"
    assert layer.qweight.numel() == 0  # the GPTQ-layout copy is released: the kernel layout holds the codes
    sd = layer.state_dict()
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in before)
    codes, _ = layer.unpack()
    assert torch.equal(pack_rows_of(codes, bits), before["qweight"])
    # a fresh layer loads the saved tensors; a released layer loads new ones
    fresh = QuantLinear(256, out_f, bits, 64, True)
    fresh.load_state_dict(sd)
    layer.load_state_dict(sd)
    assert layer.qweight.shape == before["qweight"].shape
    for m in (fresh, layer):
        assert torch.allclose(m(x), ref, rtol=0.02, atol=0.02 * float(ref.abs().max()))
    # moving, casting or switching back rebuilds qweight exactly
    layer.prepare()
    layer.to(torch.float64).to(torch.float32)
    assert torch.equal(layer.qweight, before["qweight"])
    layer.prepare()
    layer.set_backend("reference")
    assert torch.equal(layer.qweight, before["qweight"]) and torch.equal(layer(x), ref)
    torch.save(layer.state_dict(), tmp_path / "sd.pt")
    assert torch.equal(torch.load(tmp_path / "sd.pt")["qweight"], before["qweight"])


def pack_rows_of(codes, bits):
    from hf_astroquant.modules import pack_rows

    return pack_rows(codes, bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,k,group_size,perm", [(32, 64, 32, False), (48, 576, 64, True), (96, 1536, 256, False),
                                                 (17, 512, -1, False), (160, 192, 64, False),
                                                 (40, 256, 32, True)])
def test_int4_codes_are_read_back_through_the_kernel_on_any_layout(bits, n, k, group_size, perm):
    """No packed layout is assumed: `codes()` runs the kernel on the identity and inverts the grid."""
    g = torch.Generator().manual_seed(bits + n)
    codes = torch.randint(0, 2 ** bits, (k, n), dtype=torch.int32, generator=g)
    gs = k if group_size == -1 else group_size
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    if perm:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    zeros = torch.randint(0, 2 ** bits, (k // gs, n), dtype=torch.int32, generator=g)
    scales = (torch.rand(k // gs, n, generator=g) * 0.1 + 1e-3).half()
    w = kernels.int4_weights(codes, zeros, scales, g_idx, gs, bits, torch.float32, torch.device("cpu"))
    assert (w.perm is not None) == perm
    assert torch.equal(w.codes(), codes)


def test_a_layer_whose_codes_cannot_be_read_back_keeps_qweight():
    layer = _layer(4, 32, 128, 32)
    layer.scales[1] = 0  # a zero step: every code gives the same weight, so the kernel cannot tell them apart
    before = layer.qweight.clone()
    assert layer.prepare(torch.bfloat16) == "int4"  # bf16: a layer whose codes read back releases qweight
    assert torch.equal(layer.qweight, before)
    assert torch.equal(layer.state_dict()["qweight"], before)


@pytest.mark.parametrize("k", [200, 196, 33, 8])
def test_int8_pads_rows_so_bf16_never_reaches_the_kernels_crashing_tail(k):
    """torch 2.13's bf16 int8 kernel crashes for K not a multiple of its vector width (K = 200 on
    AVX-512, 196 on AVX2) from 4 rows on: the weights are padded to INT8_K_ALIGN columns."""
    layer = _layer(8, 48, k, -1, seed=k)
    layer.set_backend("int8")
    assert layer.prepare(torch.bfloat16) == "int8"
    assert layer._fast[3].weight.shape[1] % kernels.INT8_K_ALIGN == 0
    assert _compare(layer, "int8", torch.bfloat16, lead=(4, 16)) == "int8"


def test_int8_bf16_odd_k_through_from_pretrained_does_not_crash(tmp_path):
    """The whole load-and-run path, in a child process, so a crash is a failure and not a dead run."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from transformers import AutoModelForCausalLM
        import hf_astroquant
        from hf_astroquant import AstroQuantConfig, QuantLinear
        from tiny import calib_ids, save_tiny
        save_tiny({str(tmp_path / "src")!r}, hidden=64, inter=200)
        cfg = AstroQuantConfig(bits=8, group_size=-1, method="rtn")
        AutoModelForCausalLM.from_pretrained({str(tmp_path / "src")!r}, quantization_config=cfg).save_pretrained(
            {str(tmp_path / "q")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "q")!r}, dtype=torch.bfloat16)
        down = [m for n, m in model.named_modules() if n.endswith("down_proj")][0]
        assert isinstance(down, QuantLinear) and down.in_features == 200
        with torch.no_grad():
            out = model(calib_ids(4, 16)).logits
        assert down.active_backend == "int8", down.active_backend
        assert torch.isfinite(out).all()
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), (run.returncode, run.stderr[-2000:])


def test_auto_runs_large_fp32_cpu_batches_through_the_fp32_gemm(monkeypatch):
    layer = _layer(4, 32, 128, 32)
    layer.prepare()
    calls = []
    real = kernels.Int4Weights.forward
    probe = (4, 128)  # the check when a path is (re)built

    def spy(self, x):
        if tuple(x.shape) != probe:
            calls.append(x.shape)
        return real(self, x)

    monkeypatch.setattr(kernels.Int4Weights, "forward", spy)
    big = torch.randn(2, 600, 128)  # 1200 rows
    y = layer(big)
    assert calls == [] and layer.qweight.numel() > 0  # de-quantized from qweight, which fp32 layers keep
    layer.set_backend("reference")
    assert torch.equal(y, layer(big))
    layer.set_backend("auto")
    layer(big[:, :8])
    layer(big.bfloat16())  # bf16 batches always take the kernel
    assert len(calls) == 2
    layer.set_backend("int4")  # an explicit kernel choice is always honoured
    layer(big)
    assert len(calls) == 3
