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

import dataclasses
import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import offload, resume
from .algorithms import gguf_types, rtn_quantize, solve_linear
from .algorithms.gptq import reconstruction_error
from .calibration import batch_windows, prepare_calibration
from .config import AstroQuantConfig
from .experts import BlockExperts, onload_experts, router_names, split_all
from .linear_like import convert_conv1d
from .modules import QuantLinear, empty_layer, make_layer

logger = logging.getLogger("hf_astroquant")

# Activation memory per forward pass when the user does not fix calibration_batch_size.
_CPU_BATCH_BUDGET = 4 * 2**30


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class QuantizationReport:
    """What a calibration run did, for logs, model cards and tests."""

    layer_errors: dict[str, float] = field(default_factory=dict)  # relative; what of: layer_error_kind
    # "output": tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the calibration inputs; "weight": ‖ΔW‖²/‖W‖² (round-to-nearest
    # sees no data, so it has no H to weigh the error with)
    layer_error_kind: str = "output"
    damping: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # targets never called in a forward pass
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    asym_alpha: dict[str, float] = field(default_factory=dict)  # interpolation α used per layer (asymmetric runs)
    fp_stream_bytes: int = 0  # peak bytes held for the full-precision stream (block inputs + captured X̃)
    resumed_blocks: int = 0  # blocks taken from a resume_dir checkpoint instead of calibrated
    transforms: dict[str, Any] = field(default_factory=dict)  # what transform= folded, per site
    routers: list[str] = field(default_factory=list)  # MoE routers: kept in full precision
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # per experts module: tokens routed to each
    # expert Linears rounded to nearest instead of solved: tokens they saw (< min_expert_tokens; 0: never reached)
    expert_fallback: dict[str, int] = field(default_factory=dict)
    # where the seconds went: the PHASES, and "other" (the blocks' forward passes, bookkeeping)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timing(self, phase: str):
        """Add the wall time of a `with` block to phase_seconds[phase]."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    def close_phases(self) -> None:
        """Put what no phase claimed under "other" (the phases are disjoint parts of `seconds`)."""
        named = sum(v for k, v in self.phase_seconds.items() if k != "other")
        self.phase_seconds["other"] = max(0.0, self.seconds - named)


# The timed parts of a calibration run (QuantizationReport.phase_seconds); disjoint.
PHASES = (
    "preconditioning",  # transform=: the residual rotation; the scale search with its extra forward per block
    "fp_stream",  # the full-precision block forward that gives X̃ (asymmetric solvers, stream_fp)
    "statistics",  # H = 2·X·Xᵀ/N, and D (and G) against X̃, from every Linear's input
    "solve",  # per Linear: Astro, the interpolation α, the layer solver, its packing
)


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
    """Linears of one block to quantize, by full module name (its Conv1D layers were made Linears
    first: linear_like.convert_conv1d)."""
    return {
        f"{block_name}.{rel}": mod
        for rel, mod in block.named_modules()
        if isinstance(mod, nn.Linear) and should_convert(f"{block_name}.{rel}")
    }


def text_config(model: nn.Module):
    """The language model's config: a multimodal model's text_config, else the model's own (or None)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _auto_batch_size(model: nn.Module, seqlen: int, device: torch.device) -> int:
    cfg = text_config(model)
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
    """Sums over calibration tokens for one Linear input: Σxᵀx over n tokens, and with the
    full-precision input x̃ (Δx = x̃ − x) Σ Δxᵀx and, when asked, Σ Δxᵀ Δx over the n_fp tokens
    that have one (fp_samples: the first windows of a batch); fp32."""

    h: torch.Tensor
    n: int
    d: torch.Tensor | None = None
    g: torch.Tensor | None = None
    n_fp: int = 0
    normalized: bool = False

    def normalize(self) -> "_Stats":
        """Turn the sums into H = 2·ΣxᵀX/N (and D, G alike over their own tokens), in place and
        once: the Linears of one stage share these statistics, and a scaled copy per Linear would
        double the memory."""
        if not self.normalized:
            self.h.mul_(2.0 / self.n)
            for t in (self.d, self.g):
                if t is not None:
                    t.mul_(2.0 / self.n_fp)
            self.normalized = True
        return self

    def add(self, other: "_Stats") -> "_Stats":
        self.h.add_(other.h)
        self.n += other.n
        self.n_fp += other.n_fp
        self.d = _sum(self.d, other.d)
        self.g = _sum(self.g, other.g)
        return self


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b (in place into a) where a batch without full-precision windows contributes None."""
    if a is None or b is None:
        return b if a is None else a
    return a.add_(b)


def _input_stats(x: torch.Tensor, x_fp: torch.Tensor | None = None, with_g: bool = False) -> _Stats:
    """Statistics of one batch of inputs x (windows, ..., in), and of the full-precision inputs
    x_fp of its first windows (all of them, or fewer with fp_samples)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    h = x.t() @ x
    if not torch.isfinite(torch.diagonal(h)).all():  # a NaN/Inf input shows on the diagonal; cheaper than scanning x
        raise _NonFiniteInput()
    stats = _Stats(h, x.shape[0])
    if x_fp is not None:
        x_fp = x_fp.reshape(-1, x.shape[-1])
        x = x[:x_fp.shape[0]]  # windows lead, so the first windows are the first rows
        dx = x_fp.to(device=x.device, dtype=torch.float32) - x
        stats.d = dx.t() @ x
        stats.n_fp = x.shape[0]
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


