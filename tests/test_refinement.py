"""Block-output refinement (`refine_steps`): the scale tuning's math, its glue, and its options."""

import pytest
import torch

from families import tiny_model
from hf_astroquant import AstroQuantConfig, QuantLinear
from hf_astroquant.algorithms.scale_tuning import TunedScales
from hf_astroquant.block_solve import solve_block
from hf_astroquant.blocks import block_targets, find_blocks
from hf_astroquant.layer_solve import LayerSolver
from hf_astroquant.pipeline import quantize_model
from hf_astroquant.refinement import mean_loss, refine_block, slice_kwargs, window_slices
from tiny import CrashAfter, calib_ids, tiny_llama


def _solved_layer(out=24, inp=64, group=16, bits=2, seed=0, groups="contiguous"):
    """A packed layer; `groups="act-order"` gives its columns' groups in a shuffled order (as act-order
    without static groups leaves them), so tuning cannot broadcast over consecutive columns."""
    from hf_astroquant.algorithms import solve_linear
    from hf_astroquant.algorithms.solve import SolverOptions
    from hf_astroquant.modules import make_layer

    torch.manual_seed(seed)
    W = torch.randn(out, inp)
    result, _ = solve_linear(W, None, SolverOptions(bits=bits, group_size=group, sym=False, mse=False, method="rtn"))
    cfg = AstroQuantConfig(bits=bits, group_size=group)
    layer = make_layer(result, cfg, torch.randn(out))
    if groups == "act-order":
        layer.g_idx.copy_(layer.g_idx[torch.randperm(inp, generator=torch.Generator().manual_seed(seed))])
        layer._contiguous_groups = None
    layer.set_backend("reference")
    return layer


@pytest.mark.parametrize("groups", ["contiguous", "act-order"])
def test_tuned_scales_start_at_the_solved_weight_and_follow_the_formula(groups):
    layer = _solved_layer(groups=groups)
    assert layer._groups_are_contiguous() == (groups == "contiguous")  # broadcast, or gathered per weight
    tuned = TunedScales(*layer.unpack(), layer.scales, layer.g_idx, layer.bias,
                        group_size=16 if groups == "contiguous" else None)
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


@pytest.mark.parametrize("groups", ["contiguous", "act-order"])
def test_the_gradient_is_exact(groups):
    """No straight-through estimate: the module's autograd gradient matches finite differences."""
    layer = _solved_layer(out=6, inp=16, group=8, groups=groups)
    tuned = TunedScales(*layer.unpack(), layer.scales, layer.g_idx, None,
                        group_size=8 if groups == "contiguous" else None).double()
    x, y = torch.randn(7, 16, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)

    def loss(t):
        return (torch.func.functional_call(tuned, {"log_factor": t}, (x,)) - y).pow(2).mean()

    t = (0.1 * torch.randn_like(tuned.log_factor)).requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (t,))


