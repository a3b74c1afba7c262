"""The block-by-block calibration driver: capture, solve, pack, propagate.

For each decoder block, in order:
  1. the block's inputs X are what the already-quantized prefix of the model produces
     (optionally the full-precision stream X̃ is carried beside it);
  2. every Linear of the block is solved in execution order ("true sequential"): a forward
     pre-hook sees the Linear's input, accumulates H = 2·X·Xᵀ/N in fp32 (and, for the asymmetric
     solvers, D = 2·ΔX·Xᵀ/N against the input X̃ the full-precision block gave the same Linear,
     captured in a forward of the full-precision block just before), and the solver replaces
     the weight by its quantized value before the Linear runs, so later Linears see the outputs of
     quantized earlier ones. Linears that share one input tensor (q/k/v, gate/up) share one H.
     When the calibration set fits one forward pass this costs a single forward of the block;
     otherwise each stage of Linears sharing an input is calibrated over all batches, stopping
     each forward at the first Linear of the next stage;
  3. the solved Linears are packed into `QuantLinear` modules;
  4. the block's outputs (computed with quantized weights) become the next block's inputs.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import rtn_quantize, solve_linear
from .algorithms.gptq import LayerQuantResult, reconstruction_error
from .calibration import batch_windows, prepare_calibration
from .config import AstroQuantConfig
from .modules import QuantLinear

logger = logging.getLogger("hf_astroquant")

# Activation memory per forward pass when the user does not fix calibration_batch_size.
_CPU_BATCH_BUDGET = 4 * 2**30


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class QuantizationReport:
    """What a calibration run did, for logs, model cards and tests."""

    layer_errors: dict[str, float] = field(default_factory=dict)  # relative tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)
    damping: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # targets never called in a forward pass
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    asym_alpha: dict[str, float] = field(default_factory=dict)  # interpolation α used per layer (asymmetric runs)
    fp_stream_bytes: int = 0  # peak bytes held for the full-precision stream (block inputs + captured X̃)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks (e.g. ``model.layers``), found with optimum's block patterns."""
    from optimum.gptq.utils import get_block_name_with_pattern

    try:
        name = get_block_name_with_pattern(model)
    except ValueError as exc:
        raise ValueError(f"hf_astroquant cannot find the decoder blocks of {type(model).__name__}: {exc}") from exc
    return name, model.get_submodule(name)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def block_targets(block_name: str, block: nn.Module, should_convert: Callable[[str], bool]) -> dict[str, nn.Linear]:
    """Linears of one block to quantize, by full module name."""
    return {
        f"{block_name}.{rel}": mod
        for rel, mod in block.named_modules()
        if isinstance(mod, nn.Linear) and should_convert(f"{block_name}.{rel}")
    }


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        if p.device.type == "meta":
            raise NotImplementedError(
                "hf_astroquant calibration found offloaded (meta) weights; load the model without "
                "disk/CPU offload for calibration"
            )
        return p.device
    return torch.device("cpu")


def _auto_batch_size(model: nn.Module, seqlen: int, device: torch.device) -> int:
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", 32)
    per_window = seqlen * (6 * hidden + 3 * inter) * 4 + heads * seqlen * seqlen * 4
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    else:
        budget = _CPU_BATCH_BUDGET
    return max(1, int(budget // per_window))


@dataclass
class _Stats:
    """Sums over calibration tokens for one Linear input: Σxᵀx, and with the full-precision input
    x̃ (Δx = x̃ − x) Σ Δxᵀx and, when asked, Σ Δxᵀ Δx; fp32."""

    h: torch.Tensor
    n: int
    d: torch.Tensor | None = None
    g: torch.Tensor | None = None

    def add(self, other: "_Stats") -> "_Stats":
        self.h.add_(other.h)
        self.n += other.n
        if self.d is not None:
            self.d.add_(other.d)
        if self.g is not None:
            self.g.add_(other.g)
        return self


def _input_stats(x: torch.Tensor, x_fp: torch.Tensor | None = None, with_g: bool = False) -> _Stats:
    """Statistics of one batch of inputs x (..., in), and of the full-precision inputs x_fp."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    h = x.t() @ x
    if not torch.isfinite(torch.diagonal(h)).all():  # a NaN/Inf input shows on the diagonal; cheaper than scanning x
        raise _NonFiniteInput()
    stats = _Stats(h, x.shape[0])
    if x_fp is not None:
        dx = x_fp.reshape(-1, x.shape[-1]).to(device=x.device, dtype=torch.float32) - x
        stats.d = dx.t() @ x
        if not torch.isfinite(torch.diagonal(stats.d)).all():
            raise _NonFiniteInput()
        if with_g:
            stats.g = dx.t() @ dx
    return stats


class _NonFiniteInput(Exception):
    pass


@contextmanager
def _pre_hooks(modules, hook, with_kwargs: bool = False):
    """Forward pre-hooks on `modules` for the duration of a `with` block."""
    handles = [m.register_forward_pre_hook(hook, with_kwargs=with_kwargs) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_block_capturing(block: nn.Module, x: torch.Tensor, kwargs: dict, targets: dict[str, nn.Linear],
                         store: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the (full-precision) block and capture every target Linear's input, kept on `store`;
    Linears that share one input tensor share one stored copy."""
    names = {mod: name for name, mod in targets.items()}
    captured: dict[str, torch.Tensor] = {}
    stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (stored copy, the live input)

    def grab(module, args):
        x_in = args[0]
        if id(x_in) not in stored:
            stored[id(x_in)] = (x_in.detach().to(store), x_in)  # keep x_in alive: ids stay unique
        captured[names[module]] = stored[id(x_in)][0]

    with _pre_hooks(targets.values(), grab):
        out = _run_block(block, x, kwargs)
    return out, captured


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor]):
    """Run the model up to its first block on every batch; return (inputs, kwargs) per batch."""
    inputs, kwargs_list = [], []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        kwargs_list.append(kw)
        raise _StopForward

    device = model.get_input_embeddings().weight.device
    with _pre_hooks([first_block], grab, with_kwargs=True):
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    return inputs, kwargs_list


