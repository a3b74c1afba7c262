"""Load-time value checks of the packed layers: a checkpoint holding values our quantizer never
writes is refused, naming the layer, the tensor, the offending value and its index, and what is allowed.

`guard.check_checkpoint` reads only the headers (names, shapes, dtypes); the values are checked here,
once the weights are in memory, before any forward path is prepared. Each rule is one small
function; `check_model` runs them for every packed layer. They are vectorized reductions over tensors
of size (groups × out), (in,) or (out,): the large `qweight` needs no check, since every bit pattern
of it is a valid code (b bits per code, any value in [0, 2^b − 1]; padding bits are never read).

The rules, and why our quantizer's output always passes them:
    scales   finite and > 0: grid.py clamps every step to at least the smallest positive fp16 value
             (2^-24), and scale tuning multiplies it by exp(t) > 0. (Its fp16 store would round a
             tuned step below 2^-25 to 0; that needs a step at the floor shrunk by more than half.)
    qzeros   with sym=True every zero point is 2^(bits − 1) (grid.py); an asymmetric zero point is
             any b-bit value, which its packing already guarantees (we store true z, not GPTQ v1's z − 1).
    g_idx    in [0, n_groups): the torch gather and the Triton kernel index the scales and zeros with it.
    bias     finite (copied from the original Linear, which calibration already checked).
    input_rotation.signs ±1; input_rotation.mix finite and orthogonal (random_signs_and_mix).
    qblocks  (GGUF layers) every block's fp16 factors d (and dmin) finite.
"""

from __future__ import annotations

import math

import torch

from .. import offload
from ..gguf.linear import GGUFLinear
from ..modules.packing import pack_cols, unpack_cols
from ..modules.quant_linear import QuantLinear

# Byte offsets of the fp16 factors (d, dmin) inside one block of each GGUF tensor type: the layouts
# of gguf/blocks.py, as gguf-py's `dequantize_blocks` splits them.
GGUF_FACTOR_OFFSETS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
ORTHOGONALITY_TOL = 1e-3  # |AᵀA − I| of a stored mix: fp32 rounding of an fp64 orthogonal matrix is ~1e-7


def _first(bad: torch.Tensor) -> list[int]:
    """The index of the first True element of `bad` (which holds one)."""
    return [int(i) for i in bad.nonzero()[0]]


