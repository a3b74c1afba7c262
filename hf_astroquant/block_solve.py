"""One decoder block's calibration step: its passes, which Linears are solved when, on which inputs,
on which device. It returns what it made (`BlockResult`); the driver (pipeline.py) installs it.

Every Linear of the block is solved in execution order ("true sequential"): a forward pre-hook
sees the Linear's input, accumulates its statistics (statistics.py), and the solver replaces the
weight by its quantized value before the Linear runs, so later Linears see the outputs of
quantized earlier ones. Linears that share one input tensor (q/k/v, gate/up) form a stage and
share one H and its factorizations (`algorithms/factors.py`). When the calibration set fits one
forward pass this costs a single forward of the block; otherwise each stage is calibrated over
all batches, stopping each forward at the first Linear of the next stage.

A block's mixture-of-experts routing is set for each pass here and nowhere else (`BlockExperts`):
every expert on every token for the full-precision stream of the asymmetric solvers, as
`calibrate_all_experts` says for the statistics, and the model's own routing (counted) for the
outputs the next block reads.

Under torch.distributed (`distributed.Ranks`) each rank runs the block on its share of the windows:
a stage's statistics are summed over ranks before it is solved, its Linears are solved by different
ranks and the packed results sent to all. So that every rank meets the same stages in the same order,
every expert runs (on no rows when no token of this rank is routed to it), and the one-forward path
learns the block's stages first, from one window.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from .algorithms.factors import HessianFactors
from .blocks import path_in_block, set_submodule
from .config import AstroQuantConfig
from .distributed import Ranks, RanksDisagree
from .experts import BlockExperts
from .layer_solve import LayerSolver, SolvedLayer, set_weight, stage_factors
from .memory import release_weight
from .refinement import refine_block, slice_kwargs
from .statistics import NonFiniteInput, Stats, input_stats, summing_dtype
from .stream import FullPrecisionStream, StopForward, pre_hooks, run_block, tensor_bytes

logger = logging.getLogger("hf_astroquant")


@dataclasses.dataclass
class BlockResult:
    """What one block's calibration made."""

    outputs: list[torch.Tensor]  # the block's outputs per batch, through its solved layers: the next block's inputs
    fp_outputs: list[torch.Tensor] | None  # the full-precision block's outputs (when the stream is carried)
    solved: dict[str, SolvedLayer]  # every solved Linear, in the order solved
    unreached: list[str]  # targets no forward pass reached (not experts): they stay in full precision
    expert_tokens: dict[str, list[int]]  # per experts module: the tokens routed to each expert
    refine_loss: list[float] | None = None  # refine_steps: the output loss [solved, tuned]
    fp_stream_bytes: int = 0  # the full-precision stream's peak for this block