class _LayerSolver:
    """Solves one Linear from its Hessian and replaces its weight by the quantized value."""

    def __init__(self, cfg: AstroQuantConfig, report: QuantizationReport):
        self.cfg, self.report = cfg, report
        self.options = cfg.solver_options()
        self.results: dict[str, LayerQuantResult] = {}

    def __call__(self, name: str, linear: nn.Linear, stats: _Stats) -> None:
        scale = 2.0 / stats.n
        H = stats.h * scale
        W = linear.weight.data
        if not torch.isfinite(W).all():
            raise ValueError(f"weights of {name} contain NaN or Inf; cannot quantize")
        D = stats.d * scale if stats.d is not None else None
        G = stats.g * scale if stats.g is not None else None
        result, alpha = solve_linear(W, H, self.options, D, G)
        err = reconstruction_error(W, result.weight, H)
        self.report.layer_errors[name] = err
        self.report.damping[name] = result.damp_percent
        if self.options.needs_fp_stream:
            self.report.asym_alpha[name] = alpha
        logger.debug("%s: relative reconstruction error %.3e (damp %.3g, asym alpha %.3g)", name, err,
                     result.damp_percent, alpha)
        linear.weight.data.copy_(result.weight.to(W.dtype))
        self.results[name] = result


def _calibrate_block(
    targets: dict[str, nn.Linear],
    batches: list[torch.Tensor],
    kwargs_list: list[dict],
    block: nn.Module,
    solver: _LayerSolver,
    true_sequential: bool,
    fp_captured: list[dict[str, torch.Tensor]] | None = None,
) -> tuple[list[torch.Tensor], list[str]]:
    """Quantize every target Linear of `block`; return its quantized outputs per batch and the
    targets that no forward pass reached. `fp_captured[b][name]` is the input the full-precision
    block gave `name` on batch b (for the asymmetric solvers)."""
    done: set[str] = set()
    names = {mod: name for name, mod in targets.items()}
    with_g = solver.options.needs_dxdxt

    def input_hessian(name, x, bi=0):
        x_fp = fp_captured[bi].get(name) if fp_captured is not None else None
        if fp_captured is not None and x_fp is None:
            raise ValueError(f"{name} was not reached by the full-precision forward; cannot calibrate it asymmetrically")
        try:
            return _input_stats(x, x_fp, with_g)
        except _NonFiniteInput:
            raise ValueError(f"calibration inputs of {name} contain NaN or Inf") from None

    if len(batches) == 1 and true_sequential:
        # One forward: solve each Linear in its pre-hook, before it runs.
        shared: dict[str, Any] = {"x": None, "h": None}

        def solve_now(module, args):
            name = names[module]
            x = args[0]
            if shared["x"] is not x:
                shared["x"], shared["h"] = x, input_hessian(name, x)
            solver(name, module, shared["h"])
            done.add(name)

        with _pre_hooks(targets.values(), solve_now):
            outputs = [_run_block(block, batches[0], kwargs_list[0])]
        shared.clear()
    else:
        stages = _stage_hessians(targets, names, batches, kwargs_list, block, done, input_hessian, true_sequential)
        for members, stats in stages:
            for name in members:
                solver(name, targets[name], stats)
                done.add(name)
        outputs = [_run_block(block, x, kw) for x, kw in zip(batches, kwargs_list)]

    return outputs, [n for n in targets if n not in done]