def _show(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def refusal(layer: str, tensor: str, value, index: list[int], allowed: str, what: str = "") -> ValueError:
    """The one-line error of a value rule: layer, tensor, value (`what`: what kind of value, where the
    tensor stores it packed), its index and what is allowed."""
    return ValueError(f"hf_astroquant: {layer}.{tensor} holds {what}{_show(value)} at {index}; {tensor} must be "
                      f"{allowed} — refusing to load this checkpoint")


def _refuse_outside(values: torch.Tensor, low, high, layer: str, tensor: str, allowed: str, *,
                    low_open: bool = False, high_open: bool = False, what: str = "") -> None:
    """Refuse unless low ≤ v ≤ high for every value v (< where open); NaN is never inside. The common,
    valid case costs two reductions (amin and amax propagate NaN, so a NaN fails them too); only a failing
    tensor is searched element by element for the first value outside, to name it."""
    if values.numel() == 0:
        return
    # amin and amax, not aminmax: on CPU aminmax is ~10x slower on fp16
    lo, hi = (float(x) if values.is_floating_point() else int(x) for x in (values.amin(), values.amax()))
    if (lo > low if low_open else lo >= low) and (hi < high if high_open else hi <= high):
        return
    inside = (values > low if low_open else values >= low) & (values < high if high_open else values <= high)
    index = _first(~inside)
    raise refusal(layer, tensor, values[tuple(index)].item(), index, allowed, what)


def check_scales(layer: str, scales: torch.Tensor) -> None:
    """Every step size is finite and > 0 (a non-finite one gives NaN logits, a negative one flips the
    weights' sign, a zero one erases them)."""
    _refuse_outside(scales, 0, math.inf, layer, "scales", "finite and > 0", low_open=True, high_open=True)


def check_zero_points(layer: str, zeros: torch.Tensor, bits: int, sym: bool) -> None:
    """`zeros` (unpacked, (n_groups, out); index [group, output column]) lie in [0, 2^bits − 1], and all
    equal 2^(bits − 1) when the checkpoint says sym=True (a symmetric grid fixes its zero point)."""
    maxq, mid = 2**bits - 1, 2 ** (bits - 1)
    _refuse_outside(zeros, 0, maxq, layer, "qzeros", f"in [0, {maxq}] at {bits} bits", what="zero point ")
    if sym:
        _refuse_outside(zeros, mid, mid, layer, "qzeros", f"{mid} (2^(bits-1)) with sym=True", what="zero point ")


def check_symmetric_zeros(layer: str, qzeros: torch.Tensor, bits: int, out_features: int) -> None:
    """With sym=True every zero point is 2^(bits − 1). The packed words are compared with a packed row of
    such zero points (no unpacking in the common case); only a differing tensor is unpacked, to name the
    zero point (its padding bits may differ harmlessly: then nothing is refused)."""
    mid = 2 ** (bits - 1)
    row = pack_cols(torch.full((1, out_features), mid, dtype=torch.int32, device=qzeros.device), bits)
    if row.shape[1] == qzeros.shape[1] and torch.equal(qzeros, row.expand_as(qzeros)):
        return
    check_zero_points(layer, unpack_cols(qzeros, bits, out_features), bits, sym=True)


def check_g_idx(layer: str, g_idx: torch.Tensor, n_groups: int) -> None:
    """Every column's group is in [0, n_groups): a negative one would wrap around in the torch gather
    and read outside the scales in the Triton kernel."""
    _refuse_outside(g_idx, 0, n_groups - 1, layer, "g_idx", f"in [0, {n_groups - 1}] (the layer's {n_groups} group(s))")


def check_finite(layer: str, tensor: str, values: torch.Tensor) -> None:
    """Every element is finite (bias, the rotation's mix)."""
    check_finite_as(layer, tensor, values, "finite")


def check_finite_as(layer: str, tensor: str, values: torch.Tensor, allowed: str) -> None:
    _refuse_outside(values, -math.inf, math.inf, layer, tensor, allowed, low_open=True, high_open=True)


def check_signs(layer: str, signs: torch.Tensor) -> None:
    """The rotation's signs are exactly ±1 (R = diag(s)·(A ⊗ H) is orthogonal only then)."""
    size = signs.abs()
    if size.numel() == 0 or (float(size.amin()) == 1 and float(size.amax()) == 1):  # (a NaN fails both)
        return
    index = _first((signs != 1) & (signs != -1))
    raise refusal(layer, "input_rotation.signs", signs[tuple(index)].item(), index, "+1 or -1")


def check_orthogonal(layer: str, mix: torch.Tensor) -> None:
    """The rotation's mix A is finite and orthogonal (|AᵀA − I| ≤ ORTHOGONALITY_TOL): otherwise the online
    rotation does not undo the one folded into the weights and the layer computes something else."""
    check_finite(layer, "input_rotation.mix", mix)
    a = mix.double()
    err = (a.t() @ a - torch.eye(a.shape[0], dtype=a.dtype, device=a.device)).abs()
    worst = float(err.max()) if err.numel() else 0.0
    if worst > ORTHOGONALITY_TOL:
        index = [int(i) for i in torch.unravel_index(err.argmax(), err.shape)]  # the worst (column, column) pair
        raise ValueError(f"hf_astroquant: {layer}.input_rotation.mix is not orthogonal: |AᵀA − I| is {worst:.3g} at "
                         f"{index}; input_rotation.mix must be orthogonal (|AᵀA − I| ≤ {ORTHOGONALITY_TOL:g}) — "
                         "refusing to load this checkpoint")


def gguf_factors(qblocks: torch.Tensor, tensor_type: str, block_bytes: int) -> torch.Tensor:
    """(out, blocks per row, factors) fp16: each block's d (and dmin), read from the raw bytes."""
    offsets = GGUF_FACTOR_OFFSETS[tensor_type]
    blocks = qblocks.reshape(qblocks.shape[0], -1, block_bytes)
    pairs = torch.stack([blocks[..., o:o + 2] for o in offsets], dim=2)  # (out, blocks, factors, 2) bytes
    return pairs.contiguous().view(torch.float16).squeeze(-1)  # little-endian fp16, as GGML stores it


def check_gguf_blocks(layer: str, qblocks: torch.Tensor, tensor_type: str) -> None:
    """Every block's fp16 factors (d, and dmin for the affine types) are finite: a non-finite factor
    de-quantizes its whole block to NaN/Inf. Index: [output row, block, factor]."""
    from ..gguf.types import TENSOR_TYPES

    if tensor_type not in GGUF_FACTOR_OFFSETS:  # a type without a known layout: nothing cheap to check
        return
    factors = gguf_factors(qblocks, tensor_type, TENSOR_TYPES[tensor_type].block_bytes)
    check_finite_as(layer, "qblocks", factors, f"{tensor_type} blocks with finite fp16 factors")


def check_quant_linear(layer: str, module: QuantLinear, tensors: dict[str, torch.Tensor], sym: bool) -> None:
    """Every value rule of one `QuantLinear`'s loaded `tensors` (name → tensor; one that is absent is
    skipped)."""
    if "scales" in tensors:
        check_scales(layer, tensors["scales"])
    if "g_idx" in tensors:
        check_g_idx(layer, tensors["g_idx"], module.n_groups)
    if sym and "qzeros" in tensors:  # an asymmetric zero point is any b-bit value: nothing to check
        check_symmetric_zeros(layer, tensors["qzeros"], module.bits, module.out_features)
    if "bias" in tensors:
        check_finite(layer, "bias", tensors["bias"])
    if "input_rotation.signs" in tensors:
        check_signs(layer, tensors["input_rotation.signs"])
    if "input_rotation.mix" in tensors:
        check_orthogonal(layer, tensors["input_rotation.mix"])


def check_gguf_linear(layer: str, module: GGUFLinear, tensors: dict[str, torch.Tensor]) -> None:
    """Every value rule of one `GGUFLinear`'s loaded `tensors`."""
    if "qblocks" in tensors:
        check_gguf_blocks(layer, tensors["qblocks"], module.tensor_type)
    if "bias" in tensors:
        check_finite(layer, "bias", tensors["bias"])


def loaded_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffers by name. An offloaded one's sit on meta, their values in its (or its
    submodule's) accelerate hook's weights map, read from there; one found nowhere is left out."""
    out = {}
    for name, tensor in module.named_buffers():
        if tensor.device.type != "meta":
            out[name] = tensor
            continue
        owner, _, leaf = name.rpartition(".")
        for holder, key in ((module.get_submodule(owner) if owner else module, leaf), (module, name)):
            hook = offload.offload_hook(holder)
            try:
                out[name] = hook.weights_map[key]
                break
            except (AttributeError, KeyError):  # no hook, or not in its map
                continue
    return out


def check_layer(name: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor], sym: bool) -> bool:
    """The value rules of one packed layer (a QuantLinear or GGUFLinear) on its `tensors`; False for
    any other module (nothing to check)."""
    if isinstance(module, QuantLinear):
        check_quant_linear(name, module, tensors, sym)
    elif isinstance(module, GGUFLinear):
        check_gguf_linear(name, module, tensors)
    else:
        return False
    return True


def check_model(model: torch.nn.Module, sym: bool) -> int:
    """Run the value rules on every packed layer of a loaded `model` (`sym`: its checkpoint's sym
    option); raise the first refusal. Returns how many layers were checked."""
    return sum(check_layer(name, module, loaded_tensors(module), sym)
               for name, module in model.named_modules() if isinstance(module, (QuantLinear, GGUFLinear)))
