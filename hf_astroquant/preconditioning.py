"""Folding the zero-cost transforms (`algorithms/transforms.py`) into a Llama-style model.

Sites of one decoder block (Llama naming; Mistral, Qwen2, SmolLM, ... share it):

    qkv      input_layernorm γ      → q_proj, k_proj, v_proj     (reads the residual stream)
    gate_up  post_attention_layernorm γ → gate_proj, up_proj     (reads the residual stream)
    vo       v_proj rows (per head) → o_proj columns              (attention is linear in v)
    down     up_proj rows           → down_proj columns           (act(gate)·up is linear in up)

transform="rotate": one orthogonal Q on the residual stream, with every RMSNorm γ folded into
the Linears that read it (the final norm into lm_head); embeddings, readers, writers and lm_head
rotated; plus a rotation R_h per key/value head between v_proj and o_proj.
transform="scale": per-channel scales searched per site on the block's calibration inputs.
transform="adaptive": the residual rotation, then per site by the robust z-score of the weights'
kurtosis among the sites of its kind: above the site kind's threshold the rotation alone
(qkv, gate_up), the per-head rotation (vo) or nothing (down, where no rotation folds); at or
below it, scales.

Exactness: each fold keeps the full-precision function up to fp32 round-off (tested). A norm that
is not a plain γ·x/rms(x) (e.g. Gemma's (1 + γ)) or a layout without these names is refused with
the reason; tied input/output embeddings are untied when the final norm has to be folded into
lm_head (logged; the checkpoint then stores lm_head separately).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import offload
from .algorithms.transforms import excess_kurtosis, robust_z, rotation, search_scales

logger = logging.getLogger("hf_astroquant")

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class TransformError(ValueError):
    pass


def block_parts(block: nn.Module, name: str) -> dict[str, nn.Module]:
    """The modules a transform touches in one block, or a TransformError naming what is missing."""
    parts, missing = {}, []
    for attr in ("input_layernorm", "post_attention_layernorm"):
        mod = getattr(block, attr, None)
        (parts.__setitem__(attr, mod) if mod is not None else missing.append(attr))
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    for owner, owner_name, names in ((attn, "self_attn", ATTN), (mlp, "mlp", MLP)):
        for n in names:
            mod = getattr(owner, n, None) if owner is not None else None
            if isinstance(mod, nn.Linear):
                parts[n] = mod
            else:
                missing.append(f"{owner_name}.{n}")
    if missing:
        raise TransformError(f"{name} has no {', '.join(missing)} as nn.Linear/norm modules; the transforms "
                             "fold into Llama-style blocks only. Use transform='none'.")
    return parts


@torch.no_grad()
def check_rmsnorm(norm: nn.Module, name: str, transform: str) -> None:
    """Refuse a norm that is not exactly γ·x/√(mean(x²) + ε): folding γ would change the model."""
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if getattr(norm, "bias", None) is not None or w is None or eps is None or w.device.type == "meta":
        ok = False
    else:
        x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, torch.float32)
        expect = w.float() * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps))
        got = norm(x.to(w.dtype)).float()
        ok = torch.allclose(got, expect, rtol=1e-4, atol=1e-5 * float(expect.abs().max()) + 1e-6)
    if not ok:
        raise TransformError(f"{name} ({type(norm).__name__}) is not a plain RMSNorm γ·x/rms(x) (offset, bias "
                             f"or centring); transform={transform!r} cannot fold into it exactly. "
                             "Use transform='none'.")


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", model)
    return getattr(base, "norm", None)


@torch.no_grad()
def _set(linear_weight: torch.Tensor, value: torch.Tensor) -> None:
    linear_weight.copy_(value.to(linear_weight.dtype))


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = norm.weight.double()
    for lin in readers:
        _set(lin.weight, lin.weight.double() * g.unsqueeze(0))
    norm.weight.fill_(1)


def _heads(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config.get_text_config()
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def _o_columns(model: nn.Module, per_kv: torch.Tensor) -> torch.Tensor:
    """Expand a per-(kv channel) vector to o_proj's input columns (every query head of a group)."""
    n_heads, n_kv, hd = _heads(model)
    return per_kv.view(n_kv, 1, hd).expand(n_kv, n_heads // n_kv, hd).reshape(n_heads * hd)


def check_foldable(model: nn.Module, blocks, names: list[str], transform: str) -> None:
    for name, block in zip(names, blocks):
        parts = block_parts(block, name)
        if any(offload.is_offloaded(m) or any(p.device.type == "meta" for p in m.parameters())
               for m in parts.values()):
            raise TransformError(f"transform={transform!r} needs every block's weights in memory; {name} is "
                                 "offloaded (device_map with cpu/disk entries). Use transform='none' with offloading.")
        for n in ("input_layernorm", "post_attention_layernorm"):
            check_rmsnorm(parts[n], f"{name}.{n}", transform)
    if transform in ("rotate", "adaptive"):
        final = _final_norm(model)
        if final is None:
            raise TransformError(f"transform={transform!r}: the model has no final norm at base_model.norm")
        check_rmsnorm(final, "final norm", transform)
        if model.get_output_embeddings() is None or model.get_input_embeddings() is None:
            raise TransformError(f"transform={transform!r} needs the input and output embeddings")


@torch.no_grad()
def rotate_residual(model: nn.Module, blocks, names: list[str], seed: int,
                    value_output: list[bool] | None = None) -> dict:
    """Fold every RMSNorm γ into its readers, then rotate the residual stream by one orthogonal Q
    (embeddings, readers, writers, lm_head), and each key/value head between v_proj and o_proj by
    its own R_h in the blocks where `value_output` is True (default: all). Returns what was done."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    hidden = emb.weight.shape[1]
    Q, kind = rotation(hidden, seed)
    untied = False
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        # lm_head must become E·diag(γ_final)·Q while the embedding becomes E·Q: untie them
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):  # multimodal configs keep it on the text config
            model.config.get_text_config().tie_word_embeddings = False
        untied = True
        logger.warning("astroquant: transform rotates the residual stream and the model's input and output "
                       "embeddings are tied; lm_head is untied (stored separately in the checkpoint) so the final "
                       "norm can be folded into it exactly")
    final = _final_norm(model)
    _fold_norm(final, [head])
    Qd = Q.to(emb.weight.device)
    _set(emb.weight, emb.weight.double() @ Qd)
    _set(head.weight, head.weight.double() @ Qd)
    for name, block in zip(names, blocks):
        p = block_parts(block, name)
        _fold_norm(p["input_layernorm"], [p["q_proj"], p["k_proj"], p["v_proj"]])
        _fold_norm(p["post_attention_layernorm"], [p["gate_proj"], p["up_proj"]])
        for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            _set(p[n].weight, p[n].weight.double() @ Qd)
        for n in ("o_proj", "down_proj"):
            _set(p[n].weight, Qd.t() @ p[n].weight.double())
            if p[n].bias is not None:
                _set(p[n].bias, p[n].bias.double() @ Qd)
    if value_output is None:
        value_output = [True] * len(blocks)
    rotate_value_outputs(model, blocks, names, seed, value_output)
    return {"residual": kind, "untied_lm_head": untied, "seed": seed}


@torch.no_grad()
def rotate_value_outputs(model: nn.Module, blocks, names: list[str], seed: int, which: list[bool]) -> None:
    """The per-head value/output rotation in the blocks where `which` is True."""
    _, n_kv, hd = _heads(model)
    R = [rotation(hd, seed + 1 + h)[0] for h in range(n_kv)]
    for name, block, on in zip(names, blocks, which):
        if on:
            p = block_parts(block, name)
            rotate_value_output(model, p, [r.to(p["v_proj"].weight.device) for r in R])


@torch.no_grad()
def rotate_value_output(model: nn.Module, parts: dict, rotations: list[torch.Tensor]) -> None:
    """v_h′ = v_h·R_h for each key/value head h: v_proj rows (and bias) of head h ← R_hᵀ·(…), o_proj
    columns of every query head reading h ← (…)·R_h."""
    n_heads, n_kv, hd = _heads(model)
    v, o = parts["v_proj"], parts["o_proj"]
    Wv = v.weight.double().view(n_kv, hd, -1)
    _set(v.weight, torch.stack([rotations[h].t() @ Wv[h] for h in range(n_kv)]).view(n_kv * hd, -1))
    if v.bias is not None:
        bv = v.bias.double().view(n_kv, hd)
        _set(v.bias, torch.stack([bv[h] @ rotations[h] for h in range(n_kv)]).view(-1))
    Wo = o.weight.double().view(o.weight.shape[0], n_heads, hd)
    rep = n_heads // n_kv
    _set(o.weight, torch.stack([Wo[:, j] @ rotations[j // rep] for j in range(n_heads)], 1).view(o.weight.shape[0], -1))


@torch.no_grad()
def apply_scales(model: nn.Module, parts: dict, site: str, s: torch.Tensor) -> None:
    """Fold scales s (one per input channel of the site's consumers) into consumers and producer."""
    s = s.double().to(parts["q_proj"].weight.device)
    if site == "qkv":
        _set(parts["input_layernorm"].weight, parts["input_layernorm"].weight.double() / s)
        for n in ("q_proj", "k_proj", "v_proj"):
            _set(parts[n].weight, parts[n].weight.double() * s)
    elif site == "gate_up":
        _set(parts["post_attention_layernorm"].weight, parts["post_attention_layernorm"].weight.double() / s)
        for n in ("gate_proj", "up_proj"):
            _set(parts[n].weight, parts[n].weight.double() * s)
    elif site == "vo":  # s is per key/value channel
        v, o = parts["v_proj"], parts["o_proj"]
        _set(v.weight, v.weight.double() / s.unsqueeze(1))
        if v.bias is not None:
            _set(v.bias, v.bias.double() / s)
        _set(o.weight, o.weight.double() * _o_columns(model, s).unsqueeze(0))
    elif site == "down":
        up, down = parts["up_proj"], parts["down_proj"]
        _set(up.weight, up.weight.double() / s.unsqueeze(1))
        if up.bias is not None:
            _set(up.bias, up.bias.double() / s)
        _set(down.weight, down.weight.double() * s.unsqueeze(0))
    else:
        raise ValueError(f"unknown site {site!r}")


SITE_CONSUMERS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj"),
                  "vo": ("o_proj",), "down": ("down_proj",)}
SITE_KIND = {"qkv": "attn", "gate_up": "mlp", "vo": "attn", "down": "mlp"}


def site_kurtosis(parts: dict) -> dict[str, float]:
    """Excess kurtosis of each site's consumer weights (concatenated)."""
    return {site: excess_kurtosis(torch.cat([parts[n].weight.detach().float().flatten() for n in cons]))
            for site, cons in SITE_CONSUMERS.items()}


def adaptive_choices(kurtosis: list[dict[str, float]], thr_attn: float, thr_mlp: float) -> list[dict[str, str]]:
    """Per block and site, 'rotate' (vo: per-head rotation; qkv/gate_up: the residual rotation
    alone), 'none' (down above its threshold: no rotation folds there) or 'scale', by the robust
    z-score of the site's kurtosis among the same site in every block."""
    choices = [dict() for _ in kurtosis]
    for site in SITE_CONSUMERS:
        z = robust_z([k[site] for k in kurtosis])
        thr = thr_attn if SITE_KIND[site] == "attn" else thr_mlp
        for i, zi in enumerate(z):
            choices[i][site] = ("none" if site == "down" else "rotate") if zi > thr else "scale"
    return choices


class SiteStats:
    """H of each site's input, accumulated over one forward of a block (hooks on the consumers)."""

    def __init__(self, parts: dict):
        self.h: dict[str, torch.Tensor] = {}
        self._handles = []
        for site, cons in SITE_CONSUMERS.items():
            self._handles.append(parts[cons[0]].register_forward_pre_hook(self._hook(site)))

    def _hook(self, site):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            h = x.t() @ x * (2.0 / x.shape[0])
            self.h[site] = self.h[site] + h if site in self.h else h
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def scale_block(model: nn.Module, parts: dict, stats: dict[str, torch.Tensor], sites: list[str], bits: int,
                group_size: int, sym: bool) -> dict[str, float]:
    """Search and fold scales at `sites` of one block. Returns the chosen α per site."""
    out = {}
    n_heads, n_kv, hd = _heads(model)
    for site in sites:
        H = stats[site]
        weights = [parts[n].weight.detach() for n in SITE_CONSUMERS[site]]
        if site == "vo":
            # one scale per key/value channel, shared by the query heads that read it: search on
            # o_proj's columns averaged over those heads (their H diagonal blocks)
            rep = n_heads // n_kv
            Hk = H.view(n_kv, rep, hd, n_kv, rep, hd).diagonal(dim1=1, dim2=4).mean(-1)
            # Hk: (n_kv, hd, n_kv, hd) — the mean over heads of each group's own H block
            Hk = Hk.reshape(n_kv * hd, n_kv * hd)
            Wo = parts["o_proj"].weight.detach().float().view(-1, n_kv, rep, hd).permute(2, 0, 1, 3)
            weights = [Wo[r].reshape(Wo.shape[1], n_kv * hd) for r in range(rep)]
            H = Hk
        gs = group_size if group_size != -1 else weights[0].shape[1]
        s, alpha, ratio = search_scales(weights, H, bits, gs, sym)
        if alpha > 0:
            apply_scales(model, parts, site, s)
        out[site] = alpha
    return out