def _stage_hessians(targets, names, batches, kwargs_list, block, done, input_hessian, true_sequential):
    """Yield (member names, _Stats) for each group of Linears that share one input.

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
                    raise _StopForward
                if bi == 0:
                    groups.append([name])
                    sums.append(None)
                state["x"], state["g"] = x_in, g
                stats = input_hessian(name, x_in, bi)
                sums[g] = stats if sums[g] is None else sums[g].add(stats)

            with _pre_hooks(targets.values(), hook):
                try:
                    _run_block(block, x, kw)
                except _StopForward:
                    pass
        if not groups:
            return
        for members, stats in zip(groups, sums):
            yield members, stats
            done.update(members)
        if not true_sequential:
            return


def quantize_model(model: nn.Module, cfg: AstroQuantConfig, should_convert: Callable[[str], bool],
                   stream_fp: bool = False, on_block: Callable | None = None) -> QuantizationReport:
    """Quantize every Linear inside the decoder blocks of `model` in place; return a report.

    `stream_fp` carries the full-precision stream X̃ beside the quantized one; `on_block(i, fp_in,
    q_in)` is called with both inputs of every block (the asymmetric solvers' entry point).
    """
    start = time.perf_counter()
    report = QuantizationReport()
    block_name, blocks = find_blocks(model)
    names = [f"{block_name}.{i}" for i in range(len(blocks))]

    if cfg.method == "rtn":
        for name, block in tqdm(list(zip(names, blocks)), desc="astroquant rtn", unit="block"):
            for lname, linear in block_targets(name, block, should_convert).items():
                W = linear.weight.data
                if not torch.isfinite(W).all():
                    raise ValueError(f"weights of {lname} contain NaN or Inf; cannot quantize")
                res = rtn_quantize(W, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, mse=cfg.mse)
                set_submodule(model, lname, QuantLinear.from_result(res, cfg.group_size, cfg.bits, linear.bias))
                report.layer_errors[lname] = float(((res.weight - W.float()) ** 2).sum() / (W.float() ** 2).sum())
        report.seconds = time.perf_counter() - start
        return report

    windows, record = prepare_calibration(cfg.dataset, cfg.tokenizer, cfg.n_samples, cfg.seqlen, cfg.seed)
    report.calibration = record
    device = _device_of(blocks[0])
    seqlen = max(len(w) for w in windows)
    batch_size = cfg.calibration_batch_size or _auto_batch_size(model, seqlen, device)
    batches = batch_windows(windows, batch_size)
    logger.info("calibrating on %d windows (%s) in %d batch(es)", len(windows), record["source"], len(batches))

    solver = _LayerSolver(cfg, report)
    asymmetric = solver.options.needs_fp_stream
    # The full-precision stream X̃ lives on the CPU when the blocks run on an accelerator.
    store = torch.device("cpu") if device.type != "cpu" else device
    with torch.inference_mode(False), torch.no_grad():
        inputs, kwargs_list = capture_block_inputs(model, blocks[0], batches)
        fp_inputs = [x.to(store, copy=True) for x in inputs] if (stream_fp or asymmetric) else None
        for i, (name, block) in enumerate(tqdm(list(zip(names, blocks)), desc=f"astroquant {cfg.method}",
                                               unit="block")):
            targets = block_targets(name, block, should_convert)
            if on_block is not None:
                on_block(i, fp_inputs, inputs)
            fp_captured = None
            if fp_inputs is not None:
                outs, fp_captured = [], []
                for x, kw in zip(fp_inputs, kwargs_list):
                    if asymmetric:
                        out, cap = _run_block_capturing(block, x.to(device), kw, targets, store)
                        fp_captured.append(cap)
                    else:
                        out = _run_block(block, x.to(device), kw)
                    outs.append(out.to(store))
                report.fp_stream_bytes = max(report.fp_stream_bytes, _tensor_bytes(
                    outs + fp_inputs + [t for cap in fp_captured for t in cap.values()]))
                fp_inputs = outs
                if not asymmetric:
                    fp_captured = None
            inputs, missed = _calibrate_block(targets, inputs, kwargs_list, block, solver, cfg.true_sequential,
                                              fp_captured)
            del fp_captured
            for lname in missed:
                logger.warning("%s was never called during calibration; it stays in full precision", lname)
                report.skipped.append(lname)
            for lname, linear in targets.items():
                if lname in solver.results:
                    res = solver.results.pop(lname)
                    set_submodule(model, lname, QuantLinear.from_result(res, cfg.group_size, cfg.bits, linear.bias))
    report.seconds = time.perf_counter() - start
    return report