def fp_stream_batches(batches: list[torch.Tensor], fp_samples: int | None) -> list[torch.Tensor]:
    """The windows the full-precision stream runs on: all (`batches` itself) when `fp_samples` is
    None or covers them, else the first `fp_samples` windows, taken from the front of each batch
    in turn, so that stream batch b holds the first windows of calibration batch b."""
    if fp_samples is None or fp_samples >= sum(len(b) for b in batches):
        return batches
    out, left = [], fp_samples
    for batch in batches:
        if left <= 0:
            break
        out.append(batch[:left])
        left -= len(out[-1])
    return out


_RUN_ONLY_KWARGS = ("hidden_states", "past_key_values", "use_cache")


def capture_block_inputs(model: nn.Module, blocks: list[nn.Module], batches: list[torch.Tensor]):
    """Run the model on every batch with each block replaced by a recorder; return (the first
    block's input per batch, kwargs[block][batch]: the keyword arguments the model gives each block).

    Models with `config.layer_types` (Gemma 2/3, gpt-oss, Qwen with sliding windows, ...) give each
    layer type its own attention mask and rotary embeddings, so every block keeps its own. The
    recorders return their input unchanged, so no block's weights are touched (or onloaded); the
    last one stops the forward. Most models pass every block the same objects, so this holds no
    more than one block's kwargs."""
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in blocks]

    def recorder(i):
        def forward(*args, **kw):
            hidden = args[0] if args else kw["hidden_states"]
            if i == 0:
                inputs.append(hidden.detach())
            kwargs[i].append({k: v for k, v in kw.items() if k not in _RUN_ONLY_KWARGS})
            if i == len(blocks) - 1:
                raise _StopForward
            return hidden
        return forward

    device = offload.execution_device(model.get_input_embeddings())
    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate's hook wraps forward per instance
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        for n, batch in enumerate(batches, start=1):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            except Exception as exc:  # the model's own code between blocks failed on the recorders' output
                if len(inputs) < n:  # before the first block: a real error
                    raise
                _fill_from_first_block(kwargs, exc)
    finally:
        for block, forward in zip(blocks, saved):
            del block.forward
            if forward is not None:
                block.forward = forward
    return inputs, kwargs


def _fill_from_first_block(kwargs: list[list[dict]], exc: Exception) -> None:
    """Blocks the recorders did not reach this batch get the first block's kwargs (the one case where
    a model's per-layer arguments cannot be captured without running its blocks)."""
    n = len(kwargs[0])
    missing = [i for i, per_batch in enumerate(kwargs) if len(per_batch) < n]
    logger.warning("could not record the keyword arguments of blocks %s (%s: %s); they are calibrated with the "
                   "first block's", missing, type(exc).__name__, exc)
    for i in missing:
        kwargs[i].append(kwargs[0][-1])


