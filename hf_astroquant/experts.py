"""Mixture-of-experts layers as per-expert Linears.

transformers 5 stores a block's experts as 3-D parameters of one `*Experts` module (Qwen2/3-MoE,
Mixtral, DeepSeek-V3: gate_up_proj (E, 2I, H) and down_proj (E, H, I); gpt-oss transposed, gate and
up interleaved, with biases). Before calibration each such module becomes an `ExpertList`: one small
module per expert holding nn.Linear gate/up/down layers, with a forward that routes exactly as the
original (tested to equal it). Every solver, hook and packed layer then sees ordinary Linears; a hook
on an expert's Linear sees only the tokens routed to it, so its Hessian is built from them. The
state dict names the experts as checkpoints and serving engines do (``mlp.experts.{e}.gate_proj``).

What differs between families is stated once, in `LAYOUTS`; a module that is not listed but has the
standard 3-D ``gate_up_proj``/``down_proj`` parameters and an ``act_fn`` uses the standard layout.
Routers stay in full precision: `router_names`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertsLayout:
    """How one family stores its experts' weights."""

    transposed: bool = False  # stored (E, in, out), used as x @ W, instead of nn.Linear's (E, out, in)
    interleaved: bool = False  # gate and up alternate along the fused dimension instead of two halves
    bias: bool = False  # gate_up_proj_bias (E, 2I) and down_proj_bias (E, H)
    activation: str = "act_fn"  # "act_fn": act_fn(gate) * up; "clamped_swiglu": gpt-oss's
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # as checkpoints spell an expert's Linears


STANDARD = ExpertsLayout()
LAYOUTS: dict[str, ExpertsLayout] = {
    "Qwen2MoeExperts": STANDARD,
    "Qwen3MoeExperts": STANDARD,
    "DeepseekV3Experts": STANDARD,
    "MixtralExperts": ExpertsLayout(names=("w1", "w3", "w2")),  # Mixtral checkpoints' (and vLLM's) names
    "GptOssExperts": ExpertsLayout(transposed=True, interleaved=True, bias=True, activation="clamped_swiglu"),
}
# A module with one of these names beside an experts module routes tokens; it is never quantized.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def layout_of(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a fused experts module, or None when `module` is not one."""
    layout = LAYOUTS.get(type(module).__name__)
    if layout is not None:
        return layout
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn")):
        return STANDARD
    return None


class Expert(nn.Module):
    """One expert: y = down(act(gate(x)) * up(x)) with its family's activation."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, layout: ExpertsLayout, activation):
        super().__init__()
        self.names = layout.names
        for name, layer in zip(layout.names, (gate, up, down)):
            self.add_module(name, layer)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.activation(gate(x), up(x)))


class ExpertList(nn.ModuleList):
    """The experts of one MoE layer as `Expert` modules, called like the fused module it replaces:
    ``experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))``.

    While `calibrating` (set by `BlockExperts`) it records `routed_rows[e]` (the token rows routed to
    expert e in the last call) and adds to `token_counts`; with `all_tokens` every expert also runs on
    every token, so its statistics cover them all, while the output still mixes the routed experts only.
    With `every_expert` an expert no token is routed to still runs, on no rows (so that under
    torch.distributed every rank meets every expert's Linears in the same order). Outside calibration
    the forward records nothing."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        # (fused module, layout) when the fused weights are offloaded: their experts are on meta until
        # `onload_experts` reads them (a tuple, so the fused module is not registered as a child)
        self.source: tuple | None = None
        self.all_tokens = False
        self.every_expert = False
        self.calibrating = False
        self.routed_rows: dict[int, torch.Tensor] = {}
        self.token_counts = torch.zeros(len(experts), dtype=torch.long)

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, router_indices=None,
                routing_weights=None) -> torch.Tensor:
        index = top_k_index if top_k_index is not None else router_indices
        weights = top_k_weights if top_k_weights is not None else routing_weights
        out = torch.zeros_like(hidden_states)
        hits = torch.nn.functional.one_hot(index, num_classes=len(self) + 1).permute(2, 1, 0)  # (E+1, k, T)
        if self.calibrating:
            self.token_counts += hits[:len(self)].sum(dim=(1, 2)).cpu()
        for e, expert in enumerate(self):
            slot, rows = torch.where(hits[e])
            if rows.numel() == 0 and not (self.all_tokens or self.every_expert):
                continue
            if self.calibrating:
                self.routed_rows[e] = rows
            y = expert(hidden_states)[rows] if self.all_tokens else expert(hidden_states[rows])
            out.index_add_(0, rows, (y * weights[rows, slot, None]).to(out.dtype))
        return out


