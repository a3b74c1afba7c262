"""Where each decoder family keeps what the transforms fold through: one declarative table.

A transform (folding.py) rotates or scales the residual stream and the attention values.
For that it needs, per block:

    norm sites   each norm that reads the residual stream (or the stream itself, where a block has
                 no pre-norm), with the weight matrices that read its output (routers and every
                 expert of a mixture-of-experts layer included)
    writers      the weight matrices whose output is added to the residual stream
    value / out  the matrix producing the attention values (and where each key/value head's rows
                 sit in it) and the output projection reading them
    up / down    the matrix whose rows multiply elementwise before the down projection (gated MLPs)
    post norms   norms between a writer and the residual add: no rotation folds through them

and per model the embeddings that write the stream (tokens, learned positions), the final norm
and lm_head. `LAYOUTS` states what differs by family (keyed by the text config's model_type);
any other family gets `DEFAULT`, Llama's names with every mixture-of-experts name, where a path a
block lacks is skipped. What the table cannot state (the norm's formula) is measured: `norm_kind`.
A fold that a wrong entry would make inexact is caught at run time (preconditioning checks the
logits), so a new family is one entry here plus one row in tests/families.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from .experts import ROUTER_NAMES, ExpertList

STREAM = ""  # a norm path meaning "no norm: the readers read the residual stream itself"
SAME_AS_ATTENTION = "="  # the MLP reads the attention's norm (a parallel block with one norm)

MOE_READERS = ("mlp.gate", "mlp.router", "mlp.experts", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
               "mlp.shared_expert_gate", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
MOE_WRITERS = ("mlp.experts", "mlp.shared_expert.down_proj", "mlp.shared_experts.down_proj")


@dataclass(frozen=True)
class FamilyLayout:
    """One family's names (paths inside a block; the first that exists of each candidate tuple)."""

    attn_norm: tuple[str, ...] = ("input_layernorm",)
    mlp_norm: tuple[str, ...] = ("post_attention_layernorm", SAME_AS_ATTENTION)
    attn_readers: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp_readers: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj") + MOE_READERS
    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj") + MOE_WRITERS
    value: str | None = "self_attn.v_proj"
    value_rows: str = "separate"  # separate | qkv ([q; k; v]) | per_head_qkv ([q_h; k_h; v_h]) | falcon
    out: str = "self_attn.o_proj"
    up: str | None = "mlp.up_proj"
    up_rows: str = "all"  # all | second_half (a fused gate_up, gate first)
    down: str = "mlp.down_proj"
    post_norms: tuple[str, ...] = ()
    refuse: Callable | None = None  # config -> the reason this configuration cannot fold, or None


