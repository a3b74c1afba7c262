"""Folding the zero-cost transforms (`algorithms/transforms.py`) into a decoder model.

The sites of one block, found through its family's layout (`adapters.py`; Llama naming shown):

    qkv      input_layernorm γ      → q_proj, k_proj, v_proj     (reads the residual stream)
    gate_up  post_attention_layernorm γ → gate_proj, up_proj     (reads the residual stream; a
             mixture of experts: the router, every expert's gate and up, the shared expert)
    qkv_gate_up  one norm feeding attention and MLP (parallel blocks: Cohere, Phi)
    vo       v_proj rows (per head) → o_proj columns              (attention is linear in v)
    down     up_proj rows           → down_proj columns           (act(gate)·up is linear in up)

transform="rotate": one orthogonal Q on the residual stream, with every norm's γ folded into the
matrices that read it (the final norm into lm_head); embeddings (tokens and learned positions),
readers, writers and lm_head rotated; plus a rotation R_h per key/value head between the values and
the output projection. Norms: γ·x/rms(x); (1 + γ)·x/rms(x) (Gemma: 1 + γ is folded, γ becomes 0);
LayerNorm γ·(x − μ)/σ + β (OPT, GPT-2, GPT-NeoX, Falcon, Phi, StableLM, OLMo, Cohere), which
commutes with Q only when Q keeps the all-ones direction (`mean_keeping_rotation`); its β goes into the
readers' biases when every reader has one, else stays in the norm as β/γ, rotated. Routers read
the rotated stream like any reader and stay in full precision.
transform="scale": per-channel scales searched per site on the block's calibration inputs.
transform="adaptive": the residual rotation, then per site by the robust z-score of the weights'
kurtosis among the sites of its kind: above the site kind's threshold the rotation alone
(qkv, gate_up), the per-head rotation (vo) or nothing (down, where no rotation folds); at or
below it, scales.

Exactness: each fold keeps the full-precision function up to round-off. A norm of another form,
a norm between a writer and the residual add (Gemma 2/3, OLMo 2, GLM-4: no rotation folds through
it; scales still do) or a layout the family table does not cover is refused before any work,
naming the family and the reason; the rotation is also checked on the model's logits and each
block's scales on its output, so an adapter mistake fails loudly instead of changing the model.
Tied input/output embeddings are untied when the final norm has to be folded into lm_head
(logged; the checkpoint then stores lm_head separately).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import offload
from .adapters import BlockSites, beside_blocks, heads, norm_kind, resolve
from .algorithms.transforms import excess_kurtosis, mean_keeping_rotation, robust_z, rotation, search_scales

logger = logging.getLogger("hf_astroquant")

SITE_KIND = {"qkv": "attn", "gate_up": "mlp", "qkv_gate_up": "attn", "vo": "attn", "down": "mlp"}
# How far a fold may move the outputs (‖Δ‖ / ‖output‖) before it counts as not exact.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
# bf16/fp16 weights: every folded weight is rounded again (SmolLM2's rotation in bf16: 0.025, fp16: 0.003);
# a wrong layout moves the outputs by O(1)
_HALF_TOLERANCE = 0.25


class TransformError(ValueError):
    """A transform that cannot fold exactly; `reason` is what refuses it, without the advice."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def _config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _family(model: nn.Module) -> str:
    return f"{type(model).__name__} ({getattr(_config(model), 'model_type', '?')})"


def _refuse(model: nn.Module, transform: str, what: str) -> TransformError:
    reason = f"transform={transform!r} cannot fold exactly into {_family(model)}: {what}"
    return TransformError(f"{reason}. Use transform='none'.", reason)


def block_sites(model: nn.Module, block: nn.Module, name: str, transform: str = "rotate") -> BlockSites:
    """The block's transform sites (adapters.resolve), or a TransformError naming the family and reason."""
    found = resolve(block, name, _config(model))
    if isinstance(found, str):
        raise _refuse(model, transform, f"{name} has {found}" if found.startswith("no ") else found)
    return found


def _check_norm(model: nn.Module, norm: nn.Module, where: str, transform: str) -> str:
    kind = norm_kind(norm)
    if kind is None:
        raise _refuse(model, transform, f"{where} ({type(norm).__name__}) is neither γ·x/rms(x), (1 + γ)·x/rms(x) "
                                        "nor a LayerNorm")
    return kind