class _LayerSolver:
    """Solves one Linear from its Hessian and replaces its weight by the quantized value."""

    def __init__(self, cfg: AstroQuantConfig, report: QuantizationReport):
        self.cfg, self.report = cfg, report
        self.options = cfg.solver_options()
        self.packed: dict[str, QuantLinear] = {}
        self.experts: BlockExperts | None = None  # the block's experts, when it has any

    def round_to_nearest(self, name: str, linear: nn.Linear, stats: "_Stats | None") -> None:
        """The stated fallback for an expert that saw fewer than min_expert_tokens tokens: round to
        nearest (no error correction from a Hessian of a handful of tokens), recorded in the report."""
        W = linear.weight.data
        result, packed = _rounded_layer(self.cfg, name, linear, mse=False)
        self.report.expert_fallback[name] = stats.n if stats is not None else 0
        if stats is not None:
            self.report.layer_errors[name] = reconstruction_error(W, result.weight, stats.normalize().h)
        linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
        packed.set_backend("reference")
        self.packed[name] = packed

    def __call__(self, name: str, linear: nn.Linear, stats: _Stats, device: torch.device | None = None) -> None:
        """Solve `linear` (on `device` when given: its weight and statistics are copied there and
        the result comes back to the Linear's device)."""
        with self.report.timing("solve"):
            self._solve(name, linear, stats, device)

    def _solve(self, name: str, linear: nn.Linear, stats: _Stats, device: torch.device | None) -> None:
        if self.experts is not None and name in self.experts and stats.n < self.cfg.min_expert_tokens:
            return self.round_to_nearest(name, linear, stats)
        stats.normalize()
        H, D, G = stats.h, stats.d, stats.g
        W = linear.weight.data
        _check_finite_weights(name, W)
        home = W.device
        if device is not None and device != home:
            W, H = W.to(device), H.to(device)
            D = D.to(device) if D is not None else None
            G = G.to(device) if G is not None else None
        opts = dataclasses.replace(self.options, tensor_type=self.cfg.tensor_type_of(name))
        try:
            result, alpha = solve_linear(W, H, opts, D, G)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        err = reconstruction_error(W, result.weight, H)
        self.report.layer_errors[name] = err
        self.report.damping[name] = result.damp_percent
        if self.options.needs_fp_stream:
            self.report.asym_alpha[name] = alpha
        logger.debug("%s: relative reconstruction error %.3e (damp %.3g, asym alpha %.3g)", name, err,
                     result.damp_percent, alpha)
        if result.weight.device != home:
            result = dataclasses.replace(result, **{f.name: getattr(result, f.name).to(home)
                                                    for f in dataclasses.fields(result)
                                                    if isinstance(getattr(result, f.name), torch.Tensor)})
        linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
        # Packed now, so a block holds its packed layers rather than full-size codes and weights.
        # The reference path computes F.linear with exactly these de-quantized values, so a forward
        # through the packed layer gives the same outputs as the Linear; a kernel might not.
        packed = make_layer(result, self.cfg, linear.bias)
        packed.set_backend("reference")
        self.packed[name] = packed
        del result
        _trim_heap()


def _rounded_layer(cfg: AstroQuantConfig, name: str, linear: nn.Linear, mse: bool):
    """(round-to-nearest result, its packed layer) for the Linear `name` on the configured grid."""
    _check_finite_weights(name, linear.weight.data)
    result = rtn_quantize(linear.weight.data, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, mse=mse,
                          tensor_type=cfg.tensor_type_of(name))
    return result, make_layer(result, cfg, linear.bias)


def _check_finite_weights(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(f"weights of {name} contain NaN or Inf; cannot quantize")


def _solve_stage(solver: _LayerSolver, members: list[str], targets: dict[str, nn.Linear], stats: _Stats,
                 devices: list[torch.device] | None) -> None:
    """Solve the Linears of one stage (they share `stats`); with several `devices`, member k on
    devices[k mod n], in threads (torch releases the GIL inside its kernels)."""
    stats.normalize()  # once, before any thread reads it
    if not devices or len(devices) < 2 or len(members) < 2:
        for name in members:
            solver(name, targets[name], stats)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(devices), len(members))) as pool:
        futures = [pool.submit(solver, name, targets[name], stats, devices[k % len(devices)])
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


def _trim_heap() -> None:
    """Hand memory that glibc keeps after large frees back to the OS. Without it the heap holds
    every freed solver buffer and hidden state for reuse, and RSS climbs block after block well
    past what is live. A no-op where malloc_trim does not exist."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _release(linear: nn.Linear) -> None:
    """Free a solved Linear's full-size weight: its packed layer has replaced it in the block."""
    linear.weight.data = torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device)


