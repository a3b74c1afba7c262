"""online_rotation="down": the Kronecker-Hadamard rotation's math, the packed layer that rotates its
input, the pipeline across families, save/reload, resume, and what refuses it."""

import json

import pytest
import torch
import torch.nn.functional as F

from families import tiny_model
from hf_astroquant import AstroQuantConfig, QuantLinear
from hf_astroquant.algorithms.kron_rotation import kron_shape, random_signs_and_mix, rotate_rows, rotation_matrix
from hf_astroquant.modules import InputRotation, empty_layer
from hf_astroquant.pipeline import quantize_model
from tiny import CrashAfter, SeenBlocks, calib_ids, save_tiny, tiny_llama


@pytest.mark.parametrize("n,shape", [(1536, (3, 16, 32)), (576, (9, 8, 8)), (64, (1, 8, 8)), (128, (1, 8, 16)),
                                     (7, (7, 1, 1)), (96, (3, 4, 8)), (1, (1, 1, 1))])
def test_kron_shape_splits_the_width(n, shape):
    assert kron_shape(n) == shape
    m, a, b = shape
    assert m * a * b == n and a <= b and a & (a - 1) == 0 and b & (b - 1) == 0 and m % 2 == 1


def test_kron_shape_refuses_a_width_below_one():
    with pytest.raises(ValueError, match="positive width, got 0"):
        kron_shape(0)