@pytest.mark.parametrize("groups", ["contiguous", "act-order"])
def test_tuned_rounding_starts_at_the_solved_codes_and_follows_the_formula(groups):
    layer = _solved_layer(bits=2, groups=groups)
    codes, zeros = layer.unpack()
    e = torch.rand(codes.shape) - 0.5
    e[0] = 0.5  # a tie (or a value past the grid's end): still the solved code at r = 0
    tuned = TunedScales(codes, zeros, layer.scales, layer.g_idx, layer.bias, maxq=3, rounding_error=e,
                        group_size=16 if groups == "contiguous" else None)
    assert torch.equal(tuned.weight(), layer.dequantize_weight())  # r = 0, t = 0: exactly the packed weight
    with torch.no_grad():
        tuned.offset.uniform_(-1.5, 1.5)
        tuned.log_factor.normal_(0, 0.1)
    tuned.keep_offsets_in_range()
    r = tuned.offset.detach()
    assert r.abs().max() <= 0.5
    g = layer.g_idx.long()
    slow = torch.empty(24, 64)
    for o in range(24):  # Ŵ[o, i] = (clamp(⌊q + e + r⌉, 0, 3) − z) · s · exp(t), one weight at a time
        for i in range(64):
            x = int(codes[i, o]) + min(max(float(e[i, o]), -0.499), 0.499) + float(r[i, o])
            q = min(max(round(x), 0), 3)
            s = float(layer.scales[g[i], o]) * float(torch.exp(tuned.log_factor.detach()[g[i], o]))
            slow[o, i] = (q - int(zeros[g[i], o])) * s
    assert torch.allclose(tuned.weight(), slow, rtol=1e-5, atol=1e-6)
    moved = tuned.tuned_codes().detach() - codes.float()
    assert moved.abs().max() == 1 and (moved != 0).float().mean() < 0.9
    # the codes moved are those whose decision was near: |e| + |r| past ½
    assert torch.all((moved != 0) <= ((e.clamp(-0.499, 0.499) + r).abs() > 0.5))
    with pytest.raises(ValueError, match="maxq"):
        TunedScales(codes, zeros, layer.scales, layer.g_idx, None, rounding_error=e)


def test_the_rounding_gradient_passes_straight_through():
    """dL/dr[i, o] = dL/dŴ[o, i] · s·exp(t) while the code is on the grid (its ends included, so a code
    at an end can still move inward), 0 once ⌊q + e + r⌉ is past an end and clamped."""
    layer = _solved_layer(out=6, inp=16, group=8, bits=2)
    codes, zeros = layer.unpack()
    outward = torch.where(codes == 0, -1.0, 1.0)  # every code one level down at 0, else one level up
    tuned = TunedScales(codes, zeros, layer.scales, layer.g_idx, None, maxq=3, rounding_error=0.3 * outward)
    with torch.no_grad():
        tuned.offset.copy_(0.5 * outward)
    x, y = torch.randn(7, 16), torch.randn(7, 6)
    W = tuned.weight().detach().requires_grad_(True)
    (torch.nn.functional.linear(x, W) - y).pow(2).mean().backward()
    (tuned(x) - y).pow(2).mean().backward()
    step = tuned.tuned_steps().detach()[layer.g_idx.long()]  # (in, out)
    expected = W.grad.t() * step
    past_an_end = (codes == 0) | (codes == 3)
    assert past_an_end.any() and (~past_an_end).any()
    assert torch.allclose(tuned.offset.grad[~past_an_end], expected[~past_an_end], atol=1e-7)
    assert torch.all(tuned.offset.grad[past_an_end] == 0)


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


def _quantized_block(seed=0, rounding_errors=None):
    """Block 0 of a tiny Llama solved by GPTQ at 2 bits, before any refinement; `rounding_errors` (a
    dict) receives the solver's rounding errors of its layers."""
    model = tiny_llama(seed=seed, layers=1)
    data = calib_ids(16, 32)
    block, name, inputs, kwargs, target = _first_block_setup(model, data)
    if rounding_errors is None:
        quantize_model(model, AstroQuantConfig(bits=2, group_size=32, dataset=data), lambda n: True)
    else:  # the block step's solve alone, with the errors kept (the solver is the one the refinement gets)
        solver = LayerSolver(AstroQuantConfig(bits=2, group_size=32, dataset=data, refine_steps=1,
                                              refine_rounding_lr=0.05))
        with torch.no_grad():
            _, solved, _ = solve_block(block_targets(name, block, lambda n: True), inputs, kwargs, block, solver,
                                       True, None, name)
        rounding_errors.update({n: s.rounding_error for n, s in solved.items()})
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