def _calibrate_block(
    targets: dict[str, nn.Linear],
    batches: list[torch.Tensor],
    kwargs_list: list[dict],
    block: nn.Module,
    solver: _LayerSolver,
    true_sequential: bool,
    fp_captured: list[dict[str, torch.Tensor]] | None = None,
    block_name: str = "",
    devices: list[torch.device] | None = None,
) -> tuple[list[torch.Tensor], list[str]]:
    """Quantize every target Linear of `block` (named `block_name` in the model); return its
    quantized outputs per batch and the targets that no forward pass reached.
    `fp_captured[b][name]` is the input the full-precision block gave `name` on batch b (for the
    asymmetric solvers). Each solved Linear is swapped for its packed layer at once (see
    `_LayerSolver`), so later forwards run the packed layers and the full-size weights go early."""
    done: set[str] = set()
    names = {mod: name for name, mod in targets.items()}
    with_g = solver.options.needs_dxdxt

    def swap_in(name):
        set_submodule(block, name[len(block_name) + 1:] if block_name else name, solver.packed[name])

    def input_hessian(name, x, bi=0):
        # Batches past the full-precision stream's (fp_samples) add to H only.
        has_fp = fp_captured is not None and bi < len(fp_captured)
        x_fp = fp_captured[bi].get(name) if has_fp else None
        if has_fp and x_fp is None:
            raise ValueError(f"{name} was not reached by the full-precision forward; cannot calibrate it asymmetrically")
        if x_fp is not None and solver.experts is not None:
            x, x_fp = solver.experts.routed_pairs(name, x, x_fp)
        try:
            with solver.report.timing("statistics"):
                return _input_stats(x, x_fp, with_g)
        except _NonFiniteInput:
            raise ValueError(f"calibration inputs of {name} contain NaN or Inf") from None

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
            _solve_stage(solver, members, targets, stats, devices)
            for name in members:
                swap_in(name)
                _release(targets[name])
                done.add(name)
        if solver.experts is not None:
            solver.experts.set_all_tokens(False)  # statistics are done: the model's own routed forward
            solver.experts.start_counting()
        outputs = [_run_block(block, x, kw) for x, kw in zip(batches, kwargs_list)]

    return outputs, [n for n in targets if n not in done]


def _solve_in_one_forward(targets, names, x, kwargs, block, solver, done, input_hessian, swap_in) -> torch.Tensor:
    """Run the block once; each target Linear is solved in its pre-hook (from the input it is about
    to get), swapped for its packed layer, and its weights released once its call is over."""
    shared: dict[str, Any] = {"x": None, "h": None}

    def solve_now(module, args):
        name = names[module]
        if shared["x"] is not args[0]:  # q/k/v (gate/up) share one input tensor, so one H
            shared["x"], shared["h"] = args[0], input_hessian(name, args[0])
        solver(name, module, shared["h"])
        swap_in(name)
        done.add(name)

    def release(module, args, output):  # the call that needed the solved weight is over
        _release(module)

    handles = [m.register_forward_hook(release) for m in targets.values()]
    try:
        with _pre_hooks(targets.values(), solve_now):
            return _run_block(block, x, kwargs)
    finally:
        for handle in handles:
            handle.remove()
        shared.clear()


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


def _place(model: nn.Module, name: str, layer: QuantLinear, homes: dict, record: dict | None = None) -> None:
    """Put the packed `layer` in place of the Linear `name`, back where that Linear's weights lived;
    `record` (a checkpoint's tensors) gets its tensors first: offloading leaves them on meta."""
    if record is not None:
        record.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    set_submodule(model, name, layer)
    if name in homes:
        offload.offload(layer, homes[name])


def quantize_model(model: nn.Module, cfg: AstroQuantConfig, should_convert: Callable[[str], bool],
                   stream_fp: bool = False, on_block: Callable | None = None,
                   calibration: tuple[list[torch.Tensor], dict[str, Any]] | None = None) -> QuantizationReport:
    """Quantize every Linear inside the decoder blocks of `model` in place; return a report.

    `stream_fp` carries the full-precision stream X̃ beside the quantized one; `on_block(i, fp_in,
    q_in)` is called with both inputs of every block (the asymmetric solvers' entry point). With
    `cfg.resume_dir`, every finished block is checkpointed and a later run with the same
    directory starts after the last one (see resume.py). `calibration` is `prepare_calibration`'s
    result when the caller has prepared it already (the quantizer does, before the model loads).
    """
    run = _Run(model, cfg, should_convert)
    run.prepare_calibration(calibration)
    run.open_resume_dir()
    if run.pre is not None:  # before finished blocks are restored: their norms and embeddings rotate too
        with run.report.timing("preconditioning"):
            run.pre.before_calibration()
        run.report.transforms = run.pre.record
    run.restore_finished_blocks()
    if cfg.method == "rtn":  # (transform is "none" or "rotate" here: scales need data)
        run.round_to_nearest()
    else:
        with torch.inference_mode(False), torch.no_grad():
            run.calibrate(stream_fp, on_block)
    return run.stamp()