def _act_fn(act):
    return lambda gate, up: act(gate) * up


def _clamped_swiglu(alpha: float, limit: float):
    """gpt-oss: (clamp(up, ±limit) + 1) · g·σ(α·g) with g = min(gate, limit)."""
    def activation(gate, up):
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * alpha))
    return activation


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` (out, in) and `bias` (copied; on their device, meta included)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                       device=weight.device)
    if weight.device.type != "meta":
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
    return linear


def expert_weights(module: nn.Module, layout: ExpertsLayout) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Per expert, the (weight (out, in), bias or None) of its gate, up and down Linears: views into
    the fused `module`'s tensors, nothing copied."""
    gate_up, down = module.gate_up_proj, module.down_proj
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate_up_bias = module.gate_up_proj_bias if layout.bias else None
    down_bias = module.down_proj_bias if layout.bias else None
    inter = gate_up.shape[1] // 2
    if layout.interleaved:
        gate_rows, up_rows = slice(0, None, 2), slice(1, None, 2)
    else:
        gate_rows, up_rows = slice(0, inter), slice(inter, None)
    out = []
    for e in range(gate_up.shape[0]):
        b = (lambda rows: gate_up_bias[e, rows]) if gate_up_bias is not None else (lambda rows: None)
        out.append([(gate_up[e, gate_rows], b(gate_rows)), (gate_up[e, up_rows], b(up_rows)),
                    (down[e], down_bias[e] if down_bias is not None else None)])
    return out


def split_experts(module: nn.Module, layout: ExpertsLayout) -> ExpertList:
    """The `ExpertList` computing what the fused `module` computes (its weights copied per expert)."""
    if layout.activation == "clamped_swiglu":
        activation = _clamped_swiglu(float(module.alpha), float(module.limit))
    else:
        activation = _act_fn(module.act_fn)
    return ExpertList([Expert(*(_linear(w, b) for w, b in linears), layout, activation)
                       for linears in expert_weights(module, layout)])


def _fused(root: nn.Module) -> dict[str, tuple[nn.Module, ExpertsLayout]]:
    """{name under root: (fused experts module, its layout)}."""
    return {n: (m, layout) for n, m in root.named_modules() if (layout := layout_of(m)) is not None}


def _split(root: nn.Module, fused: dict[str, tuple[nn.Module, ExpertsLayout]]) -> None:
    from .offload import is_offloaded

    for name, (module, layout) in fused.items():
        experts = split_experts(module, layout)
        if is_offloaded(module):
            experts.source = (module, layout)
        root.set_submodule(name, experts)


@torch.no_grad()
def onload_experts(block: nn.Module, block_name: str, load: bool = True) -> dict:
    """For every `ExpertList` of the block whose fused weights accelerate offloaded: read them once
    onto the execution device (unless `load` is False: a resumed block replaces them unread) and
    fill each expert's Linears, forget the fused tensors in the offload store, and return where
    each expert Linear's packed tensors go ({full name: offload.OffloadedLinear}, beside the fused
    ones under the expert's own keys, ``…experts.3.gate_proj.qweight``)."""
    from accelerate.utils import set_module_tensor_to_device

    from . import offload

    homes = {}
    for name, experts in expert_lists(block, block_name).items():
        if experts.source is None:
            continue
        module, layout = experts.source
        hook = offload.offload_hook(module)
        params = [n for n, _ in module.named_parameters(recurse=False)]
        fused_home = offload.OffloadedLinear(hook, name, key=params[0])
        if load:  # every expert's Linears become views of the fused tensors, read once: no second copy
            for n in params:
                set_module_tensor_to_device(module, n, hook.execution_device, value=hook.weights_map[n])
            for expert, linears in zip(experts, expert_weights(module, layout)):
                for lname, (weight, bias) in zip(expert.names, linears):
                    linear = getattr(expert, lname)
                    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
                    if bias is not None:
                        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
            for n in params:
                set_module_tensor_to_device(module, n, "meta")
        fused_home.drop(params)
        for e, expert in enumerate(experts):
            for lname in expert.names:
                homes[f"{name}.{e}.{lname}"] = fused_home.beside(f"{name}.{e}.{lname}", f"{e}.{lname}.")
        experts.source = None
    return homes


def split_all(root: nn.Module, prefix: str, should_convert) -> list[str]:
    """Replace every fused experts module under `root` (named `prefix`) that `should_convert(full
    name)` accepts by its `ExpertList`, in place; returns the full names replaced."""
    fused = {n: f for n, f in _fused(root).items() if should_convert(f"{prefix}.{n}")}
    _split(root, fused)
    return [f"{prefix}.{n}" for n in fused]


def expert_lists(root: nn.Module, prefix: str = "") -> dict[str, ExpertList]:
    """{full name: ExpertList} under `root`."""
    return {f"{prefix}.{n}" if prefix else n: m for n, m in root.named_modules() if isinstance(m, ExpertList)}


def router_names(root: nn.Module, prefix: str = "") -> list[str]:
    """Full names of the routers under `root`: modules named in ROUTER_NAMES whose parent also holds
    an experts module (fused or split)."""
    found = []
    for name, module in root.named_modules():
        children = dict(module.named_children())
        if not any(isinstance(c, ExpertList) or layout_of(c) is not None for c in children.values()):
            continue
        for child in ROUTER_NAMES:
            if child in children:
                rel = f"{name}.{child}" if name else child
                found.append(f"{prefix}.{rel}" if prefix else rel)
    return found


def expert_linears(lists: dict[str, ExpertList]) -> dict[str, tuple[ExpertList, int]]:
    """{full Linear name: (its ExpertList, expert index)} for every Linear of every expert in `lists`."""
    found = {}
    for lname, experts in lists.items():
        for e, expert in enumerate(experts):
            for name in expert.names:
                found[f"{lname}.{e}.{name}"] = (experts, e)
    return found


class BlockExperts:
    """The experts of one block during its calibration: which Linears are experts, the routing that
    gives each its tokens, and the counts the report lists."""

    def __init__(self, block: nn.Module, block_name: str, every_expert: bool = False):
        """`every_expert`: run every expert in every pass, on no rows when none is routed to it."""
        self.lists = expert_lists(block, block_name)
        self.owners = expert_linears(self.lists)
        for experts in self.lists.values():
            experts.calibrating = True
            experts.every_expert = every_expert

    def __contains__(self, name: str) -> bool:
        return name in self.owners

    def set_all_tokens(self, value: bool) -> None:
        for experts in self.lists.values():
            experts.all_tokens = value

    def start_counting(self) -> None:
        for experts in self.lists.values():
            experts.token_counts.zero_()

    def finish(self) -> dict[str, list[int]]:
        """End the block's calibration (the experts record nothing more); return {experts name: tokens
        routed to each expert} over the passes since `start_counting`."""
        for experts in self.lists.values():
            experts.calibrating = experts.all_tokens = experts.every_expert = False
            experts.routed_rows.clear()
        return {name: experts.token_counts.tolist() for name, experts in self.lists.items()}

    def routed_pairs(self, name: str, x: torch.Tensor, x_fp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, x_fp) row for row, for an expert's Linear whose quantized-stream input `x` holds only the
        tokens routed to it while the full-precision forward (run with every expert on every token)
        gave `x_fp` for all tokens (of its first windows only, with fp_samples). Rows of `x` that have
        a full-precision counterpart come first, as the statistics expect."""
        if name not in self.owners or self.owners[name][0].all_tokens:
            return x, x_fp
        experts, e = self.owners[name]
        rows = experts.routed_rows[e]
        x_fp = x_fp.reshape(-1, x_fp.shape[-1])
        keep = rows < x_fp.shape[0]
        x = x.reshape(-1, x.shape[-1])
        return torch.cat([x[keep], x[~keep]]), x_fp[rows[keep].to(x_fp.device)]


def split_named(model: nn.Module, quantized: list[str]) -> list[str]:
    """Split every fused experts module of `model` that holds one of the `quantized` module names
    (a saved checkpoint's, e.g. "model.layers.0.mlp.experts.3.gate_proj"), so those names exist;
    works on the meta model transformers builds before loading. Returns the names split."""
    fused = {n: f for n, f in _fused(model).items() if any(q.startswith(n + ".") for q in quantized)}
    _split(model, fused)
    return sorted(fused)