@pytest.mark.parametrize("n", [1536, 576, 64, 7, 96, 1])
def test_rotate_rows_is_the_dense_orthogonal_matrix(n):
    """The factored product equals x·R with R = diag(s)·(A ⊗ H_p) built the slow way, R is orthogonal,
    and the inverse is x·Rᵀ."""
    signs, mix = random_signs_and_mix(n, seed=3)
    R = rotation_matrix(signs, mix)
    assert torch.allclose(R @ R.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(rotate_rows(x, signs, mix), x @ R, atol=1e-12)
    assert torch.allclose(rotate_rows(x, signs, mix, inverse=True), x @ R.t(), atol=1e-12)
    assert torch.allclose(rotate_rows(rotate_rows(x, signs, mix), signs, mix, inverse=True), x, atol=1e-12)


def test_the_rotation_spreads_an_outlier_channel():
    """One channel 100× the rest: after the rotation no channel holds more than a few times the RMS
    (a dense R spreads it over all n), where before one held nearly all of the energy."""
    x = torch.randn(64, 1536, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 7] *= 100
    signs, mix = random_signs_and_mix(1536, seed=0)
    y = rotate_rows(x, signs, mix)
    peak = lambda t: float((t.abs().amax(dim=1) / t.pow(2).mean(dim=1).sqrt()).median())  # noqa: E731
    assert peak(x) > 20 and peak(y) < 6


def test_rotate_rows_refuses_a_rotation_of_another_width():
    signs, mix = random_signs_and_mix(96, seed=0)
    with pytest.raises(ValueError, match="width 96 .* rows of width 64"):
        rotate_rows(torch.randn(2, 64), signs, mix)


def test_input_rotation_keeps_a_linear_function_when_folded():
    """(x·R)·(W·R)ᵀ = x·Wᵀ; fold_into with inverse gives W back; seeded draws repeat."""
    rot = InputRotation.random(192, seed=5)
    assert torch.equal(rot.signs, InputRotation.random(192, seed=5).signs)
    assert not torch.equal(rot.signs, InputRotation.random(192, seed=6).signs)
    W, x = torch.randn(40, 192, dtype=torch.float64), torch.randn(3, 11, 192)
    WR = rot.fold_into(W)
    # (A is stored in fp32: orthogonal to about 1e-7)
    assert torch.allclose(F.linear(rot(x.double()), WR), F.linear(x.double(), W), atol=1e-5)
    assert torch.allclose(rot.fold_into(WR, inverse=True), W, atol=1e-6)
    assert rot(x).dtype == torch.float32 and rot(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_packed_layer_with_an_input_rotation_computes_rotated_x_times_its_weight(backend):
    from hf_astroquant.algorithms import solve_linear
    from hf_astroquant.algorithms.solve import SolverOptions
    from hf_astroquant.modules import make_layer

    rot = InputRotation.random(256, seed=1)
    W = rot.fold_into(torch.randn(64, 256))
    result, _ = solve_linear(W, None, SolverOptions(bits=4, group_size=64, sym=False, mse=False, method="rtn"))
    layer = make_layer(result, AstroQuantConfig(bits=4, group_size=64), torch.randn(64), rot)
    assert layer.input_rotation is not rot and torch.equal(layer.input_rotation.mix, rot.mix)  # its own copy
    layer.set_backend(backend)
    x = torch.randn(5, 256)
    want = F.linear(rot(x), layer.dequantize_weight(), layer.bias)
    got = layer(x)  # (the int4 kernel computes in bf16: about 3 digits)
    assert float((got - want).norm() / want.norm()) < (1e-2 if backend == "auto" else 1e-6)
    keys = set(layer.state_dict())
    assert {"input_rotation.signs", "input_rotation.mix"} <= keys
    empty = empty_layer(256, 64, AstroQuantConfig(bits=4, group_size=64), None, True, rotated_input=True)
    empty.load_state_dict(layer.state_dict())
    empty.set_backend("reference")
    assert torch.allclose(empty(x), F.linear(rot(x), layer.dequantize_weight(), layer.bias), atol=1e-5)


def _logit_error(model, fp, ids):
    with torch.no_grad():
        ref = fp(ids).logits
        return float((model(ids).logits - ref).norm() / ref.norm())


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gpt2", "phi3", "qwen2_moe", "falcon"])
def test_online_rotation_across_families(family):
    """Each family's MLP output projection (down_proj, GPT-2's c_proj made a Linear, Phi-3's after a fused
    gate_up, a shared expert's) is rotated and packed with its rotation; the model stays about as close
    to full precision as without it (a random tiny model has no outliers to remove)."""
    data, ids = calib_ids(8, 32), calib_ids(2, 16, seed=9)
    fp = tiny_model(family)
    errors = {}
    for mode in ("none", "down"):
        model = tiny_model(family)
        report = quantize_model(model, AstroQuantConfig(bits=4, group_size=32, dataset=data, online_rotation=mode),
                                lambda n: True)
        errors[mode] = _logit_error(model, fp, ids)
        rotated = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_rotation is not None]
        assert sorted(report.input_rotated) == sorted(rotated)
        assert bool(rotated) == (mode == "down")
    expected = {"gpt2": "mlp.c_proj", "qwen2_moe": "mlp.shared_expert.down_proj", "falcon": "mlp.dense_4h_to_h"}
    assert all(n.endswith(expected.get(family, "mlp.down_proj")) for n in report.input_rotated)
    assert len(report.input_rotated) == 2  # one per block
    assert errors["down"] < 2 * errors["none"] + 0.02, errors


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi", "gemma3_text"])
def test_writers_rotates_the_attention_output_projection_too(family):
    """online_rotation='writers': o_proj (GPT-2's attn.c_proj, Phi's self_attn.dense) as well, on top of
    the per-head value/output rotation where transform='rotate' folds."""
    data, ids = calib_ids(8, 32), calib_ids(2, 16, seed=9)
    fp, model = tiny_model(family), tiny_model(family)
    transform = "none" if family == "gemma3_text" else "rotate"  # (post-norms: no rotation folds)
    report = quantize_model(model, AstroQuantConfig(bits=8, group_size=32, dataset=data, online_rotation="writers",
                                                    transform=transform), lambda n: True)
    out = {"llama": "self_attn.o_proj", "gemma3_text": "self_attn.o_proj", "gpt2": "attn.c_proj",
           "phi": "self_attn.dense"}[family]
    assert len(report.input_rotated) == 4 and sum(n.endswith(out) for n in report.input_rotated) == 2
    assert _logit_error(model, fp, ids) < 0.02  # 8 bits: the rotations kept the function


def test_online_rotation_with_rotate_astro_refinement_save_and_reload(tmp_path):
    """The whole W4 preset path on a tiny Llama: residual rotation, Astro, GPTAQ, online rotation and
    scale+rounding refinement; the checkpoint records the rotated layers and holds their rotations,
    the card says so, and the reload computes the same logits."""
    from transformers import AutoModelForCausalLM

    save_tiny(tmp_path / "fp")
    cfg = AstroQuantConfig(bits=4, group_size=32, method="gptaq", transform="rotate", astro=True,
                           online_rotation="down", dataset=calib_ids(16, 32), refine_steps=4, refine_batch_size=4,
                           refine_rounding_lr=5e-3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert model.config.quantization_config.input_rotated_modules == ["model.layers.0.mlp.down_proj",
                                                                      "model.layers.1.mlp.down_proj"]
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["online_rotation"] == "down" and len(saved["input_rotated_modules"]) == 2
    assert "online input rotation on 2 output projections" in (tmp_path / "q" / "README.md").read_text()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.model.layers[1].mlp.down_proj.input_rotation is not None
    assert again.model.layers[1].mlp.up_proj.input_rotation is None
    ids = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-4)


def test_a_checkpoint_missing_its_rotation_tensors_is_refused(tmp_path):
    """The load guard expects the rotation's tensors of every rotated layer, so a checkpoint whose
    config says rotated but whose files lack them fails instead of loading a wrong model."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    save_tiny(tmp_path / "fp")
    cfg = AstroQuantConfig(bits=4, group_size=32, online_rotation="down", dataset=calib_ids(8, 32))
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg).save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if "input_rotation.mix" not in k}, path, metadata={"format": "pt"})
    with pytest.raises(Exception, match="input_rotation.mix"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_exports_refuse_a_checkpoint_with_online_rotations(tmp_path, fmt):
    from transformers import AutoModelForCausalLM

    from hf_astroquant.export.compressed_tensors import export_compressed_tensors
    from hf_astroquant.export.gptq import export_gptq
    from hf_astroquant.export.source import ExportError

    save_tiny(tmp_path / "fp")
    cfg = AstroQuantConfig(bits=4, group_size=32, online_rotation="down", dataset=calib_ids(8, 32))
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg).save_pretrained(tmp_path / "q")
    export = export_gptq if fmt == "gptq" else export_compressed_tensors
    with pytest.raises(ExportError, match="2 layer\\(s\\) rotate their input online \\(online_rotation='down'\\)"):
        export(tmp_path / "q", tmp_path / "out")


@pytest.mark.parametrize("transform", ["scale", "adaptive"])
@pytest.mark.parametrize("mode", ["down", "writers"])
def test_scales_leave_the_rotated_projections_alone(transform, mode):
    """Scales on up_proj's (v_proj's) rows would divide channels that down_proj (o_proj) no longer reads
    one by one; with the online rotation those sites are out of the scale search, the record says why."""
    fp, model = tiny_llama(seed=2), tiny_llama(seed=2)
    cfg = AstroQuantConfig(bits=8, group_size=32, transform=transform, online_rotation=mode,
                           kurtosis_threshold_mlp=100.0, kurtosis_threshold_attn=100.0, dataset=calib_ids(8, 32))
    report = quantize_model(model, cfg, lambda n: True)
    for block in report.transforms["blocks"].values():
        assert block["down"] == "online rotation"
        assert (block.get("vo") == "online rotation") == (mode == "writers")
    assert _logit_error(model, fp, calib_ids(2, 16, seed=9)) < 0.02


def test_a_linear_left_in_full_precision_gets_its_weight_back():
    """A down projection excluded after the rotation was attached (here: by a should_convert that
    changes its mind) keeps W, not W·R, and no hook."""
    from hf_astroquant.online_rotation import attach, detach_left_in_full_precision, input_rotation_of

    model = tiny_llama(seed=3)
    down = model.model.layers[0].mlp.down_proj
    W = down.weight.detach().clone()
    x = torch.randn(3, 128)
    y = down(x)
    attach(down, InputRotation.random(128, seed=0))
    assert not torch.allclose(down.weight, W) and torch.allclose(down(x), y, atol=1e-4)
    assert detach_left_in_full_precision(model) == ["model.layers.0.mlp.down_proj"]
    assert input_rotation_of(down) is None and torch.allclose(down.weight, W, atol=1e-5)
    assert torch.allclose(down(x), y, atol=1e-5)


def test_a_crashed_rotated_run_resumes_bit_for_bit(tmp_path):
    """The resumed blocks bring back each layer's own rotation."""
    from transformers import AutoModelForCausalLM

    import hf_astroquant.pipeline as pipeline

    save_tiny(tmp_path / "fp", layers=4)

    def run(**kw):
        cfg = AstroQuantConfig(bits=4, group_size=32, online_rotation="down", dataset=calib_ids(), **kw)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)

    plain = run()
    with pipeline.listening(CrashAfter(2)), pytest.raises(RuntimeError, match="simulated crash"):
        run(resume_dir=str(tmp_path / "r"))
    again = run(resume_dir=str(tmp_path / "r"))
    assert again.hf_quantizer.report.resumed_blocks == 2
    assert again.config.quantization_config.input_rotated_modules == plain.config.quantization_config.input_rotated_modules
    a, b = plain.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw,allowed", [(dict(online_rotation="up"), "allowed: 'none', 'down', 'writers'"),
                                        (dict(online_rotation="down", gguf_type="Q4_K_M", bits=4, group_size=128),
                                         "'none' with gguf_type='Q4_K_M'")])
