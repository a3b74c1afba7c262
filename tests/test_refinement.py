"""Block-output refinement (`refine_steps`): the scale tuning's math, its glue, and its options."""

import pytest
import torch

from families import tiny_model
from hf_astroquant import AstroQuantConfig, QuantLinear
from hf_astroquant.algorithms.scale_tuning import TunedScales
from hf_astroquant.blocks import find_blocks
from hf_astroquant.pipeline import quantize_model
from hf_astroquant.refinement import mean_loss, refine_block, slice_kwargs, window_slices
from tiny import calib_ids, tiny_llama


def _solved_layer(out=24, inp=64, group=16, bits=2, seed=0, g_idx=None):
    from hf_astroquant.algorithms import solve_linear
    from hf_astroquant.algorithms.solve import SolverOptions
    from hf_astroquant.modules import make_layer

    torch.manual_seed(seed)
    W = torch.randn(out, inp)
    result, _ = solve_linear(W, None, SolverOptions(bits=bits, group_size=group, sym=False, mse=False, method="rtn"))
    cfg = AstroQuantConfig(bits=bits, group_size=group)
    layer = make_layer(result, cfg, torch.randn(out))
    layer.set_backend("reference")
    return layer


def test_tuned_scales_start_at_the_solved_weight_and_follow_the_formula():
    layer = _solved_layer()
    tuned = TunedScales(*layer.unpack(), layer.scales, layer.g_idx, layer.bias)
    assert torch.equal(tuned.weight(), layer.dequantize_weight())  # t = 0: exactly the packed weight
    x = torch.randn(5, 64)
    assert torch.allclose(tuned(x), layer(x), atol=1e-5)
    with torch.no_grad():
        tuned.log_factor.normal_(0, 0.1)
    codes, zeros = layer.unpack()
    g = layer.g_idx.long()
    slow = torch.empty(24, 64)
    for o in range(24):  # Ŵ[o, i] = (q[i, o] − z[g(i), o]) · s[g(i), o] · exp(t[g(i), o]), one weight at a time
        for i in range(64):
            s = float(layer.scales[g[i], o]) * float(torch.exp(tuned.log_factor.detach()[g[i], o]))
            slow[o, i] = (int(codes[i, o]) - int(zeros[g[i], o])) * s
    assert torch.allclose(tuned.weight(), slow, rtol=1e-5, atol=1e-6)


def test_the_gradient_is_exact():
    """No straight-through estimate: the module's autograd gradient matches finite differences."""
    layer = _solved_layer(out=6, inp=16, group=8)
    tuned = TunedScales(*layer.unpack(), layer.scales, layer.g_idx, None).double()
    x, y = torch.randn(7, 16, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)

    def loss(t):
        return (torch.func.functional_call(tuned, {"log_factor": t}, (x,)) - y).pow(2).mean()

    t = (0.1 * torch.randn_like(tuned.log_factor)).requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (t,))


def test_window_slices_cover_the_windows_with_a_target():
    batches = [torch.zeros(5, 3), torch.zeros(5, 3), torch.zeros(2, 3)]
    targets = [torch.zeros(5, 3), torch.zeros(3, 3)]  # fp_samples=8: the first windows of the first batches
    pieces = window_slices(batches, targets, 2)
    assert pieces == [(0, slice(0, 2)), (0, slice(2, 4)), (0, slice(4, 5)), (1, slice(0, 2)), (1, slice(2, 3))]


def test_slice_kwargs_slices_per_window_tensors_and_keeps_shared_ones():
    mask = torch.arange(4 * 8).view(4, 1, 2, 4)
    cos = torch.ones(1, 2, 4)
    kw = {"attention_mask": mask, "position_embeddings": (cos, cos), "cache": None, "flag": True}
    out = slice_kwargs(kw, slice(1, 3), 4)
    assert torch.equal(out["attention_mask"], mask[1:3])
    assert out["position_embeddings"][0] is cos and out["cache"] is None and out["flag"] is True
    assert slice_kwargs(mask, slice(0, 1), 1) is mask  # a batch of one window: nothing to slice


