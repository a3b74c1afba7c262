"""The family matrix: tiny random models of 26 decoder classes transformers 5 ships (tests/families.py).

For each: gptq and gptaq quantize; every weight matrix of the blocks is packed except the routers
(found by walking the parameters, not a list of Linears); the reload gives identical logits; the
pipeline's block inputs and per-block keyword arguments replay to the model's own block outputs,
and GPTAQ's full-precision stream equals them at every block (sliding-window families with a full
attention layer, calibrated on windows four times their sliding window); every transform folds
exactly in fp32 or is refused with the reason, as the table `families` of benchmarks/results/rows.jsonl
(which renders the README's supported-models table and docs/families.md) records.
"""

import json
from pathlib import Path

import pytest

from families import FAMILIES, TRANSFORMS, auto_class, fold_outcome, quantize_checked, replay_deviation, tiny_model
from tiny import calib_ids

DATA = calib_ids(16, 32)  # windows of 32 tokens; every sliding window in the matrix is 8
RECORD = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "rows.jsonl"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        tiny_model(family).save_pretrained(root / family)
    return root


def test_the_matrix_covers_the_families_the_issue_names():
    assert len(FAMILIES) == 26 and len(set(FAMILIES)) == 26
    for family in FAMILIES:
        model = tiny_model(family)
        window = getattr(model.config.get_text_config(), "sliding_window", None)
        layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
        if not window or ("sliding_attention" not in layer_types and family != "mistral"):
            continue  # no sliding window in use (Mistral slides in every layer, without layer_types)
        assert window * 4 == DATA.shape[1], family
        if family != "mistral":  # every hybrid family has a full-attention layer too
            assert "full_attention" in layer_types, family
    hybrid = [f for f in FAMILIES if "sliding_attention" in (getattr(tiny_model(f).config.get_text_config(),
                                                                     "layer_types", None) or [])]
    assert set(hybrid) == {"qwen2", "gemma2", "gemma3_text", "gpt_oss", "gemma3"}, hybrid


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_weight_is_packed_except_the_routers_and_the_reload_is_identical(saved, family, method, tmp_path):
    got = quantize_checked(family, method, saved / family, tmp_path / "q", DATA)
    assert got["packed"] >= 8, got
    assert got["full_precision"] == {f"{r}.weight" for r in got["routers"]}, got
    assert got["reload_identical"], family
    if method == "gptaq":
        assert got["fp_stream_deviation"] < 1e-5, got
    else:
        assert got["fp_stream_deviation"] is None  # gptq carries no full-precision stream


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pipelines_block_inputs_replay_to_the_models_own_hidden_states(family):
    assert replay_deviation(tiny_model(family), DATA[:4]) < 1e-6


def _recorded():
    rows = map(json.loads, RECORD.read_text().splitlines())
    return {row["label"]: row["columns"] for row in rows if row["table"] == "families"}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_transform_folds_exactly_or_is_refused_as_the_table_says(family, saved):
    from hf_astroquant import AstroQuantConfig
    from hf_astroquant.folding import TransformError

    recorded = _recorded()[family]["transforms"]
    for transform in TRANSFORMS:
        outcome = fold_outcome(family, transform, DATA[:2])
        if outcome.startswith("exact"):
            assert float(outcome.split()[1]) < 1e-5, (family, transform, outcome)
            assert recorded[transform] == "exact", (family, transform)
        else:
            assert recorded[transform] == outcome, (family, transform)
    if recorded["rotate"] != "exact":  # and the pipeline refuses it before any calibration, with that reason
        with pytest.raises(TransformError, match="Use transform='none'"):
            auto_class(family).from_pretrained(saved / family, quantization_config=AstroQuantConfig(
                bits=4, group_size=16, transform="rotate", dataset=DATA))