class _Run:
    """The state of one `quantize_model` call, and its steps: calibration data, resume, the block loop."""

    def __init__(self, model: nn.Module, cfg: AstroQuantConfig, should_convert: Callable[[str], bool]):
        self.start = time.perf_counter()
        self.model, self.cfg, self.should_convert = model, cfg, should_convert
        self.report = QuantizationReport()
        block_name, self.blocks = find_blocks(model)
        self.names = [f"{block_name}.{i}" for i in range(len(self.blocks))]
        for name, block in zip(self.names, self.blocks):  # GPT-2's Conv1D: one convention for every solver
            convert_conv1d(block, name, should_convert)
            split_all(block, name, should_convert)  # MoE experts as per-expert Linears (experts.py)
        routers = {r for name, block in zip(self.names, self.blocks) for r in router_names(block, name)}
        self.report.routers = sorted(routers)
        if routers and cfg.gguf_type is not None:
            raise ValueError(f"gguf_type={cfg.gguf_type!r}: the GGUF export does not write mixture-of-experts "
                             "tensors yet; quantize this model without gguf_type (GPTQ or compressed-tensors export)")
        self.should_convert = should_convert = lambda n, keep=should_convert: keep(n) and n not in routers
        if cfg.gguf_type is not None:
            self.should_convert = self._choose_gguf_types(should_convert)
        self.windows, self.batches, self.batch_size = [], [], 0
        self.device = offload.execution_device(self.blocks[0])
        self.pre = _Preconditioner(model, cfg, self.blocks, self.names) if cfg.transform != "none" else None
        self.checkpoints, self.state, self.first, self.earlier_seconds = None, None, 0, 0.0

    def _choose_gguf_types(self, should_convert):
        """Record each target's GGUF tensor type (llama.cpp's mixture, `gguf_types.tensor_type`) in
        `cfg.gguf_tensor_types`; returns `should_convert` less the Linears no GGUF block tiles (left in
        full precision, as llama.cpp writes them in F16)."""
        cfg, config = self.cfg, text_config(self.model)
        heads = getattr(config, "num_attention_heads", None) or 1
        n_gqa = heads // (getattr(config, "num_key_value_heads", None) or heads)
        types, full = {}, []
        for i, (name, block) in enumerate(zip(self.names, self.blocks)):
            for lname, linear in block_targets(name, block, should_convert).items():
                t = gguf_types.tensor_type(cfg.gguf_type, gguf_types.role_of(lname), i, len(self.blocks),
                                           linear.in_features, n_gqa)
                if t == "F16":
                    full.append(lname)
                else:
                    types[lname] = t
        if full:
            logger.warning("astroquant: %d Linear(s) have widths no GGUF block tiles; kept in full precision: %s",
                           len(full), full[:4])
            self.report.skipped.extend(full)
        cfg.gguf_tensor_types = types
        return lambda n: should_convert(n) and n not in full

    def prepare_calibration(self, calibration) -> None:
        cfg = self.cfg
        if cfg.method == "rtn":
            return
        self.windows, record = calibration or prepare_calibration(cfg.dataset, cfg.tokenizer, cfg.n_samples,
                                                                  cfg.seqlen, cfg.seed)
        self.report.calibration = record
        seqlen = max(len(w) for w in self.windows)
        self.batch_size = cfg.calibration_batch_size or _auto_batch_size(self.model, seqlen, self.device)
        self.batches = batch_windows(self.windows, self.batch_size)
        logger.info("calibrating on %d windows (%s) in %d batch(es)", len(self.windows), record["source"],
                    len(self.batches))

    def open_resume_dir(self) -> None:
        cfg = self.cfg
        if cfg.resume_dir is None:
            return
        sample = _embedding_sample(self.model)
        self.checkpoints = resume.ResumeDir(cfg.resume_dir, resume.fingerprint(cfg, self.model, self.windows,
                                                                                self.batch_size, sample))
        self.state = self.checkpoints.load()
        if self.state is not None and self.state["blocks_done"] > 0 and cfg.transform not in ("none", "rotate"):
            raise ValueError(f"resume_dir with transform={cfg.transform!r}: the scales searched for finished "
                             "blocks are not checkpointed; rerun without resume_dir (or an empty one)")

    def restore_finished_blocks(self) -> None:
        if self.state is None:
            return
        self.first = self.state["blocks_done"]
        self.earlier_seconds = _restore_report(self.report, self.state["report"])
        for i in range(self.first):
            _load_block(self.model, self.names[i], self.blocks[i], self.should_convert, self.cfg,
                        self.checkpoints.block_tensors(i))
        self.report.resumed_blocks = self.first
        logger.warning("astroquant: resuming from %s: %d of %d blocks were already done", self.cfg.resume_dir,
                       self.first, len(self.blocks))

    def stamp(self) -> QuantizationReport:
        """Bring the report's seconds (and the phases' remainder) up to now."""
        self.report.seconds = self.earlier_seconds + time.perf_counter() - self.start
        self.report.close_phases()
        return self.report

    def finish_block(self, i: int, packed: dict[str, torch.Tensor] | None, inputs, fp_inputs) -> None:
        if self.checkpoints is not None:
            self.stamp()
            self.checkpoints.save_block(i, packed, inputs, fp_inputs, _report_state(self.report), len(self.blocks))

    def todo(self) -> list[int]:
        return list(range(self.first, len(self.blocks)))

    def round_to_nearest(self) -> None:
        cfg, report = self.cfg, self.report
        report.layer_error_kind = "weight"
        for i in tqdm(self.todo(), desc="astroquant rtn", unit="block"):
            packed = {} if self.checkpoints is not None else None
            targets = block_targets(self.names[i], self.blocks[i], self.should_convert)
            homes = offload.onload(targets)
            for lname, linear in targets.items():
                W = linear.weight.data
                res, layer = _rounded_layer(cfg, lname, linear, mse=cfg.mse)
                _place(self.model, lname, layer, homes, packed)
                report.layer_errors[lname] = float(((res.weight - W.float()) ** 2).sum() / (W.float() ** 2).sum())
            self.finish_block(i, packed, None, None)

    def start_streams(self, fp_wanted: bool, asymmetric: bool, store: torch.device):
        """The first block's inputs: (quantized stream, kwargs[block][batch], full-precision stream or None,
        its kwargs[block][batch]), from the finished blocks' checkpoint when resuming."""
        inputs, kwargs_list = capture_block_inputs(self.model, self.blocks, self.batches)
        fp_inputs, fp_kwargs = None, kwargs_list
        if fp_wanted:
            fp_batches = fp_stream_batches(self.batches, self.cfg.fp_samples if asymmetric else None)
            if fp_batches is self.batches:
                fp_inputs = [x.to(store, copy=True) for x in inputs]
            else:  # fewer windows: their own block inputs and kwargs (attention masks are per batch)
                fp_inputs, fp_kwargs = capture_block_inputs(self.model, self.blocks, fp_batches)
                fp_inputs = [x.to(store) for x in fp_inputs]
                logger.info("full-precision stream on %d of %d windows (fp_samples)",
                            sum(len(b) for b in fp_batches), sum(len(b) for b in self.batches))
        if self.todo() and self.first > 0:
            saved_q, saved_fp = self.checkpoints.stream(self.first)
            inputs = [x.to(self.device) for x in saved_q]
            if fp_inputs is not None:
                fp_inputs = [x.to(store) for x in saved_fp]
        return inputs, kwargs_list, fp_inputs, fp_kwargs

    def advance_fp_stream(self, block, fp_inputs, fp_kwargs, targets, asymmetric: bool, store: torch.device):
        """Run the full-precision block on its stream: (its outputs, every target's captured input per
        batch for the asymmetric solvers, else None)."""
        outs, captured = [], []
        with self.report.timing("fp_stream"):
            for x, kw in zip(fp_inputs, fp_kwargs):
                if asymmetric:
                    out, cap = _run_block_capturing(block, x.to(self.device), kw, targets, store)
                    captured.append(cap)
                else:
                    out = _run_block(block, x.to(self.device), kw)
                outs.append(out.to(store))
        self.report.fp_stream_bytes = max(self.report.fp_stream_bytes, _tensor_bytes(
            outs + fp_inputs + [t for cap in captured for t in cap.values()]))
        return outs, (captured if asymmetric else None)

    def place_solved(self, solver: "_LayerSolver", targets: dict, homes: dict) -> dict | None:
        """Put every solved layer where its Linear lived; return its tensors for a checkpoint."""
        packed = {} if self.checkpoints is not None else None
        for lname, linear in targets.items():
            if lname in solver.packed:
                layer = solver.packed.pop(lname)
                layer.set_backend("auto")  # calibration ran the reference path; inference picks
                _place(self.model, lname, layer, homes, packed)
            elif lname in homes:  # never reached: keep it in full precision, offloaded as before
                offload.restore(linear, homes[lname])
        return packed

    def calibrate(self, stream_fp: bool, on_block: Callable | None) -> None:
        cfg = self.cfg
        solver = _LayerSolver(cfg, self.report)
        devices = solve_devices(cfg, self.model)
        asymmetric = solver.options.needs_fp_stream
        # The full-precision stream X̃ lives on the CPU when the blocks run on an accelerator.
        store = torch.device("cpu") if self.device.type != "cpu" else self.device
        inputs, kwargs_list, fp_inputs, fp_kwargs = self.start_streams(stream_fp or asymmetric, asymmetric, store)
        for i in tqdm(self.todo(), desc=f"astroquant {cfg.method}", unit="block", initial=self.first,
                      total=len(self.blocks)):
            if self.pre is not None:
                with self.report.timing("preconditioning"):
                    self.pre.before_block(i, inputs, kwargs_list[i])
            if on_block is not None:
                on_block(i, fp_inputs, inputs)
            inputs, fp_inputs = self.calibrate_block(i, solver, devices, (inputs, kwargs_list[i]),
                                                     (fp_inputs, fp_kwargs[i]), asymmetric, store)
            # Hook closures and the tracebacks of early-stopped forwards form reference cycles that
            # hold a block's tensors; collect them now rather than at some later block.
            gc.collect()
            _trim_heap()

    def calibrate_block(self, i: int, solver: "_LayerSolver", devices, stream, fp_stream, asymmetric: bool,
                        store: torch.device):
        """Quantize block i from its quantized-stream inputs (`stream`: inputs, kwargs) and the
        full-precision stream's (`fp_stream`); return both streams' next inputs."""
        name, block, report = self.names[i], self.blocks[i], self.report
        targets = block_targets(name, block, self.should_convert)
        homes = {**onload_experts(block, name), **offload.onload(targets)}
        experts = BlockExperts(block, name)
        solver.experts = experts if experts.owners else None
        fp_inputs, fp_captured = fp_stream[0], None
        try:
            if fp_inputs is not None:
                experts.set_all_tokens(asymmetric)  # every expert's full-precision input on every token
                fp_inputs, fp_captured = self.advance_fp_stream(block, fp_inputs, fp_stream[1], targets, asymmetric,
                                                                store)
            experts.set_all_tokens(self.cfg.calibrate_all_experts)
            inputs, missed = _calibrate_block(targets, stream[0], stream[1], block, solver, self.cfg.true_sequential,
                                              fp_captured, name, devices)
        finally:
            report.expert_tokens.update(experts.finish())
        del fp_captured
        for lname in missed:
            if lname in experts:  # no token was routed to it: the stated fallback
                solver.round_to_nearest(lname, targets[lname], None)
                continue
            logger.warning("%s was never called during calibration; it stays in full precision", lname)
            report.skipped.append(lname)
        self.finish_block(i, self.place_solved(solver, targets, homes), inputs, fp_inputs)
        solver.experts = None
        return inputs, fp_inputs


