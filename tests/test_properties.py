"""Property-based tests (hypothesis): packing, config round trips, the quantization grid."""

import json
import math
import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hf_astroquant import AstroQuantConfig
from hf_astroquant.algorithms.grid import dequantize, fit_grid, fit_groups, quantize
from hf_astroquant.options import SUPPORTED_BITS, SUPPORTED_METHODS, SUPPORTED_ROUNDING
from hf_astroquant.options import MAX_CALIBRATION_TOKENS
from hf_astroquant.modules.packing import pack_cols, pack_rows, packed_rows, unpack_cols, unpack_rows

SETTINGS = settings(max_examples=60, deadline=None)


def _is_regex(text: str) -> bool:
    """A pattern modules_to_not_convert accepts (transformers matches each as a regular expression)."""
    try:
        re.compile(text)
    except re.error:
        return False
    return True


@st.composite
def codes(draw, max_rows=130, max_cols=9):
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    # bias toward the extremes: the top bit of a word (sign of the int32) is where packers break
    extremes = draw(st.booleans())
    hi = 2**bits
    values = torch.randint(0, hi, (rows, cols), generator=gen)
    if extremes:
        values = torch.where(values % 2 == 0, torch.full_like(values, hi - 1), torch.zeros_like(values))
    return bits, values


def slow_pack_rows(values, bits):
    """Obviously correct: write each value's bits into one long stream, cut it into words."""
    n, m = values.shape
    words = packed_rows(n, bits)
    out = torch.zeros(words, m, dtype=torch.int64)
    for col in range(m):
        stream = 0
        for j in range(n):
            stream |= int(values[j, col]) << (j * bits)
        for w in range(words):
            word = (stream >> (32 * w)) & 0xFFFFFFFF
            out[w, col] = word - 2**32 if word >= 2**31 else word
    return out.to(torch.int32)


@SETTINGS
@given(codes())
def test_pack_rows_round_trips_and_matches_the_bit_stream_definition(case):
    bits, values = case
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_rows(values.shape[0], bits), values.shape[1])
    assert torch.equal(packed, slow_pack_rows(values, bits))
    assert torch.equal(unpack_rows(packed, bits, values.shape[0]).long(), values)


@SETTINGS
@given(codes(max_rows=9, max_cols=130))
def test_pack_cols_round_trips(case):
    bits, values = case
    packed = pack_cols(values, bits)
    assert torch.equal(packed, slow_pack_rows(values.t(), bits).t())
    assert torch.equal(unpack_cols(packed, bits, values.shape[1]).long(), values)


@SETTINGS
@given(st.sampled_from(SUPPORTED_BITS), st.integers(0, 5000))
def test_packed_rows_holds_every_bit_and_whole_words(bits, n):
    words = packed_rows(n, bits)
    assert words * 32 >= n * bits and (words * 32 - n * bits) < 32 * bits  # enough, and padding under one unit


def _valid_configs():
    method = st.sampled_from(SUPPORTED_METHODS)
    return st.builds(
        dict,
        bits=st.sampled_from(SUPPORTED_BITS),
        group_size=st.one_of(st.just(-1), st.integers(1, 4096)),
        sym=st.booleans(), desc_act=st.booleans(), static_groups=st.booleans(),
        damp_percent=st.floats(1e-6, 1.0), true_sequential=st.booleans(), method=method, mse=st.booleans(),
        alpha=st.floats(0.0, 1.0), n_samples=st.integers(1, 10_000), seqlen=st.integers(1, 1 << 16),
        seed=st.integers(0, 2**63 - 1), block_size=st.integers(1, 1024),
        calibration_batch_size=st.one_of(st.none(), st.integers(1, 512)),
        modules_to_not_convert=st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=12).filter(_is_regex),
                                                             max_size=3)),
        beam_width=st.integers(1, 16),
    ).flatmap(lambda d: st.builds(lambda a, r: {**d, "asym_alpha": a, "rounding": r},
                                  st.just(None) if d["method"] == "rtn" else st.one_of(
                                      st.none(), st.floats(0.0, 1.0), st.sampled_from(["auto", "projected"])),
                                  st.just("gptq") if d["method"] == "rtn" else st.sampled_from(
                                      [r for r in SUPPORTED_ROUNDING if d["method"] == "gptq" or r != "successive"]))
    ).map(_follow_the_rules)


def _follow_the_rules(d):
    """Set what `config.check_combinations` requires of the drawn combination."""
    if d["rounding"] in ("beam", "successive"):
        d["static_groups"] = True
    if d["rounding"] == "successive":
        d["desc_act"] = True
    if d["method"] == "rescomp" and d["bits"] < 3:
        d["bits"] = 3
    d["n_samples"] = min(d["n_samples"], MAX_CALIBRATION_TOKENS // d["seqlen"])  # the calibration token bound
    return d


@SETTINGS
@given(_valid_configs())
def test_every_valid_config_round_trips_through_json(options):
    cfg = AstroQuantConfig(**options)
    d = json.loads(json.dumps(cfg.to_dict()))
    again = AstroQuantConfig.from_dict(d)
    assert again.to_dict() == d
    for name, value in options.items():
        assert getattr(again, name) == (float(value) if isinstance(value, int) and name in ("damp_percent", "alpha")
                                        else value)
    assert set(cfg.to_diff_dict()) <= set(d)


@SETTINGS
@example("mse", False)  # an optional boolean: once accepted with the wrong kind test
@given(st.sampled_from(AstroQuantConfig._option_names()),
       st.one_of(st.integers(-10, 10), st.floats(allow_nan=True), st.text(max_size=5), st.none(), st.booleans(),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)))