DEFAULT = FamilyLayout()
_SANDWICH = dict(mlp_norm=("pre_feedforward_layernorm",),
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
_NEOX_MLP = dict(mlp_readers=("mlp.dense_h_to_4h",), up=None)


def _opt_refusal(config) -> str | None:
    if not getattr(config, "do_layer_norm_before", True):
        return "its layer norms come after the residual add (do_layer_norm_before=False)"
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        return "its embeddings are projected into the residual stream (word_embed_proj_dim != hidden_size)"
    return None


LAYOUTS: dict[str, FamilyLayout] = {
    "gemma2": replace(DEFAULT, **_SANDWICH),
    "gemma3_text": replace(DEFAULT, **_SANDWICH),
    "olmo2": replace(DEFAULT, attn_norm=(STREAM,), mlp_norm=(STREAM,),
                     post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    "glm4": replace(DEFAULT, mlp_readers=("mlp.gate_up_proj",), up="mlp.gate_up_proj", up_rows="second_half",
                    post_norms=("post_self_attn_layernorm", "post_mlp_layernorm")),
    "phi3": replace(DEFAULT, attn_readers=("self_attn.qkv_proj",), value="self_attn.qkv_proj", value_rows="qkv",
                    mlp_readers=("mlp.gate_up_proj",), up="mlp.gate_up_proj", up_rows="second_half"),
    "phi": replace(DEFAULT, mlp_norm=(SAME_AS_ATTENTION,), mlp_readers=("mlp.fc1",),
                   writers=("self_attn.dense", "mlp.fc2"), out="self_attn.dense", up=None),
    "deepseek_v3": replace(DEFAULT, attn_readers=("self_attn.q_a_proj", "self_attn.q_proj",
                                                  "self_attn.kv_a_proj_with_mqa"), value=None),
    "gpt_neox": replace(DEFAULT, attn_readers=("attention.query_key_value",), value="attention.query_key_value",
                        value_rows="per_head_qkv", out="attention.dense",
                        writers=("attention.dense", "mlp.dense_4h_to_h"), **_NEOX_MLP),
    "falcon": replace(DEFAULT, attn_norm=("ln_attn", "input_layernorm"),
                      mlp_norm=("ln_mlp", "post_attention_layernorm", SAME_AS_ATTENTION),
                      attn_readers=("self_attention.query_key_value",), value="self_attention.query_key_value",
                      value_rows="falcon", out="self_attention.dense",
                      writers=("self_attention.dense", "mlp.dense_4h_to_h"), **_NEOX_MLP),
    "gpt2": replace(DEFAULT, attn_norm=("ln_1",), mlp_norm=("ln_2",), attn_readers=("attn.c_attn",),
                    value="attn.c_attn", value_rows="qkv", out="attn.c_proj", mlp_readers=("mlp.c_fc",),
                    writers=("attn.c_proj", "mlp.c_proj"), up=None),
    "opt": replace(DEFAULT, attn_norm=("self_attn_layer_norm",), mlp_norm=("final_layer_norm",),
                   out="self_attn.out_proj", mlp_readers=("fc1",), writers=("self_attn.out_proj", "fc2"), up=None,
                   refuse=_opt_refusal),
}
# Beside the blocks, relative to the module that holds them (LlamaModel, GPT2Model, OPTDecoder, ...).
FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f")
POSITION_EMBEDDINGS = ("wpe", "embed_positions")


def layout_for(config) -> FamilyLayout:
    return LAYOUTS.get(getattr(config, "model_type", None), DEFAULT)


def heads(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) as the attention splits them."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
    if getattr(config, "model_type", None) == "falcon" and not config.new_decoder_architecture:
        n_kv = 1 if config.multi_query else n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv or n_heads, head_dim


def value_rows(kind: str, config) -> torch.Tensor:
    """The rows of the value-producing matrix that hold each key/value head: (n_kv, head_dim)."""
    n_heads, n_kv, hd = heads(config)
    per = torch.arange(hd)
    if kind == "falcon":
        kind = "grouped" if config.new_decoder_architecture else ("qkv" if config.multi_query else "per_head_qkv")
    if kind == "separate":
        return torch.arange(n_kv * hd).view(n_kv, hd)
    if kind == "qkv":  # [q (n_heads·hd); k (n_kv·hd); v (n_kv·hd)]
        return (n_heads + n_kv) * hd + torch.arange(n_kv * hd).view(n_kv, hd)
    if kind == "per_head_qkv":  # head h: [q_h; k_h; v_h]
        return torch.stack([h * 3 * hd + 2 * hd + per for h in range(n_kv)])
    if kind == "grouped":  # kv group g: [its query heads; k_g; v_g] (Falcon's new decoder architecture)
        width = (n_heads // n_kv + 2) * hd
        return torch.stack([g * width + (n_heads // n_kv + 1) * hd + per for g in range(n_kv)])
    raise ValueError(f"unknown value row layout {kind!r}")


@torch.no_grad()
def norm_kind(norm: nn.Module) -> str | None:
    """What `norm` computes, measured on a random input: 'rms' (γ·x/rms(x)), 'rms_offset' ((1 + γ)·x/rms(x),
    Gemma's), 'layer' (γ·(x − μ)/σ + β, either optional), or None (something else)."""
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    width = w.shape[0] if w is not None else getattr(norm, "normalized_shape", (None,))[0]
    if width is None or (w is not None and w.device.type == "meta"):
        return None
    device = w.device if w is not None else torch.device("cpu")
    dtype = w.dtype if w is not None else torch.float32
    # the input as the norm sees it (rounded to its dtype), so only the norm's own rounding differs
    x = (torch.randn(4, width, generator=torch.Generator().manual_seed(0)) * 2 + 0.7).to(device, dtype).float()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5))
    g = w.float() if w is not None else torch.ones(width, device=device)
    beta = b.float() if b is not None else torch.zeros(width, device=device)
    c = x - x.mean(-1, keepdim=True)
    candidates = {"rms": g * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps),
                  "rms_offset": (1 + g) * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps),
                  "layer": g * c * torch.rsqrt(c.square().mean(-1, keepdim=True) + eps) + beta}
    if b is not None:
        candidates = {"layer": candidates["layer"]}
    got = norm(x.to(dtype)).float()
    rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2  # bf16/fp16 round the output too
    for kind, want in candidates.items():
        if torch.allclose(got, want, rtol=rtol, atol=rtol * 0.1 * float(want.abs().max()) + 1e-6):
            return kind
    return None


@dataclass
class NormSite:
    """One norm reading the residual stream (or the stream itself) and the matrices reading it."""

    name: str  # "qkv", "gate_up", or "qkv_gate_up" where one norm feeds attention and MLP
    path: str  # inside the block; STREAM when there is no norm
    norm: nn.Module | None
    readers: list[nn.Module]  # every module reading it: routers included
    quantized: list[nn.Module]  # the readers that are quantized (nn.Linear, not a router)


@dataclass
class BlockSites:
    """What one block's transforms fold through (`resolve`)."""

    name: str
    norm_sites: list[NormSite]
    writers: list[nn.Module]
    value: tuple[nn.Module, torch.Tensor] | None  # (the matrix producing v, its rows per kv head)
    out: nn.Module | None
    up_down: tuple[nn.Module, torch.Tensor, nn.Module] | None  # (up, its rows, down)
    post_norms: list[str] = field(default_factory=list)

    def consumers(self) -> dict[str, list[nn.Module]]:
        """Each scale site's quantized consumers (the matrices whose input it scales)."""
        sites = {s.name: s.quantized for s in self.norm_sites if s.quantized}
        if self.value is not None:
            sites["vo"] = [self.out]
        if self.up_down is not None:
            sites["down"] = [self.up_down[2]]
        return sites


def _get(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _readers(block: nn.Module, paths: tuple[str, ...]) -> tuple[list[nn.Module], list[nn.Module]]:
    """(every reader, the quantized ones) among `paths`; an ExpertList stands for its experts' gate and up."""
    every, quantized = [], []
    for path in paths:
        mod = _get(block, path)
        if isinstance(mod, ExpertList):
            found = [getattr(e, n) for e in mod for n in e.names[:2]]
            every += found
            quantized += found
        elif mod is not None and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
            every.append(mod)
            if isinstance(mod, nn.Linear) and path.rpartition(".")[2] not in ROUTER_NAMES:
                quantized.append(mod)
    return every, quantized


def _writers(block: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
    found = []
    for path in paths:
        mod = _get(block, path)
        if isinstance(mod, ExpertList):
            found += [getattr(e, e.names[2]) for e in mod]
        elif isinstance(mod, nn.Linear):
            found.append(mod)
    return found


def _first_norm(block: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for path in candidates:
        if path in (STREAM, SAME_AS_ATTENTION) or _get(block, path) is not None:
            return path
    return None


def _norm_sites(block: nn.Module, layout: FamilyLayout) -> list[NormSite] | str:
    """The block's norm sites, or the reason they cannot be found."""
    attn, mlp = _first_norm(block, layout.attn_norm), _first_norm(block, layout.mlp_norm)
    if attn is None or mlp is None:
        missing = layout.attn_norm if attn is None else layout.mlp_norm
        return f"no {' or '.join(missing)}"
    attn_readers, mlp_readers = _readers(block, layout.attn_readers), _readers(block, layout.mlp_readers)
    if not attn_readers[0] or not mlp_readers[0]:
        paths = layout.attn_readers if not attn_readers[0] else layout.mlp_readers
        return f"no {' / '.join(paths)} reading the residual stream"
    if mlp == SAME_AS_ATTENTION:
        both = (attn_readers[0] + mlp_readers[0], attn_readers[1] + mlp_readers[1])
        return [NormSite("qkv_gate_up", attn, _get(block, attn) if attn else None, *both)]
    return [NormSite("qkv", attn, _get(block, attn) if attn else None, *attn_readers),
            NormSite("gate_up", mlp, _get(block, mlp) if mlp else None, *mlp_readers)]


def resolve(block: nn.Module, name: str, config) -> BlockSites | str:
    """The block's `BlockSites` under its family's layout, or the reason the transforms cannot fold."""
    layout = layout_for(config)
    reason = layout.refuse(config) if layout.refuse is not None else None
    sites = _norm_sites(block, layout) if reason is None else reason
    if isinstance(sites, str):
        return sites
    writers = _writers(block, layout.writers)
    if not writers:
        return f"no {' / '.join(layout.writers)} writing the residual stream"
    value_mod = _get(block, layout.value) if layout.value else None
    out = _get(block, layout.out)
    value = ((value_mod, value_rows(layout.value_rows, config))
             if isinstance(value_mod, nn.Linear) and out is not None else None)
    up, down = (_get(block, layout.up), _get(block, layout.down)) if layout.up else (None, None)
    up_down = None
    if isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
        half = up.out_features // 2
        rows = torch.arange(half, 2 * half) if layout.up_rows == "second_half" else torch.arange(up.out_features)
        up_down = (up, rows, down)
    post = [f"{name}.{p}" for p in layout.post_norms if _get(block, p) is not None]
    return BlockSites(name, sites, writers, value, out if value else None, up_down, post)


def output_projections(block: nn.Module, config, attention: bool = False) -> dict[str, nn.Linear]:
    """The Linears that write an MLP's output into the residual stream (path in the block -> Linear): the
    down projection of a dense MLP or of a shared expert (routed experts are not among them); with
    `attention`, the attention's output projection too."""
    layout = layout_for(config)
    return {p: m for p in layout.writers if (attention or p != layout.out) and isinstance(m := _get(block, p), nn.Linear)}


def beside_blocks(stack: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(the final norm, the learned position embedding or None) of the module holding the blocks."""
    final = next((m for n in FINAL_NORMS if (m := _get(stack, n)) is not None), None)
    positions = next((m for n in POSITION_EMBEDDINGS if (m := _get(stack, n)) is not None), None)
    return final, positions