def test_the_record_and_the_readme_table_cover_every_family():
    recorded = _recorded()
    assert set(recorded) == set(FAMILIES)
    root = RECORD.parent.parent.parent
    table = (root / "README.md").read_text().split("<!-- families-summary:start -->")[1].split("<!-- families-summary")[0]
    listed = [label for line in table.strip().splitlines()[2:] for label in line.split("|")[1].strip().split(", ")]
    assert sorted(listed) == sorted(row["label"] for row in recorded.values())
    docs = (root / "docs" / "families.md").read_text()
    assert all(f"| {row['label']} | `{row['model_class']}` |" in docs for row in recorded.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_transform_runs_end_to_end_where_it_folds(family, saved, tmp_path):
    """Through from_pretrained with transform="auto": the residual rotation where it folds, else the
    scales (Gemma 2/3, OLMo 2, GLM-4: post-norms), as the table records; the choice and its reason in
    the report; every block recorded, 8-bit logits within 3 % of full precision (the MoEs: layer
    output errors as small as without a transform), the reload identical."""
    import statistics

    import torch

    from hf_astroquant import AstroQuantConfig

    transform = "rotate" if _recorded()[family]["transforms"]["rotate"] == "exact" else "scale"
    auto, ids = auto_class(family), DATA[:2]
    with torch.no_grad():
        ref = auto.from_pretrained(saved / family).eval()(input_ids=ids).logits
    model = auto.from_pretrained(saved / family, quantization_config=AstroQuantConfig(
        bits=8, group_size=16, transform="auto", dataset=DATA))
    applied = model.config.quantization_config.transforms_applied
    assert applied["transform"] == transform and all(applied["blocks"].values()), applied
    choice = model.astroquant_report["choices"]["transform"]
    assert choice["asked"] == "auto" and choice["chose"] == transform
    assert ("post-norm" in choice["why"] or "multimodal" in choice["why"]) == (transform == "scale"), choice
    if transform == "rotate":
        assert applied["logit_deviation"] < 1e-4, applied
    with torch.no_grad():
        out = model(input_ids=ids).logits
        if model.astroquant_report.get("routers"):
            # The tiny MoEs' random routers have near-ties that any rounding flips (one flipped token moves the
            # logits by several %, with or without a transform): compare the layers' output errors instead.
            plain = auto.from_pretrained(saved / family, quantization_config=AstroQuantConfig(
                bits=8, group_size=16, dataset=DATA))
            errors = [model.astroquant_report["layer_errors"], plain.astroquant_report["layer_errors"]]
            assert errors[0].keys() == errors[1].keys()
            assert statistics.median(errors[0].values()) < 1.2 * statistics.median(errors[1].values()), family
        else:
            assert float((out - ref).norm() / ref.norm()) < 0.03, family
        model.save_pretrained(tmp_path)
        assert torch.equal(auto.from_pretrained(tmp_path).eval()(input_ids=ids).logits, out)


def _every_preset(family, saved, presets):
    import torch

    from hf_astroquant import AstroQuantConfig

    auto = auto_class(family)
    for quality, bits in presets:
        cfg = AstroQuantConfig.recommended(bits, quality, dataset=DATA, refine_steps=2) if quality == "best" and bits < 4 \
            else AstroQuantConfig.recommended(bits, quality, dataset=DATA)
        model = auto.from_pretrained(saved / family, quantization_config=cfg).eval()
        if cfg.transform == "auto":  # the choice is what folds, as the matrix records
            folds = _recorded()[family]["transforms"]["rotate"] == "exact"
            assert model.astroquant_report["choices"]["transform"]["chose"] == ("rotate" if folds else "scale")
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=DATA[:1]).logits).all(), (quality, bits)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_best_preset_runs_on_every_family(family, saved):
    """No preset raises on any family (the slow test below runs all nine): here `best`, the one that
    asks for every transform, at one width per family in turn (refine steps shortened)."""
    from hf_astroquant.presets import PRESET_BITS

    _every_preset(family, saved, [("best", PRESET_BITS[FAMILIES.index(family) % len(PRESET_BITS)])])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_runs_on_every_family(family, saved):
    from hf_astroquant.presets import PRESETS

    _every_preset(family, saved, sorted(PRESETS))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_on_a_post_norm_family_best_beats_fast(saved, bits):
    """Gemma 3 (post-norms: no residual rotation folds): `best` runs with the scales in its place and
    gives lower block-output errors than `fast` on windows it was not calibrated on."""
    import torch

    from hf_astroquant import AstroQuantConfig

    auto, held = auto_class("gemma3_text"), calib_ids(8, 32, seed=100)
    fp = auto.from_pretrained(saved / "gemma3_text").eval()

    def block_error(quality):
        q = auto.from_pretrained(saved / "gemma3_text", quantization_config=AstroQuantConfig.recommended(
            bits, quality, dataset=DATA)).eval()
        with torch.no_grad():
            got = q(input_ids=held, output_hidden_states=True).hidden_states[1:]
            want = fp(input_ids=held, output_hidden_states=True).hidden_states[1:]
        return sum(float((a - b).norm() / b.norm()) for a, b in zip(got, want)) / len(want), q

    (best, q), (fast, _) = block_error("best"), block_error("fast")
    assert q.astroquant_report["choices"]["transform"]["chose"] == "scale"
    assert best < fast, (best, fast)