def calibrate_block(block: nn.Module, block_name: str, targets: dict[str, nn.Linear], solver: LayerSolver,
                    stream: tuple[list[torch.Tensor], list[dict]],
                    fp_stream: tuple[list[torch.Tensor], list[dict]] | None, fp: FullPrecisionStream,
                    ranks: Ranks | None = None, window_ids: list[list[int]] | None = None) -> BlockResult:
    """Quantize the `targets` of `block` from its quantized-stream inputs (`stream`: inputs, kwargs
    per batch) and, when carried, the full-precision stream's (`fp_stream`); with several `ranks`, from
    this rank's share of the windows (`window_ids`: each batch row's index among all ranks' windows),
    the statistics summed over ranks. The solved layers are in the
    block when this returns (so its outputs are theirs); putting them in the model is the caller's."""
    cfg, timing = solver.cfg, solver.timing
    ranks = ranks or Ranks()
    asymmetric = solver.options.needs_fp_stream
    experts = BlockExperts(block, block_name, every_expert=ranks.active)
    fp_outputs = fp_source = refine_targets = None
    switch_bytes = 0
    if cfg.refine_steps and fp_stream is None:  # the target is the fp block on the same inputs
        with timing("refine"), torch.no_grad():
            refine_targets = [run_block(block, x, kw) for x, kw in zip(*stream)]
    try:
        if fp_stream is not None:
            experts.set_all_tokens(asymmetric)  # every expert's full-precision input on every token
            fp_outputs, fp_source, switch_bytes = fp.advance(block, block_name, *fp_stream, targets, asymmetric,
                                                             stagewise_ok=not experts.owners)
        experts.set_all_tokens(cfg.calibrate_all_experts)
        outputs, solved, missed = solve_block(targets, *stream, block, solver, cfg.true_sequential, fp_source,
                                              block_name, ranks, experts if experts.owners else None)
    finally:
        expert_tokens = experts.finish()
    for name in sorted(expert_tokens):  # the tokens routed over every rank's windows
        expert_tokens[name] = ranks.sum_numbers(expert_tokens[name])
    result = BlockResult(outputs, fp_outputs, solved, [], expert_tokens)
    if cfg.refine_steps:
        result.outputs, *loss = _refine(cfg, block, block_name, solved, stream, refine_targets or fp_outputs,
                                        outputs, timing, ranks, window_ids)
        result.refine_loss = loss
    if fp_stream is not None:  # its inputs and outputs, and at their peak its Linears' inputs
        # (stage by stage, that peak is known once every stage has taken its input)
        result.fp_stream_bytes = max(switch_bytes, tensor_bytes(fp_outputs + fp_stream[0])
                                     + (fp_source.peak_bytes if fp_source is not None else 0))
    for name in missed:
        if name in experts:  # no token was routed to it: the stated fallback
            solved[name] = solver.round_to_nearest(name, targets[name], None)
            continue
        logger.warning("%s was never called during calibration; it stays in full precision", name)
        result.unreached.append(name)
    return result


def _refine(cfg: AstroQuantConfig, block, block_name, solved: dict[str, SolvedLayer], stream, targets, outputs,
            timing, ranks: Ranks, window_ids):
    """Tune the solved layers' scales (and codes) toward `targets` (refinement.py): (the block's new
    outputs, the loss before, after). The rounding errors are let go once used."""
    with timing("refine"):
        errors = {n: s.rounding_error for n, s in solved.items() if s.rounding_error is not None}
        out = refine_block(block, block_name, {n: s.layer for n, s in solved.items()}, stream[0], stream[1], targets,
                           outputs, cfg.refine_steps, cfg.refine_lr, cfg.refine_batch_size, cfg.seed,
                           cfg.refine_rounding_lr, errors, ranks, window_ids)
    for s in solved.values():
        s.rounding_error = None
    return out


def solve_block(targets: dict[str, nn.Linear], batches: list[torch.Tensor], kwargs_list: list[dict], block: nn.Module,
                solver: LayerSolver, true_sequential: bool, fp_source=None, block_name: str = "",
                ranks: Ranks | None = None, experts: BlockExperts | None = None):
    """Solve every target Linear of `block` (named `block_name` in the model); return (its quantized
    outputs per batch, {name: SolvedLayer} in the order solved, the targets no forward pass reached).
    `fp_source.take(name, b)` is the input the full-precision block gives `name` on batch b (for the
    asymmetric solvers: stream.py). Each solved Linear is swapped for its packed layer at once, so
    later forwards run the packed layers and the full-size weights go early. With several `ranks`,
    `batches` are this rank's share and every statistic is summed over ranks before a solve."""
    ranks = ranks or Ranks()
    solved: dict[str, SolvedLayer] = {}
    names = {mod: name for name, mod in targets.items()}
    input_hessian = _statistics_taker(solver, fp_source, experts, summing_dtype(solver.cfg.statistics_dtype, ranks.active))

    def solve(name, linear, stats, device, factors):
        if experts is not None and name in experts and stats.n < solver.cfg.min_expert_tokens:
            if stats.n == 0:  # no token on any rank: as when no forward reaches it (calibrate_block)
                return solver.round_to_nearest(name, linear, None)
            return solver.round_to_nearest(name, linear, stats)  # a Hessian of a handful of tokens corrects nothing
        return solver(name, linear, stats, device, factors)

    def swap_in(name, done: SolvedLayer):
        solved[name] = done
        set_submodule(block, path_in_block(block_name, name), done.layer)

    one_batch = all(n == 1 for n in ranks.gather(len(batches)))  # every rank takes the same path
    # One forward: several ranks solve a stage's Linears together, so they learn the block's stages
    # first (from one window, before the experts count the routed tokens).
    stages = (_stages(names, batches[0], kwargs_list[0], block) if ranks.active and one_batch and true_sequential
              else None)
    if experts is not None:  # the routed counts of the pass that gives the block's outputs
        experts.start_counting()
    if one_batch and true_sequential:
        # One forward: solve each Linear in its pre-hook, before it runs.
        outputs = [_solve_in_one_forward(names, batches[0], kwargs_list[0], block, solver, input_hessian, solve,
                                         swap_in, stages, ranks)]
    else:
        for members, stats in _stage_hessians(targets, names, batches, kwargs_list, block, solved, input_hessian,
                                              true_sequential, ranks):
            for name, done in solve_stage(solve, solver.cfg.damp_percent, members, targets, stats, ranks).items():
                swap_in(name, done)
                release_weight(targets[name])
        if experts is not None:
            experts.set_all_tokens(False)  # statistics are done: the model's own routed forward
            experts.start_counting()
        outputs = [run_block(block, x, kw) for x, kw in zip(batches, kwargs_list)]
    return outputs, solved, [n for n in targets if n not in solved]