def check_foldable(model: nn.Module, blocks, names: list[str], transform: str) -> list[BlockSites]:
    """Every block's sites, once it is sure `transform` folds exactly; else a TransformError."""
    sites = []
    for name, block in zip(names, blocks):
        if any(offload.is_offloaded(m) for m in block.modules()) or any(
                p.device.type == "meta" for p in block.parameters()):
            reason = (f"transform={transform!r} needs every block's weights in memory; {name} is offloaded "
                      "(device_map with cpu/disk entries)")
            raise TransformError(f"{reason}. Use transform='none' with offloading.", reason)
        bs = block_sites(model, block, name, transform)
        for site in bs.norm_sites:
            if site.norm is not None:
                _check_norm(model, site.norm, f"{name}.{site.path}", transform)
        sites.append(bs)
    if transform in ("rotate", "adaptive"):
        _check_rotatable(model, sites, transform)
    return sites


def embeddings_tied(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return (emb is not None and head is not None and getattr(head, "weight", None) is not None
            and (head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()))


def choose_transform(model: nn.Module, blocks, names: list[str], method: str,
                     keep_tied: bool = False) -> tuple[str, str]:
    """transform="auto": (the transform to run, why): "rotate" where the residual rotation folds exactly
    (and, with `keep_tied`, would not untie tied embeddings), else "scale" (it needs calibration data, so
    not with method="rtn"), else "none"; the reason names what refused the others."""
    try:
        check_foldable(model, blocks, names, "rotate")
        if keep_tied and embeddings_tied(model):
            refused = ("the input and output embeddings are tied and a GGUF file stores them once; the residual "
                       "rotation would store lm_head as a second matrix, a larger file than llama.cpp's of the "
                       "same type")
        else:
            return "rotate", "the residual rotation folds exactly into this model"
    except TransformError as err:
        refused = err.reason
    if method == "rtn":
        return "none", f"{refused}; scales need calibration data (method='rtn')"
    try:
        check_foldable(model, blocks, names, "scale")
        return "scale", refused
    except TransformError as err:
        return "none", f"{refused}; {err.reason}"


def _check_rotatable(model: nn.Module, sites: list[BlockSites], transform: str) -> None:
    post = [p for bs in sites for p in bs.post_norms]
    if post:
        raise _refuse(model, transform, f"{post[0]} normalizes a sublayer's output before the residual add (a "
                                        "post-norm); no rotation of the residual stream folds through it "
                                        "(transform='scale' does)")
    if _config(model) is not model.config:
        raise _refuse(model, transform, "a multimodal model's projector writes image features into the residual "
                                        "stream; the rotation is not folded into it (transform='scale' is)")
    final, _ = beside_blocks(_stack(model, sites[0].name))
    if final is None:
        raise _refuse(model, transform, "no final norm beside the blocks")
    _check_norm(model, final, "the final norm", transform)
    if model.get_output_embeddings() is None or model.get_input_embeddings() is None:
        raise _refuse(model, transform, "no input or output embeddings to rotate")
    for bs in sites:
        for site in bs.norm_sites:
            _check_bias_foldable(model, site.norm, site.readers, f"{bs.name}.{site.path}", transform)
    _check_bias_foldable(model, final, [model.get_output_embeddings()], "the final norm", transform)


def _readers_take_beta(readers: list[nn.Module]) -> bool:
    """Whether a norm's β folds into its readers' biases (every reader has one); else it stays in the norm as β/γ."""
    return all(getattr(r, "bias", None) is not None for r in readers)


def _check_bias_foldable(model, norm, readers, where: str, transform: str) -> None:
    b, w = getattr(norm, "bias", None), getattr(norm, "weight", None)
    if b is None or w is None or _readers_take_beta(readers):
        return
    if bool(((w == 0) & (b != 0)).any()):
        raise _refuse(model, transform, f"{where} has channels with γ = 0 and β ≠ 0 and readers without a bias; "
                                        "its β cannot be carried through the rotation")


def _stack(model: nn.Module, block_name: str) -> nn.Module:
    """The module that holds the block list (LlamaModel, GPT2Model, OPTDecoder, ...): ``model.layers.0`` → ``model``."""
    parts = block_name.split(".")
    return model.get_submodule(".".join(parts[:-2])) if len(parts) > 2 else model


@torch.no_grad()
def _set(weight: torch.Tensor, value: torch.Tensor) -> None:
    weight.copy_(value.to(weight.dtype))


@torch.no_grad()
def _fold_norm(norm: nn.Module | None, readers: list[nn.Module]) -> None:
    """Fold the norm's γ (and β) into its readers, leaving a bare normalization (γ′ = 1, or 0 for (1 + γ))."""
    if norm is None:
        return
    kind, w, b = norm_kind(norm), getattr(norm, "weight", None), getattr(norm, "bias", None)
    g = None if w is None else (1 + w.double() if kind == "rms_offset" else w.double())
    if b is not None and bool((b != 0).any()):
        if _readers_take_beta(readers):  # y = W·(γ·n + β) + c
            for r in readers:
                _set(r.bias, r.bias.double() + r.weight.double() @ b.double())
            b.zero_()
        elif g is not None:  # γ·n + β = γ·(n + β/γ): the readers take γ, the norm keeps β/γ
            _set(b, torch.where(g == 0, torch.zeros_like(g), b.double() / g))
    if g is not None:
        for r in readers:
            _set(r.weight, r.weight.double() * g.unsqueeze(0))
        w.fill_(0 if kind == "rms_offset" else 1)


@torch.no_grad()
def probe_logits(model: nn.Module) -> torch.Tensor:
    """The model's logits on 16 fixed low token ids (no special or image tokens), eval mode, RNG kept."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(16) * 7 % max(1, min(vocab, 1000) - 3) + 3).unsqueeze(0)
    device = model.get_input_embeddings().weight.device
    training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            return model(input_ids=ids.to(device), use_cache=False).logits.float()
    finally:
        model.train(training)


def check_kept(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """The relative deviation ‖after − before‖/‖before‖; a TransformError when it exceeds the dtype's round-off."""
    dev = float((after.float() - before.float()).norm() / before.float().norm().clamp_min(1e-30))
    limit = _TOLERANCE.get(dtype, _HALF_TOLERANCE)
    if not dev <= limit:
        raise TransformError(f"{what} did not keep the model's function (relative deviation {dev:.2e} > {limit:g}); "
                             "this family's layout (hf_astroquant/adapters.py) is wrong for this model. "
                             "Use transform='none' and report the model.")
    return dev


def _untie(model: nn.Module, emb: nn.Module, head: nn.Module) -> bool:
    if not embeddings_tied(model):
        return False
    # lm_head must become E·diag(γ_final)·Q while the embedding becomes E·Q: untie them
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):  # multimodal configs keep it on the text config
        model.config.get_text_config().tie_word_embeddings = False
    logger.warning("astroquant: transform rotates the residual stream and the model's input and output "
                   "embeddings are tied; lm_head is untied (stored separately in the checkpoint) so the final "
                   "norm can be folded into it exactly")
    return True


