"""The calibration driver's pieces, each on its own: statistics, the stream, solve scheduling,
the report and memory release (the driver that runs them in order: pipeline.py)."""

import pytest
import torch
from torch import nn
from tiny import calib_ids, tiny_llama

from hf_astroquant import AstroQuantConfig, QuantLinear
from hf_astroquant.blocks import block_targets, find_blocks
from hf_astroquant.memory import release_weight
from hf_astroquant.block_solve import solve_block
from hf_astroquant.report import QuantizationReport, report_state, restore_report
from hf_astroquant.layer_solve import LayerSolver
from hf_astroquant.statistics import NonFiniteInput, input_stats
from hf_astroquant.stream import capture_block_inputs, fp_stream_batches, run_block, run_block_capturing


def test_statistics_are_the_formulas_and_add_up_over_batches():
    g = torch.Generator().manual_seed(0)
    x, x_fp = torch.randn(3, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    s = input_stats(x, x_fp, with_g=True)
    flat, dx = x.reshape(-1, 8), x_fp.reshape(-1, 8) - x[:2].reshape(-1, 8)
    assert torch.allclose(s.h, flat.t() @ flat) and s.n == 15
    assert torch.allclose(s.d, dx.t() @ x[:2].reshape(-1, 8)) and torch.allclose(s.g, dx.t() @ dx) and s.n_fp == 10
    # two batches, one without full-precision windows, normalize to the statistics of all tokens
    both = input_stats(x, x_fp).add(input_stats(torch.ones(1, 5, 8))).normalize()
    flat = torch.cat([flat, torch.ones(5, 8)])
    assert torch.allclose(both.h, 2 * flat.t() @ flat / 20) and torch.allclose(both.d, 2 * s.d / 10)
    with pytest.raises(NonFiniteInput):
        input_stats(torch.full((1, 2, 8), float("nan")))


def test_the_fp_stream_takes_its_windows_from_the_front_of_each_batch():
    batches = [torch.arange(4).reshape(4, 1), torch.arange(4, 7).reshape(3, 1)]
    assert fp_stream_batches(batches, None) is batches and fp_stream_batches(batches, 7) is batches
    assert [b.flatten().tolist() for b in fp_stream_batches(batches, 5)] == [[0, 1, 2, 3], [4]]


def _block_and_inputs(batches):
    model = tiny_llama(layers=1)
    name, blocks = find_blocks(model)
    inputs, kwargs = capture_block_inputs(model, list(blocks), batches)
    return f"{name}.0", blocks[0], inputs, kwargs[0]


def test_capturing_a_block_keeps_one_copy_per_shared_input():
    name, block, inputs, kwargs = _block_and_inputs([calib_ids(2, 16)])
    targets = block_targets(name, block, lambda n: True)
    out, captured = run_block_capturing(block, inputs[0], kwargs[0], targets, torch.device("cpu"))
    assert torch.equal(out, run_block(block, inputs[0], kwargs[0]))
    q, k, v = (captured[f"{name}.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v  # q/k/v read one tensor: stored once
    assert captured[f"{name}.mlp.down_proj"].shape[-1] == 128 and len(captured) == 7


@pytest.mark.parametrize("batches", [1, 2])
def test_solve_block_solves_every_linear_on_both_schedules(batches):
    data = calib_ids(4, 16)
    name, block, inputs, kwargs = _block_and_inputs(list(data.split(4 // batches)))
    cfg = AstroQuantConfig(bits=4, group_size=32, dataset=data)
    solver = LayerSolver(cfg)
    before = {n: m.weight.detach().clone() for n, m in block_targets(name, block, lambda n: True).items()}
    with torch.no_grad():
        outputs, solved, missed = solve_block(block_targets(name, block, lambda n: True), inputs, kwargs, block,
                                              solver, True, None, name)
    assert missed == [] and len(outputs) == batches
    assert sorted(solved) == sorted(before)
    assert all(0 < s.error < 0.2 and isinstance(s.layer, QuantLinear) for s in solved.values())
    assert all(block.get_submodule(n.removeprefix(name + ".")) is s.layer for n, s in solved.items())
    # the block now runs the packed layers, and its outputs are theirs
    assert torch.equal(outputs[0], run_block(block, inputs[0], kwargs[0]))


def test_a_released_weight_is_empty_and_the_report_round_trips():
    lin = nn.Linear(4, 4)
    release_weight(lin)
    assert lin.weight.numel() == 0
    report = QuantizationReport(layer_errors={"a": 0.1}, damping={"a": 0.01}, seconds=3.0)
    again = QuantizationReport()
    assert restore_report(again, report_state(report)) == 3.0
    assert again.layer_errors == {"a": 0.1} and again.damping == {"a": 0.01}