def _statistics_taker(solver: LayerSolver, fp_source, experts: BlockExperts | None, dtype: torch.dtype):
    """input_hessian(name, x, bi): the statistics (summed in `dtype`) of the input x that the Linear
    `name` gets on batch bi, against its full-precision input from `fp_source` (batches past the
    full-precision stream's, with fp_samples, add to H only)."""
    with_g, timing = solver.options.needs_dxdxt, solver.timing

    def input_hessian(name, x, bi=0):
        has_fp = fp_source is not None and bi < len(fp_source)
        x_fp = None
        if has_fp:
            with timing("fp_stream"):
                x_fp = fp_source.take(name, bi)
        if has_fp and x_fp is None:
            raise ValueError(f"{name} was not reached by the full-precision forward; cannot calibrate it asymmetrically")
        if x_fp is not None and experts is not None:
            x, x_fp = experts.routed_pairs(name, x, x_fp)
        try:
            with timing("statistics"):
                return input_stats(x, x_fp, with_g, dtype)
        except NonFiniteInput:
            raise ValueError(f"calibration inputs of {name} contain NaN or Inf") from None

    return input_hessian


def _stages(names: dict[nn.Module, str], x: torch.Tensor, kwargs: dict, block: nn.Module) -> list[list[str]]:
    """The block's stages (the target Linears that share one input, in the order they run), from a
    full-precision forward of one window."""
    stages: list[list[str]] = []
    seen: dict[str, Any] = {"x": None}

    def note(module, args):
        if args[0] is not seen["x"]:
            seen["x"] = args[0]  # (held, so no later tensor can reuse its identity)
            stages.append([])
        stages[-1].append(names[module])

    with pre_hooks(list(names), note), torch.no_grad():
        run_block(block, x[:1], slice_kwargs(kwargs, slice(0, 1), len(x)))
    return stages