def test_refine_block_with_rounding_moves_codes_one_level_and_beats_scales_alone():
    errors = {}
    model, block, name, packed, inputs, kwargs, target, outputs = _quantized_block(rounding_errors=errors)
    assert set(errors) == set(packed) and all(e.shape == (m.out_features, m.in_features) for m, e in
                                              zip(packed.values(), errors.values()))
    before = {n: m.unpack() for n, m in packed.items()}
    solved_scales = {n: m.scales.clone() for n, m in packed.items()}
    _, _, scales_only = refine_block(block, name, packed, inputs, kwargs, target, outputs, steps=30, lr=5e-3,
                                     per_step=4)
    for n, m in packed.items():  # back to the solved grid for the second run
        m.scales.copy_(solved_scales[n])
    new_outputs, start, after = refine_block(block, name, packed, inputs, kwargs, target, outputs, steps=30,
                                             lr=5e-3, per_step=4, rounding_lr=5e-3, rounding_errors=errors)
    assert after < scales_only < start, (start, scales_only, after)
    assert after == pytest.approx(mean_loss(new_outputs, target))  # measured with the codes as packed
    moved = 0
    for n, m in packed.items():
        codes, zeros = m.unpack()
        step = (codes.long() - before[n][0].long()).abs()
        assert step.max() <= 1 and torch.equal(zeros, before[n][1])
        moved += int(step.sum())
    assert moved > 0


def test_refine_block_keeps_the_solved_codes_when_rounding_hurts():
    errors = {}
    model, block, name, packed, inputs, kwargs, target, outputs = _quantized_block(rounding_errors=errors)
    before = {n: (m.unpack()[0], m.scales.clone()) for n, m in packed.items()}
    new_outputs, start, after = refine_block(block, name, packed, inputs, kwargs, target, outputs, steps=4, lr=1.0,
                                             per_step=4, rounding_lr=1.0, rounding_errors=errors)  # far worse
    assert after > start and new_outputs is outputs
    for n, m in packed.items():
        assert torch.equal(m.unpack()[0], before[n][0]) and torch.equal(m.scales, before[n][1])


def _quantize(model, data, **kw):
    cfg = AstroQuantConfig(bits=2, group_size=32, dataset=data, **kw)
    return quantize_model(model, cfg, lambda n: True)


def _logit_error(model, fp, ids):
    with torch.no_grad():
        ref = fp(ids).logits
        return float((model(ids).logits - ref).norm() / ref.norm())


@pytest.mark.parametrize("method,extra", [("gptq", {}), ("gptaq", {}), ("gptaq", {"fp_samples": 8}),
                                          ("gptq", {"calibration_batch_size": 6}), ("rescomp", {"bits": 3}),
                                          ("gptaq", {"refine_rounding_lr": 5e-3})])
def test_refine_steps_in_the_pipeline(method, extra):
    data = calib_ids(16, 32)
    extra = dict(extra)
    bits = extra.pop("bits", 2)
    rounding_lr = extra.pop("refine_rounding_lr", 0.0)
    plain, tuned = tiny_llama(layers=2), tiny_llama(layers=2)
    cfg = dict(method=method, bits=bits, group_size=32, dataset=data, **extra)
    quantize_model(plain, AstroQuantConfig(**cfg), lambda n: True)
    report = quantize_model(tuned, AstroQuantConfig(**cfg, refine_steps=20, refine_lr=5e-3, refine_batch_size=4,
                                                    refine_rounding_lr=rounding_lr), lambda n: True)
    assert set(report.refine_loss) == {"model.layers.0", "model.layers.1"}
    assert all(after <= before for before, after in report.refine_loss.values())
    assert any(after < before for before, after in report.refine_loss.values())
    assert report.phase_seconds["refine"] > 0
    changed = 0
    for (n, a), (_, b) in zip(plain.named_modules(), tuned.named_modules()):
        # block 0 has the same inputs in both runs, so the same codes (unless rounding is tuned: then
        # one level apart at most); later blocks see its tuned outputs
        if isinstance(a, QuantLinear) and n.startswith("model.layers.0."):
            step = (a.unpack()[0].long() - b.unpack()[0].long()).abs()
            assert step.max() <= (1 if rounding_lr else 0)
            assert torch.equal(a.qzeros, b.qzeros)
            changed += int(not torch.equal(a.scales, b.scales)) + int(step.sum())
    assert changed > 0


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "gpt2", "qwen3_moe"])
def test_refine_steps_across_families(family):
    """Scales and rounding tuned through each family's blocks: per-window slicing of their kwargs
    (sliding-window masks, GPT-2's Conv1D-made Linears, routed experts, some rounded to nearest for
    want of tokens). The tuned model is at least as close to full precision on the calibration
    windows' block outputs, and it still runs."""
    data = calib_ids(8, 32)
    fp = tiny_model(family)
    tuned = tiny_model(family)
    report = _quantize(tuned, data, refine_steps=10, refine_lr=5e-3, refine_batch_size=2, refine_rounding_lr=5e-3)
    assert report.refine_loss and all(after <= before for before, after in report.refine_loss.values())
    assert torch.isfinite(torch.tensor(_logit_error(tuned, fp, data)))


