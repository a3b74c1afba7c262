"""The calibration stream: the first block's inputs and every block's keyword arguments, running a
block (whole, or stopped early from a hook), and the full-precision stream's windows."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from . import offload
from .blocks import path_in_block, set_submodule, text_config
from .online_rotation import input_rotation_of

logger = logging.getLogger("hf_astroquant")

# Activation memory per forward pass when the user does not fix calibration_batch_size.
_CPU_BATCH_BUDGET = 4 * 2**30


class StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


def auto_batch_size(model: nn.Module, seqlen: int, device: torch.device) -> int:
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


@contextmanager
def pre_hooks(modules, hook, with_kwargs: bool = False):
    """Forward pre-hooks on `modules` for the duration of a `with` block."""
    handles = [m.register_forward_pre_hook(hook, with_kwargs=with_kwargs) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block_capturing(block: nn.Module, x: torch.Tensor, kwargs: dict, targets: dict[str, nn.Linear],
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

    with pre_hooks(targets.values(), grab):
        out = run_block(block, x, kwargs)
    return out, captured


def tensor_bytes(tensors) -> int:
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
                raise StopForward
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
            except StopForward:
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


# Bytes of full-precision Linear inputs one block may capture at once (asymmetric solvers). Up to it,
# one forward captures them all (cheapest); past it they are made stage by stage, holding one stage's
# input of one batch at a time, at the price of a partial forward per stage and batch.
FP_CAPTURE_BUDGET = 4 * 2**30


class FullPrecisionStream:
    """How the full-precision stream X̃ advances through the blocks, and where it is kept: the one owner of
    the capture policy. A block's full-precision outputs are kept on `store`; for the asymmetric solvers
    its targets' full-precision inputs are captured in the same forward while they fit `capture_budget`
    (FP_CAPTURE_BUDGET unless given); once the next batch would pass it, for that block and the later
    ones, each stage's input is made when its statistics ask (`StagewiseFpInputs`)."""

    def __init__(self, store: torch.device, device: torch.device, timing, capture_budget: int | None = None):
        self.store, self.device, self.timing = store, device, timing
        self.budget = FP_CAPTURE_BUDGET if capture_budget is None else capture_budget
        self.stagewise = False  # the inputs outgrew the budget: made stage by stage from then on

    def advance(self, block: nn.Module, block_name: str, fp_inputs: list[torch.Tensor], fp_kwargs: list[dict],
                targets: dict[str, nn.Linear], asymmetric: bool, stagewise_ok: bool = False):
        """Run the full-precision block on its stream: (its outputs, where the targets' full-precision
        inputs come from for the asymmetric solvers (else None), the bytes held when the capture stopped
        (0 if it did not)). Unless `stagewise_ok`, the inputs are always captured: experts are reached
        by routing, which differs between the streams."""
        capture = asymmetric and not (stagewise_ok and self.stagewise)
        budget, held, switch_bytes = self.budget, 0, 0
        outs, captured = [], []
        with self.timing("fp_stream"):
            for x, kw in zip(fp_inputs, fp_kwargs):
                # the next batch is about the size of the last: stop capturing before it passes the budget
                if capture and stagewise_ok and (budget <= 0 or captured and held + held // len(captured) > budget):
                    logger.info("the full-precision inputs of %s would pass %d bytes: from here on they are made "
                                "stage by stage", block_name, budget)
                    switch_bytes = tensor_bytes(outs + fp_inputs) + held
                    self.stagewise, capture, captured = True, False, []
                if capture:
                    out, cap = run_block_capturing(block, x.to(self.device), kw, targets, self.store)
                    captured.append(cap)
                    held += tensor_bytes(cap.values())  # (batches share no tensor)
                else:
                    out = run_block(block, x.to(self.device), kw)
                outs.append(out.to(self.store))
        if not asymmetric:
            source = None
        elif capture:
            source = CapturedFpInputs(captured)
        else:
            source = StagewiseFpInputs(block, block_name, targets, fp_inputs, fp_kwargs, self.device)
        return outs, source, switch_bytes


class CapturedFpInputs:
    """Every target's full-precision input of every batch, captured in one forward of the full-precision
    block (`run_block_capturing`): what a block whose experts route differently in the two streams needs."""

    def __init__(self, captured: list[dict[str, torch.Tensor]]):
        self.captured = captured
        self.peak_bytes = tensor_bytes(t for cap in captured for t in cap.values())

    def __len__(self) -> int:
        return len(self.captured)

    def take(self, name: str, bi: int) -> torch.Tensor | None:
        return self.captured[bi].get(name)


class _FullPrecisionLinear(nn.Module):
    """A target's full-precision weight and bias, computed as nn.Linear computes them, behind the
    online input rotation the target was given (online_rotation.py), if any: the weight is W·R."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rotation: nn.Module | None):
        super().__init__()
        self.w, self.b, self.rotation = weight, bias, rotation

    def input_of(self, x: torch.Tensor) -> torch.Tensor:
        """What the weight reads: x, or x·R under an online rotation (what the statistics see)."""
        return x if self.rotation is None else self.rotation(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.input_of(x), self.w, self.b)


class StagewiseFpInputs:
    """The full-precision input of one stage on one batch at a time, made when the stage's statistics
    ask for it: a forward of the full-precision block on that batch, stopped at the stage's first
    Linear. So the stream holds the block's inputs and outputs and one stage's input of one batch,
    not every Linear's input of every window (6.5× the hidden state for a Llama block).

    The full-precision block is the block itself with the targets' original weights put back for the
    forward (the solver gives a solved Linear a new weight tensor and leaves the original one as it
    was); it computes exactly what the forward that captured every input computed, so the statistics
    are the same to the bit. It costs one partial full-precision forward per stage and batch."""

    def __init__(self, block: nn.Module, block_name: str, targets: dict[str, nn.Linear],
                 fp_inputs: list[torch.Tensor], fp_kwargs: list[dict], device: torch.device):
        self.block, self.prefix, self.inputs, self.kwargs, self.device = block, block_name, fp_inputs, fp_kwargs, device
        self.originals = {name: _FullPrecisionLinear(lin.weight.data, lin.bias, input_rotation_of(lin))
                          for name, lin in targets.items()}
        self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, name: str, bi: int) -> torch.Tensor | None:
        """The input the full-precision block gives `name` on batch `bi` (None: not reached)."""
        got: dict[str, torch.Tensor] = {}

        def grab(module, args):
            got["x"] = module.input_of(args[0]).detach()
            raise StopForward

        placed = {n: self.block.get_submodule(path_in_block(self.prefix, n)) for n in self.originals}
        handle = self.originals[name].register_forward_pre_hook(grab)
        try:
            for n, original in self.originals.items():
                set_submodule(self.block, path_in_block(self.prefix, n), original)
            run_block(self.block, self.inputs[bi].to(self.device), self.kwargs[bi])
        except StopForward:
            pass
        finally:
            handle.remove()
            for n, module in placed.items():
                set_submodule(self.block, path_in_block(self.prefix, n), module)
        x = got.get("x")
        if x is not None:
            self.peak_bytes = max(self.peak_bytes, tensor_bytes([x]))
        return x