def _solve_in_one_forward(names, x, kwargs, block, solver, input_hessian, solve, swap_in,
                          stages: list[list[str]] | None = None, ranks: Ranks | None = None) -> torch.Tensor:
    """Run the block once; each target Linear is solved in its pre-hook (from the input it is about
    to get), swapped for its packed layer, and its weights released once its call is over. With
    several `ranks` (and the block's `stages`), the first Linear of a stage to run has the stage solved
    by all ranks (`solve_stage`); the others take their solved layer when their turn comes."""
    ranks = ranks or Ranks()
    shared: dict[str, Any] = {"x": None, "h": None}
    stage_of = {name: members for members in stages or [] for name in members}
    targets = {name: module for module, name in names.items()}
    ready: dict[str, SolvedLayer] = {}

    def solve_now(module, args):
        name = names[module]
        if ranks.active:
            if name in ready:
                if args[0] is not shared["x"]:
                    raise RanksDisagree(f"{name} got another input than the stage it was solved with; the "
                                        "block's stages changed between two forwards")
            else:
                if name not in stage_of:
                    raise RanksDisagree(f"{name} was not in the block's stages when they were learned")
                shared["x"] = args[0]
                stats = ranks.sum_stats(input_hessian(name, args[0]))
                ready.update(solve_stage(solve, solver.cfg.damp_percent, stage_of[name], targets, stats, ranks))
            swap_in(name, ready.pop(name))
            return
        if shared["x"] is not args[0]:  # q/k/v (gate/up) share one input tensor, so one H and its factors
            stats = input_hessian(name, args[0])
            shared.update(x=args[0], h=stats, f=stage_factors(stats, module.weight.device, solver.cfg.damp_percent))
        swap_in(name, solve(name, module, shared["h"], None, shared["f"]))

    def release(module, args, output):  # the call that needed the solved weight is over
        release_weight(module)

    handles = [m.register_forward_hook(release) for m in names]
    try:
        with pre_hooks(list(names), solve_now):
            return run_block(block, x, kwargs)
    finally:
        for handle in handles:
            handle.remove()
        shared.clear()


def _stage_hessians(targets, names, batches, kwargs_list, block, done, input_hessian, true_sequential,
                    ranks: Ranks):
    """Yield (member names, Stats) for each group of Linears that share one input, the statistics
    summed over `ranks` (which must have met the same groups).

    True sequential: one group per pass over all batches, with the groups before it already
    quantized (in `done` by the time the next pass starts); every forward stops at the first Linear
    past the group. Otherwise a single full-precision pass collects the Hessians of all groups.
    """
    while True:
        groups: list[list[str]] = []
        sums: list[list] = []
        for bi, (x, kw) in enumerate(zip(batches, kwargs_list)):
            state: dict[str, Any] = {"x": None, "g": -1}

            def hook(module, args, bi=bi, state=state):
                name = names[module]
                if name in done:
                    return
                x_in = args[0]
                if x_in is state["x"]:  # same input tensor as the group being collected
                    if bi == 0:
                        groups[state["g"]].append(name)
                    return
                g = state["g"] + 1
                if true_sequential and g > 0:
                    raise StopForward
                if bi == 0:
                    groups.append([name])
                    sums.append(None)
                state["x"], state["g"] = x_in, g
                stats = input_hessian(name, x_in, bi)
                sums[g] = stats if sums[g] is None else sums[g].add(stats)

            with pre_hooks(targets.values(), hook):
                try:
                    run_block(block, x, kw)
                except StopForward:
                    pass
        ranks.check_same(groups, "list of the block's stages")
        if not groups:
            return
        yield from zip(groups, [ranks.sum_stats(stats) for stats in sums])
        if not true_sequential:
            return


def solve_stage(solve, damp: float, members: list[str], targets: dict[str, nn.Linear], stats: Stats,
                ranks: Ranks | None = None) -> dict[str, SolvedLayer]:
    """Solve the Linears of one stage (they share `stats`) with `solve(name, linear, stats, device,
    factors)`. With several `ranks`, member k is solved by rank k mod N and its `SolvedLayer` sent to
    every rank, which gives its Linear the quantized weight (as the solve does on its own rank).
    Returns {name: SolvedLayer} in member order."""
    ranks = ranks or Ranks()
    factors: dict[torch.device, HessianFactors] = {}  # made by the first member that needs them
    mine: dict[str, SolvedLayer] = {}
    for k, name in enumerate(members):
        if k % ranks.world_size != ranks.rank:
            continue
        home = targets[name].weight.device
        if home not in factors:
            factors[home] = stage_factors(stats, home, damp)
        mine[name] = solve(name, targets[name], stats, None, factors[home])
    if not ranks.active:
        return mine
    out = {}
    for k, name in enumerate(members):
        src = k % ranks.world_size
        done = ranks.broadcast(mine.get(name), src)
        if src != ranks.rank:
            linear = targets[name]
            set_weight(linear, done.layer.dequantize_weight(torch.float32).to(linear.weight.device))
        out[name] = done
    return out