@pytest.mark.parametrize("rounding_lr,card", [(0.0, "10 steps of block-output scale tuning"),
                                              (0.05, "10 steps of block-output scale and rounding tuning")])
def test_tuned_grids_survive_save_and_load(tmp_path, rounding_lr, card):
    from transformers import AutoModelForCausalLM

    from tiny import save_tiny

    save_tiny(tmp_path / "fp")
    data = calib_ids(16, 32)
    cfg = AstroQuantConfig(bits=2, group_size=32, dataset=data, refine_steps=10, refine_lr=5e-3,
                           refine_rounding_lr=rounding_lr)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert model.hf_quantizer.report.refine_loss
    model.save_pretrained(tmp_path / "q")
    assert card in (tmp_path / "q" / "README.md").read_text()  # the card says so
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.refine_steps == 10
    assert again.config.quantization_config.refine_rounding_lr == rounding_lr
    ids = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-4)


@pytest.mark.parametrize("kw,allowed", [(dict(method="rtn"), "0 with method='rtn'"),
                                        (dict(gguf_type="Q4_K_M", bits=4, group_size=128), "0 with gguf_type")])
def test_refine_steps_refused_where_it_has_nothing_to_tune(kw, allowed):
    with pytest.raises(ValueError, match="refine_steps") as err:
        AstroQuantConfig(refine_steps=5, **kw)
    assert allowed in str(err.value)


@pytest.mark.parametrize("value", [0.05, 1])
def test_refine_rounding_lr_needs_refine_steps(value):
    with pytest.raises(ValueError, match=f"refine_rounding_lr={value}") as err:
        AstroQuantConfig(bits=2, refine_rounding_lr=value)
    assert "unless refine_steps > 0" in str(err.value)
    assert AstroQuantConfig(bits=2, refine_steps=5, refine_rounding_lr=value).refine_rounding_lr == value


@pytest.mark.parametrize("rounding", ["beam", "successive"])
def test_refine_rounding_lr_needs_the_greedy_sweep(rounding):
    with pytest.raises(ValueError, match="refine_rounding_lr=0.005") as err:
        AstroQuantConfig(bits=2, refine_steps=5, refine_rounding_lr=5e-3, rounding=rounding)
    assert f"0 with rounding={rounding!r}" in str(err.value)


def test_a_crashed_refined_run_resumes_bit_for_bit(tmp_path):
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
    with pipeline.listening(CrashAfter(2)), pytest.raises(RuntimeError, match="simulated crash"):
        run(resume_dir=str(tmp_path / "r"))
    again = run(resume_dir=str(tmp_path / "r"))
    assert again.hf_quantizer.report.resumed_blocks == 2
    assert again.hf_quantizer.report.refine_loss == plain.hf_quantizer.report.refine_loss
    a, b = plain.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
