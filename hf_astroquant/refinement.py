"""Block-output refinement (`refine_steps`): after a block's Linears are solved, their grid steps are
tuned so that the block's output on the quantized stream's inputs comes closer to its target, the
full-precision model's output at this block (the full-precision stream's, when the solvers carry
one; else the full-precision block's on the same inputs). Adam on each step's log factor
(`algorithms/scale_tuning.py`), a few windows per step; with `refine_rounding_lr` > 0 also on each
weight's rounding offset, so a code may move one level from the solved one. Zero points stay as
solved and the codes stay on the same grid, so the packed format does not change. The tuned grid is
kept only when it lowers the loss over all windows with a target, measured as stored (fp16 steps);
otherwise the solved one stays.

Under torch.distributed each step's piece is the same `per_step` windows as one process would take
(chunks of the windows with a target, in the order of all windows): each rank runs the part of the
piece it holds, the gradients are summed over ranks (`distributed.Ranks.sum`, the same bits on every
rank), and every rank takes the same Adam step. The losses that decide whether the tuned grid is kept
are over every rank's windows. So the number of ranks changes only the order of floating-point sums."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .algorithms.grid import FP16_TINY
from .algorithms.scale_tuning import TunedScales, output_loss
from .blocks import path_in_block, set_submodule
from .distributed import Ranks
from .modules import QuantLinear
from .modules.packing import pack_rows
from .stream import run_block

logger = logging.getLogger("hf_astroquant")


def window_slices(batches: list[torch.Tensor], targets: list[torch.Tensor], per_step: int) -> list[tuple[int, slice]]:
    """(batch, windows) pieces of at most `per_step` windows, over the windows that have a target
    (target batch b holds the first windows of batch b)."""
    pieces = []
    for b, target in enumerate(targets[:len(batches)]):
        n = min(len(target), len(batches[b]))
        pieces += [(b, slice(i, min(i + per_step, n))) for i in range(0, n, per_step)]
    return pieces


def slice_kwargs(value, windows: slice | torch.Tensor, batch: int):
    """The block's keyword arguments for some windows of a batch of `batch` windows: tensors with one
    row per window are sliced, shared ones (rotary tables, a mask of batch 1) kept."""
    if isinstance(value, torch.Tensor):
        return value[windows] if batch > 1 and value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: slice_kwargs(v, windows, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(slice_kwargs(v, windows, batch) for v in value)
    return value


def mean_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor], ranks: Ranks | None = None) -> float:
    """The output loss over every window with a target (of every rank), each window weighing the same."""
    total, n = 0.0, 0
    for out, target in zip(outputs, targets):
        k = len(target)
        total += float(output_loss(out[:k].to(target.device), target)) * k
        n += k
    if ranks is not None:
        total, n = ranks.sum_numbers([total, n])
    return total / max(n, 1)


def refine_block(block: nn.Module, block_name: str, packed: dict[str, nn.Module], inputs: list[torch.Tensor],
                 kwargs_list: list[dict], targets: list[torch.Tensor], outputs: list[torch.Tensor], steps: int,
                 lr: float, per_step: int, seed: int = 0, rounding_lr: float = 0.0,
                 rounding_errors: dict[str, torch.Tensor] | None = None,
                 ranks: Ranks | None = None,
                 window_ids: list[list[int]] | None = None) -> tuple[list[torch.Tensor], float, float]:
    """Tune the steps of the block's packed layers (`packed`: name -> layer, already in the block),
    and with `rounding_lr` > 0 the codes of those in `rounding_errors` (name -> (out, in), how far
    each code's value was from it when rounded) by at most one level each; return (the block's
    outputs per batch, the loss before, the loss after). `outputs` are the block's outputs before
    tuning, returned unchanged when tuning does not lower the loss. With several `ranks`, the windows
    are this rank's share (`window_ids`: each batch row's index among all ranks' windows) and the
    pieces, gradients and losses are over all ranks'."""
    ranks = ranks or Ranks()
    layers = {n: m for n, m in packed.items() if isinstance(m, QuantLinear)}
    before = mean_loss(outputs, targets, ranks)
    if not layers or steps <= 0:
        return outputs, before, before
    errors = (rounding_errors or {}) if rounding_lr > 0 else {}
    tuned = {n: TunedScales(*m.unpack(), m.scales, m.g_idx, m.bias, maxq=2**m.bits - 1,
                            rounding_error=errors[n].t() if n in errors else None,
                            group_size=m.group_size if m._groups_are_contiguous() else None,
                            input_rotation=m.input_rotation)
             for n, m in layers.items()}
    plan = shared_pieces(inputs, targets, per_step, window_ids, ranks) if ranks.active else None
    _train(block, block_name, tuned, inputs, kwargs_list, targets, steps, (lr, rounding_lr), per_step, seed, ranks,
           plan)
    solved = {n: (m.scales.clone(), m.unpack()[0] if n in errors else None) for n, m in layers.items()}
    _store(layers, {n: (t.tuned_steps().detach(), t.tuned_codes().detach() if t.offset is not None else None)
                    for n, t in tuned.items()})
    with torch.no_grad():
        new_outputs = [run_block(block, x, kw) for x, kw in zip(inputs, kwargs_list)]
    after = mean_loss(new_outputs, targets, ranks)
    if after >= before:  # the solved grid was better on the whole set: keep it
        _store(layers, solved)
        logger.info("%s: tuning did not lower the output loss (%.4g -> %.4g); the solved grid is kept",
                    block_name, before, after)
        return outputs, before, after
    logger.debug("%s: output loss %.4g -> %.4g", block_name, before, after)
    return new_outputs, before, after