class _Preconditioner:
    """transform="rotate" | "scale" | "adaptive" (preconditioning.py), driven from the block loop:
    the residual rotation before the first block's inputs are captured (checked on the model's
    logits), scales per block on the inputs the block sees (before its full-precision stream and
    its calibration; checked on the block's output)."""

    def __init__(self, model: nn.Module, cfg: AstroQuantConfig, blocks, names: list[str]):
        from . import preconditioning as pc

        self.pc, self.model, self.cfg, self.blocks, self.names = pc, model, cfg, blocks, names
        self.sites = pc.check_foldable(model, blocks, names, cfg.transform)
        self.record: dict[str, Any] = {"transform": cfg.transform, "blocks": {n: {} for n in names}}
        self.scale_sites: list[list[str]] = [[] for _ in names]

    def before_calibration(self) -> None:
        pc, cfg = self.pc, self.cfg
        if cfg.transform == "scale":
            self.scale_sites = [pc.scale_sites(bs) for bs in self.sites]
            return
        if cfg.transform == "rotate":
            self._rotate()
            for bs in self.sites:
                self.record["blocks"][bs.name] = pc.rotation_record(bs)
            return
        # adaptive: the residual rotation, then per site by the kurtosis z-score of the rotated weights
        before = self._rotate(value_output=[False] * len(self.names))
        kurt = [pc.site_kurtosis(bs) for bs in self.sites]
        choices = pc.adaptive_choices(kurt, cfg.kurtosis_threshold_attn, cfg.kurtosis_threshold_mlp)
        pc.rotate_value_outputs(self.model, self.sites, cfg.seed, [c.get("vo") == "rotate" for c in choices])
        pc.check_kept(before, pc.probe_logits(self.model), _weight_dtype(self.model),
                      "the residual and value/output rotations")
        for bs, c, k in zip(self.sites, choices, kurt):
            self.record["blocks"][bs.name] = dict(c)
            self.record.setdefault("kurtosis", {})[bs.name] = {site: round(v, 4) for site, v in k.items()}
        allowed = [set(pc.scale_sites(bs)) for bs in self.sites]
        self.scale_sites = [[site for site, choice in c.items() if choice == "scale" and site in ok]
                            for c, ok in zip(choices, allowed)]

    def _rotate(self, value_output: list[bool] | None = None) -> torch.Tensor:
        """The residual rotation, checked on the logits; returns the logits from before it (the reference)."""
        pc = self.pc
        before = pc.probe_logits(self.model)
        self.record.update(pc.rotate_residual(self.model, self.sites, self.cfg.seed, value_output))
        self.record["logit_deviation"] = pc.check_kept(before, pc.probe_logits(self.model),
                                                       _weight_dtype(self.model), "the residual rotation")
        return before

    def before_block(self, i: int, inputs: list[torch.Tensor], kwargs_list: list[dict]) -> None:
        sites = self.scale_sites[i]
        if not sites:
            return
        pc, block, bs = self.pc, self.blocks[i], self.sites[i]
        stats = pc.SiteStats(bs, sites)
        try:
            outs = [_run_block(block, x, kw) for x, kw in zip(inputs[:1], kwargs_list[:1])]
            for x, kw in zip(inputs[1:], kwargs_list[1:]):
                _run_block(block, x, kw)
        finally:
            stats.close()
        alphas = pc.scale_block(self.model, bs, stats.h, sites, self.cfg.bits, self.cfg.group_size, self.cfg.sym)
        if any(a > 0 for a in alphas.values()):
            pc.check_kept(outs[0], _run_block(block, inputs[0], kwargs_list[0]), _weight_dtype(self.model),
                          f"the scales of {bs.name}")
        rec = self.record["blocks"][bs.name]
        for site, a in alphas.items():
            rec[site] = "scale" if a > 0 else "none"
            rec.setdefault("scale_alpha", {})[site] = a