def _first_block_setup(model, data):
    """Block 0 of `model` quantized by GPTQ at 2 bits, with its inputs, kwargs and fp outputs."""
    from hf_astroquant.stream import capture_block_inputs, run_block

    prefix, blocks = find_blocks(model)
    inputs, kwargs_list = capture_block_inputs(model, list(blocks), [data])
    with torch.no_grad():
        target = [run_block(blocks[0], inputs[0], kwargs_list[0][0])]
    return blocks[0], f"{prefix}.0", inputs, kwargs_list[0], target


def _quantized_block(seed=0):
    model = tiny_llama(seed=seed, layers=1)
    data = calib_ids(16, 32)
    block, name, inputs, kwargs, target = _first_block_setup(model, data)
    quantize_model(model, AstroQuantConfig(bits=2, group_size=32, dataset=data), lambda n: True)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for m in packed.values():
        m.set_backend("reference")
    with torch.no_grad():
        from hf_astroquant.stream import run_block

        outputs = [run_block(block, inputs[0], kwargs[0])]
    return model, block, name, packed, inputs, kwargs, target, outputs


def test_refine_block_lowers_the_output_loss_and_keeps_codes_and_zeros():
    model, block, name, packed, inputs, kwargs, target, outputs = _quantized_block()
    before_codes = {n: m.unpack() for n, m in packed.items()}
    before_scales = {n: m.scales.clone() for n, m in packed.items()}
    new_outputs, before, after = refine_block(block, name, packed, inputs, kwargs, target, outputs, steps=30,
                                              lr=5e-3, per_step=4)
    assert before == pytest.approx(mean_loss(outputs, target))
    assert after < 0.97 * before, (before, after)
    assert after == pytest.approx(mean_loss(new_outputs, target))  # measured with the stored fp16 scales
    for n, m in packed.items():
        assert all(torch.equal(a, b) for a, b in zip(before_codes[n], m.unpack()))
        assert not torch.equal(before_scales[n], m.scales)
    assert all(not p.requires_grad or p.grad is None for p in block.parameters())  # nothing else learned
    assert all(p.requires_grad for p in block.parameters())  # and requires_grad is put back


def test_refine_block_keeps_the_solved_scales_when_tuning_does_not_help():
    model, block, name, packed, inputs, kwargs, target, outputs = _quantized_block()
    before_scales = {n: m.scales.clone() for n, m in packed.items()}
    new_outputs, before, after = refine_block(block, name, packed, inputs, kwargs, target, outputs, steps=3, lr=1.0,
                                              per_step=4)  # steps of e^±1 per scale: far worse
    assert after > before
    assert new_outputs is outputs
    assert all(torch.equal(before_scales[n], m.scales) for n, m in packed.items())


def _quantize(model, data, **kw):
    cfg = AstroQuantConfig(bits=2, group_size=32, dataset=data, **kw)
    return quantize_model(model, cfg, lambda n: True)


def _logit_error(model, fp, ids):
    with torch.no_grad():
        ref = fp(ids).logits
        return float((model(ids).logits - ref).norm() / ref.norm())


@pytest.mark.parametrize("method,extra", [("gptq", {}), ("gptaq", {}), ("gptaq", {"fp_samples": 8}),
                                          ("gptq", {"calibration_batch_size": 6}), ("rescomp", {"bits": 3})])