def test_any_value_is_accepted_as_its_kind_or_refused_with_a_value_error_naming_the_option(name, value):
    from hf_astroquant import checks

    check = AstroQuantConfig.option(name).check
    try:
        cfg = AstroQuantConfig(**{name: value})
    except ValueError as exc:
        assert f"{name}=" in str(exc) and "allowed: " in str(exc)
        return
    stored = getattr(cfg, name)
    if isinstance(check, checks.Maybe):
        if value is None:
            return
        check = check.inner
    # what was accepted is of the option's kind: a check that lets a wrong kind through fails here
    if isinstance(check, checks.Boolean):
        assert isinstance(value, bool) and stored is value
    elif isinstance(check, checks.OneOf):
        assert any(type(value) is type(v) and value == v for v in check.values)
    elif isinstance(check, checks.Integer):
        assert type(value) is int and (value >= 0 or value == -1)
    elif isinstance(check, checks.Number):
        assert type(value) in (int, float) and math.isfinite(value) and stored == float(value)
    assert json.loads(cfg.to_json_string())["quant_method"] == "astroquant"


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def weights(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 40))
    flat = draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(flat, dtype=torch.float32).view(rows, cols)


@SETTINGS
@given(weights(), st.sampled_from(SUPPORTED_BITS), st.booleans())
def test_grid_codes_are_in_range_and_rounding_error_is_at_most_half_a_step(w, bits, sym):
    scale, zero = fit_grid(w, bits, sym)
    maxq = 2**bits - 1
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert ((zero >= 0) & (zero <= maxq) & (zero == zero.round())).all()
    if sym:
        assert (zero == 2 ** (bits - 1)).all()
    s, z = scale[:, None], zero[:, None]
    q = quantize(w, s, z, bits)
    assert ((q >= 0) & (q <= maxq) & (q == q.round())).all()
    lo, hi = (0 - z) * s, (maxq - z) * s
    inside = (w >= lo) & (w <= hi)
    err = (dequantize(q, s, z) - w).abs()
    assert (err[inside] <= s.expand_as(w)[inside] * (0.5 + 1e-5) + 1e-6).all()
    assert torch.equal(quantize(dequantize(q, s, z), s, z, bits), q)  # a grid point keeps its code


@SETTINGS
@given(weights(), st.sampled_from((2, 3, 4)), st.booleans())
def test_mse_grid_is_never_worse_than_min_max_in_its_own_metric(w, bits, sym):
    def err(scale, zero):
        s, z = scale[:, None], zero[:, None]
        return ((dequantize(quantize(w, s, z, bits), s, z) - w).abs() ** 2.4).sum(dim=1)

    plain, searched = err(*fit_grid(w, bits, sym)), err(*fit_grid(w, bits, sym, mse=True))
    assert (searched <= plain * (1 + 1e-5) + 1e-6).all()


@SETTINGS
@given(weights(), st.integers(1, 40), st.sampled_from(SUPPORTED_BITS), st.booleans())
def test_groups_are_fitted_exactly_as_their_columns_alone(w, group_size, bits, sym):
    scales, zeros = fit_groups(w, group_size, bits, sym)
    n_groups = -(-w.shape[1] // group_size)
    assert scales.shape == zeros.shape == (n_groups, w.shape[0])
    for g in range(n_groups):
        s, z = fit_grid(w[:, g * group_size:(g + 1) * group_size], bits, sym)
        assert torch.equal(scales[g], s) and torch.equal(zeros[g], z)


@SETTINGS
@given(st.sampled_from(SUPPORTED_BITS), st.one_of(st.integers(-(2**40), -1), st.integers(16, 2**40)))
def test_packing_refuses_codes_out_of_range(bits, bad):
    if 0 <= bad < 2**bits:
        return
    values = torch.zeros(5, 3, dtype=torch.long)
    values[2, 1] = bad
    with pytest.raises(ValueError, match=rf"values outside \[0, {2**bits - 1}\] cannot be packed in {bits} bits"):
        pack_rows(values, bits)


@pytest.mark.parametrize("bits", [1, 5, 16, 32])
def test_packing_refuses_unsupported_bits(bits):
    with pytest.raises(ValueError, match=f"bits={bits} cannot be packed; allowed: 2, 3, 4, 8"):
        pack_rows(torch.zeros(4, 4, dtype=torch.long), bits)
