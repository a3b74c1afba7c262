"""Solve scheduling for one block: which Linears are solved when, on which inputs, on which device.

Every Linear of the block is solved in execution order ("true sequential"): a forward pre-hook
sees the Linear's input, accumulates its statistics (statistics.py), and the solver replaces the
weight by its quantized value before the Linear runs, so later Linears see the outputs of
quantized earlier ones. Linears that share one input tensor (q/k/v, gate/up) form a stage and
share one H and its factorizations (`algorithms/factors.py`). When the calibration set fits one
forward pass this costs a single forward of the block; otherwise each stage is calibrated over
all batches, stopping each forward at the first Linear of the next stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .algorithms.factors import HessianFactors
from .blocks import path_in_block, set_submodule
from .config import AstroQuantConfig
from .memory import release_weight
from .online_rotation import input_rotation_of, rebased
from .solving import LayerSolver, stage_factors
from .statistics import NonFiniteInput, Stats, input_stats
from .stream import CapturedFpInputs, StagewiseFpInputs, StopForward, pre_hooks, run_block

def quantize_block(
    targets: dict[str, nn.Linear],
    batches: list[torch.Tensor],
    kwargs_list: list[dict],
    block: nn.Module,
    solver: LayerSolver,
    true_sequential: bool,
    fp_source: CapturedFpInputs | StagewiseFpInputs | None = None,
    block_name: str = "",
    devices: list[torch.device] | None = None,
) -> tuple[list[torch.Tensor], list[str]]:
    """Quantize every target Linear of `block` (named `block_name` in the model); return its
    quantized outputs per batch and the targets that no forward pass reached.
    `fp_source.take(name, b)` is the input the full-precision block gives `name` on batch b (for the
    asymmetric solvers: stream.py). Each solved Linear is swapped for its packed layer at once (see
    `LayerSolver`), so later forwards run the packed layers and the full-size weights go early."""
    done: set[str] = set()
    names = {mod: name for name, mod in targets.items()}
    input_hessian = _statistics_taker(solver, fp_source)

    def swap_in(name):
        set_submodule(block, path_in_block(block_name, name), solver.packed[name])

    if solver.experts is not None:  # the routed counts of the pass that gives the block's outputs
        solver.experts.start_counting()
    if len(batches) == 1 and true_sequential and not (devices and len(devices) > 1):
        # One forward: solve each Linear in its pre-hook, before it runs. (Spreading a stage over
        # devices needs the whole stage known first: the staged path below finds it.)
        outputs = [_solve_in_one_forward(targets, names, batches[0], kwargs_list[0], block, solver, done,
                                         input_hessian, swap_in)]
    else:
        stages = _stage_hessians(targets, names, batches, kwargs_list, block, done, input_hessian, true_sequential)
        for members, stats in stages:
            solve_stage(solver, members, targets, stats, devices)
            for name in members:
                swap_in(name)
                release_weight(targets[name])
                done.add(name)
        if solver.experts is not None:
            solver.experts.set_all_tokens(False)  # statistics are done: the model's own routed forward
            solver.experts.start_counting()
        outputs = [run_block(block, x, kw) for x, kw in zip(batches, kwargs_list)]

    return outputs, [n for n in targets if n not in done]


def _statistics_taker(solver: LayerSolver, fp_source):
    """input_hessian(name, x, bi): the statistics of the input x that the Linear `name` gets on batch
    bi, against its full-precision input from `fp_source` (batches past the full-precision stream's,
    with fp_samples, add to H only)."""
    with_g = solver.options.needs_dxdxt

    def input_hessian(name, x, bi=0):
        has_fp = fp_source is not None and bi < len(fp_source)
        x_fp = None
        if has_fp:
            with solver.report.timing("fp_stream"):
                x_fp = fp_source.take(name, bi)
        if has_fp and x_fp is None:
            raise ValueError(f"{name} was not reached by the full-precision forward; cannot calibrate it asymmetrically")
        if x_fp is not None and solver.experts is not None:
            x, x_fp = solver.experts.routed_pairs(name, x, x_fp)
        try:
            with solver.report.timing("statistics"):
                return input_stats(x, x_fp, with_g)
        except NonFiniteInput:
            raise ValueError(f"calibration inputs of {name} contain NaN or Inf") from None

    return input_hessian


def _solve_in_one_forward(targets, names, x, kwargs, block, solver, done, input_hessian, swap_in) -> torch.Tensor:
    """Run the block once; each target Linear is solved in its pre-hook (from the input it is about
    to get), swapped for its packed layer, and its weights released once its call is over."""
    shared: dict[str, Any] = {"x": None, "h": None}

    def solve_now(module, args):
        name = names[module]
        if shared["x"] is not args[0]:  # q/k/v (gate/up) share one input tensor, so one H and its factors
            stats = input_hessian(name, args[0])
            shared.update(x=args[0], h=stats, f=stage_factors(stats, module.weight.device, solver.cfg.damp_percent))
        rotation = input_rotation_of(module)
        solver(name, module, shared["h"], None, shared["f"])
        swap_in(name)
        done.add(name)
        chosen = input_rotation_of(module)
        if chosen is not rotation:  # rotation_candidates chose another: this call's input is x·R_old still
            return (rebased(args[0], rotation, chosen), *args[1:])

    def release(module, args, output):  # the call that needed the solved weight is over
        release_weight(module)

    handles = [m.register_forward_hook(release) for m in targets.values()]
    try:
        with pre_hooks(targets.values(), solve_now):
            return run_block(block, x, kwargs)
    finally:
        for handle in handles:
            handle.remove()
        shared.clear()


def _stage_hessians(targets, names, batches, kwargs_list, block, done, input_hessian, true_sequential):
    """Yield (member names, Stats) for each group of Linears that share one input.

    True sequential: one group per pass over all batches, with the groups before it already
    quantized; every forward stops at the first Linear past the group. Otherwise a single
    full-precision pass collects the Hessians of all groups.
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
        if not groups:
            return
        for members, stats in zip(groups, sums):
            yield members, stats
            done.update(members)
        if not true_sequential:
            return


