"""Everything a user can pass in ends in a result or a clear error that names the problem.

Config values are checked here for every option (a new option without a bad-value case fails
`test_every_option_has_a_bad_value_case`); calibration data, weights, activations, Hessians and
layer shapes are checked at the point where they are used.
"""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_astroquant  # noqa: F401
from hf_astroquant import AstroQuantConfig
from hf_astroquant.calibration import CalibrationDataError, prepare_calibration
from hf_astroquant.layer_solve import LayerSolver
from hf_astroquant.statistics import Stats
from tiny import calib_ids, save_tiny, tiny_llama, tiny_tokenizer

# Bad values beyond the ones every option's check generates (`bad_value_cases`): the cases a
# generated list could miss, each with what the message must say is allowed.
EXTRA_BAD = {
    "bits": [(True, "2, 3, 4, 8")],
    "group_size": [(0, "-1"), (-2, "-1"), (None, "integer")],
    "damp_percent": [(0, r"\(0, 1\]"), (1.5, r"\(0, 1\]")],
    "alpha": [(-0.1, r"\[0, 1\]")],
    "fp_samples": [("all", "integer")],
    "calibration_batch_size": [("auto", "integer")],
    "astro_beta": [(float("inf"), "finite number >= 0")],
    "modules_to_not_convert": [(["mlp.("], r"'mlp\.\(' is not one \(missing \)"), ([""], "none empty")],
    "beam_width": [(10**6, r"an integer in \[1, 64\]")],
    "n_samples": [(10**6, r"an integer in \[1, 65536\]")],
}


def bad_value_cases(config_cls=AstroQuantConfig):
    """(option, bad value, allowed text) for every option of `config_cls`: the values its check must
    refuse, each with the allowed text the message must carry."""
    cases = []
    for o in config_cls.OPTIONS:
        for value in o.check.bad_examples():
            cases.append((o.name, value, re.escape(o.check.allowed)))
        cases += [(o.name, v, a) for v, a in EXTRA_BAD.get(o.name, [])]
    return cases


def test_every_option_has_bad_value_cases():
    names = {name for name, _, _ in bad_value_cases()}
    assert names == set(AstroQuantConfig._option_names())
    assert set(EXTRA_BAD) <= names


@pytest.mark.parametrize("name,value,allowed", bad_value_cases())
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
    (dict(method="rescomp", bits=2), "method='rescomp' is not valid; allowed: 'gptq' or 'gptaq' at bits=2"),
    (dict(rounding="beam", static_groups=False), "static_groups=False is not valid; allowed: True with rounding"),
    (dict(rounding="successive", static_groups=False), "static_groups=False is not valid"),
    (dict(rounding="successive", desc_act=False), "desc_act=False is not valid; allowed: True with rounding"),
    (dict(method="rtn", astro=True), "astro=True is not valid"),
    (dict(method="rtn", transform="scale"), "transform='scale' is not valid"),
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
    solver = LayerSolver(cfg)
    linear = torch.nn.Linear(8, 4, bias=False)
    # indefinite: no damping of 1e-2 .. 1e2 times the mean diagonal makes it positive definite
    h = torch.diag(torch.tensor([1.0, 1, 1, 1, 1, 1, 1, -1e6]))
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj: Hessian is not positive definite even with "
                                         r"damp_percent=100 \(started at 0.01\)"):
        solver("layers.0.mlp.up_proj", linear, Stats(h, 2))


def test_a_nearly_singular_hessian_is_damped_more_and_the_damping_recorded():
    cfg = AstroQuantConfig(bits=4, group_size=8, dataset=calib_ids())
    solver = LayerSolver(cfg)
    linear = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(64, 8)
    h = x.t() @ x
    h[7, 7] = -0.5 * h.diagonal()[:7].mean()  # not positive definite at 1 %, fine at 10 % or more
    assert solver("blk.lin", linear, Stats(h, 64)).damp_percent > 0.01


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
