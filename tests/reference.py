"""Slow, obviously-correct reference solvers for the tests (float64, no lazy batches, no Cholesky).

GPTQ as Optimal Brain Quantization in a fixed order: keep the inverse Hessian of the columns
not yet quantized; quantize column p, spread its error over the others with
    W[:, rest] −= (w_p − q_p) / Hinv[p, p] · Hinv[p, rest]
and remove p from the inverse: Hinv −= Hinv[:, p] Hinv[p, :] / Hinv[p, p].
"""

import math

import torch

from hf_astroquant.algorithms.grid import dequantize, fit_grid, quantize


def reference_gptq(weight, hessian, *, bits, group_size=-1, sym=False, desc_act=False, static_groups=False,
                   damp_percent=0.01, mse=False, with_rounding_error=False):
    """(Q, g_idx), and with `with_rounding_error` E: E[:, p] = clamp(w/s + z − code, −½, ½), w column p
    as updated when it was rounded."""
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    gs = cols if group_size == -1 else group_size
    n_groups = math.ceil(cols / gs)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp_percent * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    order = torch.argsort(torch.diag(hessian.double()).masked_fill(dead, 1), descending=True) if desc_act \
        else torch.arange(cols)
    static = [fit_grid(W[:, g * gs:(g + 1) * gs].float(), bits, sym, mse=mse) for g in range(n_groups)]
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    E = torch.zeros_like(W)
    g_idx = torch.zeros(cols, dtype=torch.int32)
    grid = None
    for pos, p in enumerate(order.tolist()):
        if static_groups:
            g = p // gs
            grid = static[g]
        else:
            g = pos // gs
            if pos % gs == 0:
                members = order[pos:pos + gs]
                grid = fit_grid(W[:, members].float(), bits, sym, mse=mse)
        s, z = (t.double() for t in grid)
        code = quantize(W[:, p], s, z, bits)
        E[:, p] = (W[:, p] / s + z - code).clamp(-0.5, 0.5)
        q = dequantize(code, s, z)
        Q[:, p] = q
        g_idx[p] = g
        d = Hinv[p, p]
        W -= torch.outer((W[:, p] - q) / d, Hinv[p])
        Hinv -= torch.outer(Hinv[:, p], Hinv[p]) / d
    return (Q, g_idx, E) if with_rounding_error else (Q, g_idx)


def layer_objective(weight, quantized, hessian):
    dW = (quantized - weight).double()
    return float(((dW @ hessian.double()) * dW).sum())


def correlated_problem(rows, cols, tokens, seed, dead=()):
    """A weight and a Hessian from correlated, outlier-heavy activations (like an LLM's)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    X = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 2 * mix)
    X *= torch.exp(torch.randn(cols, generator=g))  # per-channel scale spread
    for c in dead:
        X[:, c] = 0
    W = torch.randn(rows, cols, generator=g)
    H = 2 * X.t() @ X / tokens
    return W, H
