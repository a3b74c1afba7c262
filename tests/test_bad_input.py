"""Everything a user can pass in ends in a result or a clear error that names the problem.

Config values are checked here for every option (a new option without a bad-value case fails
`test_every_option_has_a_bad_value_case`); calibration data, weights, activations, Hessians and
layer shapes are checked at the point where they are used.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_astroquant  # noqa: F401
from hf_astroquant import AstroQuantConfig
from hf_astroquant.calibration import CalibrationDataError, prepare_calibration
from hf_astroquant.pipeline import _LayerSolver, _Stats, QuantizationReport
from tiny import calib_ids, save_tiny, tiny_llama, tiny_tokenizer

# option: [(bad value, what the message must say is allowed)]
BAD = {
    "bits": [(5, "2, 3, 4, 8"), ("4", "2, 3, 4, 8"), (True, "2, 3, 4, 8"), (4.0, "2, 3, 4, 8")],
    "group_size": [(0, "-1"), (-2, "-1"), (64.0, "integer"), (None, "integer")],
    "sym": [(1, "True or False")],
    "desc_act": [("yes", "True or False")],
    "static_groups": [(None, "True or False")],
    "damp_percent": [(0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), ("0.01", r"\(0, 1\]"), (float("nan"), r"\(0, 1\]")],
    "true_sequential": [(0, "True or False")],
    "method": [("awq", "'rtn', 'gptq', 'gptaq', 'rescomp'"), (None, "'rtn'")],
    "mse": [("no", "True or False")],
    "alpha": [(-0.1, r"\[0, 1\]"), (2, r"\[0, 1\]"), (True, r"\[0, 1\]"), ("0.25", r"\[0, 1\]")],
    "asym_alpha": [(1.5, "None, a number in"), ("best", "'auto' or 'projected'"), (False, "None, a number in")],
    "rounding": [("nearest", "'gptq', 'successive', 'beam'"), (None, "'gptq'")],
    "beam_width": [(0, ">= 1"), (2.0, "integer"), (True, "integer")],
    "fp_samples": [(0, ">= 1"), (2.5, "integer"), ("all", "integer")],
    "dataset": [(12, "list of strings"), ({"text": "a"}, "list of strings")],
    "tokenizer": [(12, "a tokenizer, or a tokenizer name or path")],
    "n_samples": [(0, ">= 1"), (2.5, "integer")],
    "seqlen": [(0, ">= 1"), ("2048", "integer")],
    "seed": [(-1, ">= 0"), (1.0, "integer")],
    "modules_to_not_convert": [("lm_head", "list of module names"), ([1], "list")],
    "block_size": [(0, ">= 1")],
    "calibration_batch_size": [(0, ">= 1"), ("auto", "integer")],
    "backend": [("cuda", "'auto', 'reference'")],
    "resume_dir": [(3, "None or a directory path"), ("", "None or a directory path")],
    "solve_devices": [("cuda:0", "non-empty list of devices"), ([], "non-empty list"), (["gpu zero"], "list of devices"),
                      ([0], "list of devices")],
    "astro": [(1, "True or False"), ("yes", "True or False")],
    "astro_beta": [(-1.0, "finite number >= 0"), (float("inf"), "finite number >= 0"), ("1", "finite number"),
                   (True, "finite number")],
    "astro_steps": [(0, ">= 1"), (10.0, "integer")],
    "astro_lr": [(0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), ("1", r"\(0, 1\]")],
    "transform": [("hadamard", "'none', 'rotate', 'scale', 'adaptive'"), (None, "'none'")],
    "kurtosis_threshold_attn": [(float("nan"), "finite number"), ("1", "finite number")],
    "kurtosis_threshold_mlp": [(float("inf"), "finite number"), (None, "finite number")],
}


def test_every_option_has_a_bad_value_case():
    assert set(BAD) == set(AstroQuantConfig._option_names())


@pytest.mark.parametrize("name,value,allowed", [(n, v, a) for n, cases in BAD.items() for v, a in cases])
def test_bad_option_values_name_the_option_the_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(ValueError, match=allowed) as info:
        AstroQuantConfig(**{name: value})
    message = str(info.value)
    assert f"{name}=" in message and "allowed" in message


@pytest.mark.parametrize("kw,match", [
    (dict(rounding="successive", method="rescomp"), "rounding='successive' is not valid"),
    (dict(method="rtn", asym_alpha=0.5), "method='rtn' is not valid"),
    (dict(method="rtn", rounding="beam"), "method='rtn' is not valid"),
    (dict(fp_samples=8), "fp_samples=8 is not valid; allowed: None with method='gptq'"),
    (dict(method="gptq", asym_alpha=0.0, fp_samples=8), "only the asymmetric solvers"),
])
def test_option_combinations_that_cannot_work_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        AstroQuantConfig(**kw)


def test_calibration_needs_data():
    with pytest.raises(ValueError, match=r"method='gptq'\) needs calibration data: pass dataset="):
        AutoModelForCausalLM.from_pretrained(_tiny_dir(), quantization_config=AstroQuantConfig())


@pytest.mark.parametrize("data,tokenizer,match", [
    ([{"text": "hello"}], tiny_tokenizer(), "item 0 is dict"),
    ([b"bytes"], tiny_tokenizer(), "item 0 is bytes"),
    (["x" * 10], tiny_tokenizer(), "has 10 tokens, fewer than seqlen=64"),
    (["x" * 100], "/no/such/tokenizer", "could not load tokenizer '/no/such/tokenizer'"),
])
def test_bad_calibration_data_and_tokenizers_are_named(data, tokenizer, match):
    with pytest.raises(CalibrationDataError, match=match):
        prepare_calibration(data, tokenizer, n_samples=2, seqlen=64, seed=0)


def test_a_dataset_without_a_text_column_is_named():
    import datasets

    ds = datasets.Dataset.from_dict({"ids": [1, 2, 3]})
    with pytest.raises(CalibrationDataError, match=r"has no text column \(columns: \['ids'\]\)"):
        prepare_calibration(ds, tiny_tokenizer(), n_samples=2, seqlen=4, seed=0)


_DIR = {}


def _tiny_dir():
    if "d" not in _DIR:
        import tempfile

        _DIR["d"] = tempfile.mkdtemp()
        save_tiny(_DIR["d"])
    return _DIR["d"]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_weights_name_the_layer(tmp_path, value):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = value
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="weights of model.layers.1.self_attn.o_proj contain NaN or Inf"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=AstroQuantConfig(dataset=calib_ids()))


def test_a_hessian_that_stays_singular_after_damping_is_escalated_then_named():
    cfg = AstroQuantConfig(bits=4, group_size=8, dataset=calib_ids())
    solver = _LayerSolver(cfg, QuantizationReport())
    linear = torch.nn.Linear(8, 4, bias=False)
    # indefinite: no damping of 1e-2 .. 1e2 times the mean diagonal makes it positive definite
    h = torch.diag(torch.tensor([1.0, 1, 1, 1, 1, 1, 1, -1e6]))
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj: Hessian is not positive definite even with "
                                         r"damp_percent=100 \(started at 0.01\)"):
        solver("layers.0.mlp.up_proj", linear, _Stats(h, 2))


def test_a_nearly_singular_hessian_is_damped_more_and_the_damping_recorded():
    cfg = AstroQuantConfig(bits=4, group_size=8, dataset=calib_ids())
    report = QuantizationReport()
    solver = _LayerSolver(cfg, report)
    linear = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(64, 8)
    h = x.t() @ x
    h[7, 7] = -0.5 * h.diagonal()[:7].mean()  # not positive definite at 1 %, fine at 10 % or more
    solver("blk.lin", linear, _Stats(h, 64))
    assert report.damping["blk.lin"] > 0.01


def test_layers_the_packer_cannot_hold_are_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn is a transformers Conv1D \(32→96\); "
                                         "hf_astroquant packs nn.Linear layers only"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=AstroQuantConfig(dataset=calib_ids()))


def test_odd_shapes_pack_save_and_reload_exactly(tmp_path):
    # widths that are multiples of neither the group size nor the 32-bit word (3-bit codes)
    save_tiny(tmp_path / "fp", hidden=56, inter=99)
    cfg = AstroQuantConfig(bits=3, group_size=32, dataset=calib_ids(), backend="reference")
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    q.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=AstroQuantConfig(backend="reference"))
    ids = calib_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, back(ids).logits)


def test_excluding_every_layer_is_an_error_not_an_empty_quantization():
    cfg = AstroQuantConfig(dataset=calib_ids(), modules_to_not_convert=["layers"])
    with pytest.raises(ValueError, match="quantized no layer of LlamaForCausalLM"):
        AutoModelForCausalLM.from_pretrained(_tiny_dir(), quantization_config=cfg)