def test_online_rotation_bad_values(kw, allowed):
    with pytest.raises(ValueError, match="online_rotation") as err:
        AstroQuantConfig(**kw)
    assert allowed in str(err.value)


def test_a_model_without_a_dense_mlp_output_projection_is_refused():
    """Only routed experts (Mixtral): nothing to rotate, said before any calibration."""
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="online_rotation='down': MixtralForCausalLM \\(mixtral\\) has no dense MLP"):
        quantize_model(model, AstroQuantConfig(bits=4, group_size=32, dataset=calib_ids(4, 32), online_rotation="down"),
                       lambda n: True)


def test_round_to_nearest_with_online_rotation_packs_the_rotation():
    """method='rtn' rounds W·R (no data needed) and the packed layer rotates its input."""
    fp, model = tiny_llama(seed=4), tiny_llama(seed=4)
    report = quantize_model(model, AstroQuantConfig(bits=8, group_size=32, method="rtn", online_rotation="down",
                                                    dataset=calib_ids(4, 32)), lambda n: True)
    assert len(report.input_rotated) == 2
    assert model.model.layers[0].mlp.down_proj.input_rotation is not None
    assert _logit_error(model, fp, calib_ids(2, 16, seed=9)) < 0.01  # 8 bits: close to full precision


@pytest.mark.parametrize("batch", [None, 4])
def test_with_writers_rotated_the_quantized_stream_is_the_quantized_models_forward(batch):
    """The stream each block is calibrated on is what the finished model computes, with the rotated
    layers reading their inputs through their rotations."""
    import hf_astroquant.pipeline as pipeline

    model = tiny_llama(layers=3)
    data = calib_ids(8, 32)
    seen = SeenBlocks()
    with pipeline.listening(seen):
        quantize_model(model, AstroQuantConfig(bits=4, group_size=32, method="gptaq", online_rotation="writers",
                                               dataset=data, calibration_batch_size=batch), lambda n: True)
    for m in model.modules():  # the path calibration ran (inference picks kernels that round otherwise)
        if isinstance(m, QuantLinear):
            m.set_backend("reference")
    with torch.no_grad():
        hidden = model(data, output_hidden_states=True).hidden_states
    for i in (1, 2):
        got = torch.cat(seen.q[i])
        assert torch.allclose(got, hidden[i], atol=1e-4, rtol=1e-4), (i, (got - hidden[i]).abs().max())