def _residual_rotation(hidden: int, seed: int, norms: list[nn.Module]) -> tuple[torch.Tensor, str]:
    if any(norm_kind(n) == "layer" for n in norms):  # LayerNorms centre: the rotation must keep the mean
        return mean_keeping_rotation(hidden, seed)
    return rotation(hidden, seed)


@torch.no_grad()
def rotate_residual(model: nn.Module, sites: list[BlockSites], seed: int,
                    value_output: list[bool] | None = None) -> dict:
    """Fold every norm's γ into its readers, then rotate the residual stream by one orthogonal Q
    (embeddings, readers, writers, lm_head), and each key/value head between values and output by
    its own R_h in the blocks where `value_output` is True (default: all). Returns what was done."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    final, positions = beside_blocks(_stack(model, sites[0].name))
    norms = [final] + [site.norm for bs in sites for site in bs.norm_sites if site.norm is not None]
    Q, kind = _residual_rotation(emb.weight.shape[1], seed, norms)
    untied = _untie(model, emb, head)
    _fold_norm(final, [head])
    on = {}  # Q on each device the model spans (a device_map may spread the blocks over several GPUs)

    def Qd(t: torch.Tensor) -> torch.Tensor:
        return on.setdefault(t.device, Q.to(t.device))

    for table in [emb, head] + ([positions] if positions is not None else []):
        _set(table.weight, table.weight.double() @ Qd(table.weight))
    for bs in sites:
        for site in bs.norm_sites:
            _fold_norm(site.norm, site.readers)
        for r in [r for site in bs.norm_sites for r in site.readers]:
            _set(r.weight, r.weight.double() @ Qd(r.weight))
        for w in bs.writers:
            _set(w.weight, Qd(w.weight).t() @ w.weight.double())
            if w.bias is not None:
                _set(w.bias, w.bias.double() @ Qd(w.bias))
    for norm in norms:  # a LayerNorm's β left in the norm lives in the stream's basis now
        if getattr(norm, "bias", None) is not None:
            _set(norm.bias, norm.bias.double() @ Qd(norm.bias))
    rotate_value_outputs(model, sites, seed, value_output or [True] * len(sites))
    return {"residual": kind, "untied_lm_head": untied, "seed": seed}


def rotation_record(bs: BlockSites) -> dict[str, str]:
    """What `rotate_residual` did at each site of one block."""
    rec = {site.name: "rotate" for site in bs.norm_sites}
    rec.update(vo="rotate" if bs.value is not None else "none", down="none")
    return rec


@torch.no_grad()
def rotate_value_outputs(model: nn.Module, sites: list[BlockSites], seed: int, which: list[bool]) -> None:
    """The per-head value/output rotation in the blocks where `which` is True."""
    _, n_kv, hd = heads(_config(model))
    R = [rotation(hd, seed + 1 + h)[0] for h in range(n_kv)]
    for bs, on in zip(sites, which):
        if on and bs.value is not None:
            rotate_value_output(model, bs, [r.to(bs.out.weight.device) for r in R])


@torch.no_grad()
def rotate_value_output(model: nn.Module, bs: BlockSites, rotations: list[torch.Tensor]) -> None:
    """v_h′ = v_h·R_h for each key/value head h: its rows of the value matrix (and bias) ← R_hᵀ·(…),
    the output projection's columns of every query head reading h ← (…)·R_h."""
    n_heads, n_kv, hd = heads(_config(model))
    (v, rows), o = bs.value, bs.out
    Wv = v.weight.double()[rows.flatten()].view(n_kv, hd, -1)
    v.weight[rows.flatten()] = torch.stack([rotations[h].t() @ Wv[h] for h in range(n_kv)]).view(n_kv * hd, -1).to(
        v.weight.dtype)
    if v.bias is not None:
        bv = v.bias.double()[rows.flatten()].view(n_kv, hd)
        v.bias[rows.flatten()] = torch.stack([bv[h] @ rotations[h] for h in range(n_kv)]).view(-1).to(v.bias.dtype)
    Wo = o.weight.double().view(o.weight.shape[0], n_heads, hd)
    rep = n_heads // n_kv
    _set(o.weight, torch.stack([Wo[:, j] @ rotations[j // rep] for j in range(n_heads)], 1).view(o.weight.shape[0], -1))


def _o_columns(model: nn.Module, per_kv: torch.Tensor) -> torch.Tensor:
    """Expand a per-(kv channel) vector to the output projection's columns (every query head of a group)."""
    n_heads, n_kv, hd = heads(_config(model))
    return per_kv.view(n_kv, 1, hd).expand(n_kv, n_heads // n_kv, hd).reshape(n_heads * hd)


@torch.no_grad()
def _scale_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """The norm's output divided by s: γ/s (Gemma's 1 + γ: (1 + γ)/s − 1), β/s."""
    w = norm.weight
    if norm_kind(norm) == "rms_offset":
        _set(w, (1 + w.double()) / s - 1)
    else:
        _set(w, w.double() / s)
    if getattr(norm, "bias", None) is not None:
        _set(norm.bias, norm.bias.double() / s)


@torch.no_grad()
def apply_scales(model: nn.Module, bs: BlockSites, site: str, s: torch.Tensor) -> None:
    """Fold scales s (one per input channel of the site's consumers) into consumers and producer."""
    s = s.double().to(bs.writers[0].weight.device)
    norm_site = next((n for n in bs.norm_sites if n.name == site), None)
    if norm_site is not None and scalable(norm_site.norm):
        _scale_norm(norm_site.norm, s)
        for r in norm_site.readers:  # routers too: their logits must not change
            _set(r.weight, r.weight.double() * s)
    elif site == "vo" and bs.value is not None:  # s is per key/value channel
        (v, rows), o = bs.value, bs.out
        _scale_rows(v, rows.flatten(), s)
        _set(o.weight, o.weight.double() * _o_columns(model, s).unsqueeze(0))
    elif site == "down" and bs.up_down is not None:
        up, rows, down = bs.up_down
        _scale_rows(up, rows, s)
        _set(down.weight, down.weight.double() * s.unsqueeze(0))
    else:
        raise ValueError(f"{bs.name} has no scale site {site!r}")


@torch.no_grad()
def _scale_rows(linear: nn.Linear, rows: torch.Tensor, s: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight[rows] = (linear.weight.double()[rows] / s.unsqueeze(1)).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias[rows] = (linear.bias.double()[rows] / s).to(linear.bias.dtype)


def scalable(norm: nn.Module | None) -> bool:
    """A producer that can divide its output channels: a norm with a γ (not the raw stream, not OLMo's bare LayerNorm)."""
    return norm is not None and getattr(norm, "weight", None) is not None


def scale_sites(bs: BlockSites) -> list[str]:
    """The sites of one block where scales fold: every consumer site with a producer that can divide."""
    producers = {n.name: n.norm for n in bs.norm_sites}
    return [site for site in bs.consumers() if site not in producers or scalable(producers[site])]


def site_width(bs: BlockSites, site: str) -> int:
    """How many scales `site` takes (the width of the stream its consumers read)."""
    if site == "vo":
        return bs.value[1].numel()
    if site == "down":
        return bs.up_down[1].numel()
    return next(n for n in bs.norm_sites if n.name == site).readers[0].weight.shape[1]


def site_kurtosis(bs: BlockSites) -> dict[str, float]:
    """Excess kurtosis of each site's consumer weights (concatenated)."""
    return {site: excess_kurtosis(torch.cat([m.weight.detach().float().flatten() for m in cons]))
            for site, cons in bs.consumers().items()}


def adaptive_choices(kurtosis: list[dict[str, float]], thr_attn: float, thr_mlp: float) -> list[dict[str, str]]:
    """Per block and site, 'rotate' (vo: per-head rotation; qkv/gate_up: the residual rotation
    alone), 'none' (down above its threshold: no rotation folds there) or 'scale', by the robust
    z-score of the site's kurtosis among the same site in every block that has it."""
    choices = [dict() for _ in kurtosis]
    for site in dict.fromkeys(s for k in kurtosis for s in k):
        having = [i for i, k in enumerate(kurtosis) if site in k]
        z = robust_z([kurtosis[i][site] for i in having])
        thr = thr_attn if SITE_KIND[site] == "attn" else thr_mlp
        for i, zi in zip(having, z):
            choices[i][site] = ("none" if site == "down" else "rotate") if zi > thr else "scale"
    return choices


class SiteStats:
    """H of each site's input, accumulated over one forward of a block (a hook on a consumer that
    sees every token: the first reader, the output projection, the down projection)."""

    def __init__(self, bs: BlockSites, sites: list[str], dtype: torch.dtype = torch.float32):
        """`dtype`: what each H is summed in (statistics_dtype); `h` holds the sums in it."""
        self.dtype = dtype
        self.h: dict[str, torch.Tensor] = {}
        self._handles = []
        first = {n.name: n.readers[0] for n in bs.norm_sites}
        first.update(vo=bs.out, down=bs.up_down[2] if bs.up_down is not None else None)
        for site in sites:
            self._handles.append(first[site].register_forward_pre_hook(self._hook(site)))

    def _hook(self, site):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(self.dtype)
            h = x.t() @ x * (2.0 / x.shape[0])
            self.h[site] = self.h[site] + h if site in self.h else h
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def scale_block(model: nn.Module, bs: BlockSites, stats: dict[str, torch.Tensor], sites: list[str], bits: int,
                group_size: int, sym: bool) -> dict[str, float]:
    """Search and fold scales at `sites` of one block. Returns the chosen α per site."""
    out = {}
    n_heads, n_kv, hd = heads(_config(model))
    consumers = bs.consumers()
    for site in sites:
        H = stats[site]
        weights = [m.weight.detach() for m in consumers[site]]
        if site == "vo":
            # one scale per key/value channel, shared by the query heads that read it: search on
            # o_proj's columns averaged over those heads (their H diagonal blocks)
            rep = n_heads // n_kv
            Hk = H.view(n_kv, rep, hd, n_kv, rep, hd).diagonal(dim1=1, dim2=4).mean(-1)
            # Hk: (n_kv, hd, n_kv, hd) — the mean over heads of each group's own H block
            Hk = Hk.reshape(n_kv * hd, n_kv * hd)
            Wo = bs.out.weight.detach().float().view(-1, n_kv, rep, hd).permute(2, 0, 1, 3)
            weights = [Wo[r].reshape(Wo.shape[1], n_kv * hd) for r in range(rep)]
            H = Hk
        gs = group_size if group_size != -1 else weights[0].shape[1]
        s, alpha, ratio = search_scales(weights, H, bits, gs, sym)
        if alpha > 0:
            apply_scales(model, bs, site, s)
        out[site] = alpha
    return out