def solve_stage(solver: LayerSolver, members: list[str], targets: dict[str, nn.Linear], stats: Stats,
                 devices: list[torch.device] | None) -> None:
    """Solve the Linears of one stage (they share `stats`); with several `devices`, member k on
    devices[k mod n], in threads (torch releases the GIL inside its kernels)."""
    damp = solver.cfg.damp_percent
    factors: dict[torch.device, HessianFactors] = {}  # one per device, made before any thread reads them
    if not devices or len(devices) < 2 or len(members) < 2:
        for name in members:
            home = targets[name].weight.device
            if home not in factors:
                factors[home] = stage_factors(stats, home, damp)
            solver(name, targets[name], stats, None, factors[home])
        return
    from concurrent.futures import ThreadPoolExecutor

    on = [devices[k % len(devices)] for k in range(len(members))]
    for device in on:
        if device not in factors:
            factors[device] = stage_factors(stats, device, damp)
    with ThreadPoolExecutor(max_workers=min(len(devices), len(members))) as pool:
        futures = [pool.submit(solver, name, targets[name], stats, on[k], factors[on[k]])
                   for k, name in enumerate(members)]
        for future in futures:
            future.result()


def solve_devices(cfg: AstroQuantConfig, model: nn.Module) -> list[torch.device] | None:
    """The devices the Linears of a stage are spread over: `cfg.solve_devices`, or for "auto" the
    accelerators in the model's accelerate device map (None when fewer than two)."""
    if cfg.solve_devices is None:
        return None
    if cfg.solve_devices == "auto":
        found = set()
        for where in (getattr(model, "hf_device_map", None) or {}).values():
            if isinstance(where, int):
                found.add(torch.device("cuda", where))
            elif isinstance(where, str) and where not in ("cpu", "disk", "meta"):
                found.add(torch.device(where))
        devices = sorted(found, key=str)
        return devices if len(devices) > 1 else None
    return [torch.device(d) for d in cfg.solve_devices]