def _weight_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _embedding_sample(model: nn.Module) -> torch.Tensor | None:
    """A strided sample of the input embedding's weights (read through accelerate's hook when
    offloaded): enough to tell two checkpoints of one architecture apart."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or getattr(emb, "weight", None) is None:
        return None
    weight = emb.weight
    if weight.device.type == "meta":
        hook = offload.offload_hook(emb)
        if hook is None:
            return None
        weight = hook.weights_map["weight"]
    flat = weight.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4096)].float().cpu()


_REPORT_FIELDS = ("layer_errors", "layer_error_kind", "damping", "skipped", "asym_alpha", "fp_stream_bytes", "seconds", "phase_seconds")


def _report_state(report: QuantizationReport) -> dict:
    return {k: getattr(report, k) for k in _REPORT_FIELDS}


def _restore_report(report: QuantizationReport, state: dict) -> float:
    """Put a checkpointed report back; return the seconds the earlier runs took."""
    for k in _REPORT_FIELDS:
        if k in state:
            setattr(report, k, state[k])
    return float(state.get("seconds", 0.0))


def _load_block(model: nn.Module, name: str, block: nn.Module, should_convert, cfg: AstroQuantConfig,
                tensors: dict[str, torch.Tensor]) -> None:
    """Swap in the packed layers a checkpoint holds for one block."""
    targets = block_targets(name, block, should_convert)
    homes = {**onload_experts(block, name, load=False), **offload.onload(targets, load=False)}
    device = offload.execution_device(block)
    for lname, linear in targets.items():
        own = {k[len(lname) + 1:]: v for k, v in tensors.items() if k.startswith(lname + ".")}
        if "qweight" not in own and "qblocks" not in own:  # the run left this one in full precision
            if lname in homes:
                offload.restore(linear, homes[lname])
            continue
        bias = own.get("bias")
        layer = empty_layer(linear.in_features, linear.out_features, cfg, cfg.tensor_type_of(lname), bias is not None,
                            dtype=None if bias is None else bias.dtype, device=device)
        layer.load_state_dict({k: v.to(device) for k, v in own.items()})
        _place(model, lname, layer, homes)