def test_refine_steps_in_the_pipeline(method, extra):
    data = calib_ids(16, 32)
    extra = dict(extra)
    bits = extra.pop("bits", 2)
    plain, tuned = tiny_llama(layers=2), tiny_llama(layers=2)
    cfg = dict(method=method, bits=bits, group_size=32, dataset=data, **extra)
    quantize_model(plain, AstroQuantConfig(**cfg), lambda n: True)
    report = quantize_model(tuned, AstroQuantConfig(**cfg, refine_steps=20, refine_lr=5e-3, refine_batch_size=4),
                            lambda n: True)
    assert set(report.refine_loss) == {"model.layers.0", "model.layers.1"}
    assert all(after <= before for before, after in report.refine_loss.values())
    assert any(after < before for before, after in report.refine_loss.values())
    assert report.phase_seconds["refine"] > 0
    changed = 0
    for (n, a), (_, b) in zip(plain.named_modules(), tuned.named_modules()):
        # block 0 has the same inputs in both runs, so the same codes; later blocks see its tuned outputs
        if isinstance(a, QuantLinear) and n.startswith("model.layers.0."):
            assert torch.equal(a.qweight if a.qweight.numel() else a._packed_qweight(),
                               b.qweight if b.qweight.numel() else b._packed_qweight())
            assert torch.equal(a.qzeros, b.qzeros)
            changed += not torch.equal(a.scales, b.scales)
    assert changed > 0


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "gpt2", "qwen3_moe"])
def test_refine_steps_across_families(family):
    """Per-window slicing of each family's block kwargs (sliding-window masks, GPT-2's Conv1D-made
    Linears, routed experts): the tuned model is at least as close to full precision on the
    calibration windows' block outputs, and it still runs."""
    data = calib_ids(8, 32)
    fp = tiny_model(family)
    tuned = tiny_model(family)
    report = _quantize(tuned, data, refine_steps=10, refine_lr=5e-3, refine_batch_size=2)
    assert report.refine_loss and all(after <= before for before, after in report.refine_loss.values())
    assert torch.isfinite(torch.tensor(_logit_error(tuned, fp, data)))


def test_tuned_scales_survive_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    from tiny import save_tiny

    save_tiny(tmp_path / "fp")
    data = calib_ids(16, 32)
    cfg = AstroQuantConfig(bits=2, group_size=32, dataset=data, refine_steps=10, refine_lr=5e-3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert model.hf_quantizer.report.refine_loss
    model.save_pretrained(tmp_path / "q")
    assert "10 steps of block-output scale tuning" in (tmp_path / "q" / "README.md").read_text()  # the card says so
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.refine_steps == 10
    ids = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-4)


@pytest.mark.parametrize("kw,allowed", [(dict(method="rtn"), "0 with method='rtn'"),
                                        (dict(gguf_type="Q4_K_M", bits=4, group_size=128), "0 with gguf_type")])
def test_refine_steps_refused_where_it_has_nothing_to_tune(kw, allowed):
    with pytest.raises(ValueError, match="refine_steps") as err:
        AstroQuantConfig(refine_steps=5, **kw)
    assert allowed in str(err.value)


def test_a_crashed_refined_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The tuned scales are in each block's checkpoint and the tuned outputs in the stream, so a run
    that crashed after two blocks resumes to the uninterrupted run's bytes (and its report)."""
    from transformers import AutoModelForCausalLM

    import hf_astroquant.pipeline as pipeline
    from tiny import save_tiny

    save_tiny(tmp_path / "fp", layers=4)

    def run(**kw):
        cfg = AstroQuantConfig(bits=2, group_size=32, method="gptaq", dataset=calib_ids(), refine_steps=6,
                               refine_lr=5e-3, refine_batch_size=4, **kw)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)

    plain = run()
    real, calls = pipeline.refine_block, []

    def crash_at_third_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "refine_block", crash_at_third_block)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(resume_dir=str(tmp_path / "r"))
    monkeypatch.setattr(pipeline, "refine_block", real)
    again = run(resume_dir=str(tmp_path / "r"))
    assert again.hf_quantizer.report.resumed_blocks == 2
    assert again.hf_quantizer.report.refine_loss == plain.hf_quantizer.report.refine_loss
    a, b = plain.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