def _store(layers: dict[str, QuantLinear], grids: dict) -> None:
    """Write each layer's (scales, codes (in, out) or None to keep its codes) into it."""
    for n, m in layers.items():
        scales, codes = grids[n]
        m._drop_fast()  # (the reference path runs during calibration: a safeguard)
        # a scale tuned below the smallest positive fp16 would round to 0, which loading refuses
        m.scales.copy_(scales.clamp(min=FP16_TINY).to(m.scales.dtype))
        if codes is not None:
            m.qweight.copy_(pack_rows(codes.round().to(torch.int32) if codes.is_floating_point() else codes, m.bits))


def shared_pieces(inputs: list[torch.Tensor], targets: list[torch.Tensor], per_step: int,
                  window_ids: list[list[int]] | None, ranks: Ranks) -> list[tuple[list[tuple[int, list[int]]], int]]:
    """Under torch.distributed: the pieces of `per_step` windows (with a target) that every rank steps
    through, chunks of all ranks' windows in their order; each as (this rank's part: [(batch, rows)],
    the piece's tokens over every rank)."""
    if window_ids is None:
        raise ValueError("refinement over several ranks needs each window's index (window_ids)")
    mine: dict[int, tuple[int, int]] = {}
    for b, target in enumerate(targets[:len(inputs)]):
        for row in range(min(len(target), len(inputs[b]))):
            mine[window_ids[b][row]] = (b, row)
    every = sorted(w for part in ranks.gather([(i, inputs[b].shape[1]) for i, (b, _) in mine.items()]) for w in part)
    pieces = []
    for start in range(0, len(every), per_step):
        chunk = every[start:start + per_step]
        parts: dict[int, list[int]] = {}
        for i, _ in chunk:
            if i in mine:
                parts.setdefault(mine[i][0], []).append(mine[i][1])
        pieces.append((sorted(parts.items()), sum(tokens for _, tokens in chunk)))
    return pieces


def _train(block, block_name, tuned, inputs, kwargs_list, targets, steps, lrs, per_step, seed, ranks: Ranks,
           plan=None) -> None:
    """`steps` Adam steps on the log factors (learning rate lrs[0]) and the rounding offsets (lrs[1]),
    each on one piece of `per_step` windows, the pieces in a seeded random order (a new order each pass);
    with several `ranks`, the pieces of `plan` (`shared_pieces`), each rank's gradients of its part summed."""
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:  # only the log factors learn
        p.requires_grad_(False)
    originals = {}
    for name, module in tuned.items():
        path = path_in_block(block_name, name)
        originals[path] = block.get_submodule(path)
        set_submodule(block, path, module)
    try:
        pieces = plan if plan is not None else window_slices(inputs, targets, per_step)
        gen = torch.Generator().manual_seed(seed)
        groups = [{"params": [m.log_factor for m in tuned.values()], "lr": lrs[0]}]
        offsets = [m.offset for m in tuned.values() if m.offset is not None]
        if offsets:
            groups.append({"params": offsets, "lr": lrs[1]})
        # the fused implementation: one kernel for all parameters (about 10× faster per step on CPU)
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        opt = torch.optim.Adam(groups, fused=fused or None)
        order: list[int] = []
        with torch.enable_grad():
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(pieces), generator=gen).tolist()
                opt.zero_grad(set_to_none=True)
                if plan is None:
                    b, windows = pieces[order.pop()]
                    kw = slice_kwargs(kwargs_list[b], windows, len(inputs[b]))
                    out = run_block(block, inputs[b][windows], kw)
                    output_loss(out, targets[b][windows].to(out.device)).backward()
                else:
                    parts, tokens = pieces[order.pop()]
                    for b, rows in parts:  # this rank's windows of the piece: its share of the piece's mean
                        index = torch.tensor(rows)
                        out = run_block(block, inputs[b][index], slice_kwargs(kwargs_list[b], index, len(inputs[b])))
                        diff = out.float() - targets[b][index].to(out.device).float()
                        (diff.pow(2).sum() / (tokens * out.shape[-1])).backward()
                    _sum_gradients([p for g in groups for p in g["params"]], ranks)
                opt.step()
                for m in tuned.values():
                    m.keep_offsets_in_range()
    finally:
        for path, module in originals.items():
            set_submodule(block, path, module)
        for p in frozen:
            p.requires_grad_(True)


def _sum_gradients(params: list[torch.Tensor], ranks: Ranks) -> None:
    """Each gradient becomes its sum over ranks (one sum of one flat buffer); a parameter that got no
    gradient on this rank adds zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    ranks.sum([flat])
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
