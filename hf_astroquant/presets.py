"""Measured presets: `AstroQuantConfig.recommended(bits, quality)` and the CLI's ``--preset``.

Each preset is exactly one configuration of the benchmark grid (`benchmarks/bench_quality.py`, the
row named here), measured on SmolLM2-135M by the shared protocol; docs/results.md lists its
perplexity and time, rendered from benchmarks/results/ by `benchmarks/update_readme.py`.

    fast      GPTQ with act-order, static groups and the clipping search (the defaults): runs on
              every model family
    balanced  adds the residual-stream rotation where it folds (GPTAQ at 2 bits), about as fast as fast
    best      the lowest perplexity we measured at that width in no more than AutoRound's time:
              GPTAQ behind the residual rotation, Astro and an online rotation of the output
              projections' input (online_rotation: down_proj's, at 4 bits o_proj's too); at 4 bits
              ten times the Hessian damping (damp_percent=0.1: less compensation fitted to the
              calibration text); at 3 and 2 bits block-output tuning of the scales and rounding
              (refine_steps, refine_rounding_lr)

balanced and best ask for transform="auto": the residual rotation they were measured with, where it
folds exactly into the model (every pre-norm family), and per-channel scales where it does not (the
post-norm families Gemma 2/3, OLMo 2, GLM-4, and multimodal projectors: docs/families.md); the choice
and its reason are in the report and the card, never an error. On the benchmark's model (a pre-norm
Llama) "auto" is the rotation, so each preset is still exactly its measured row. The online rotation
of best is served by transformers only: the exports refuse it (best with online_rotation="none" exports).

With gguf_type a preset becomes what a GGUF file holds: no online rotation and no refinement
(GGUF_UNSERVED), what GGUF_CHANGED names measured for llama.cpp, and for "auto" per-channel scales
instead of the residual rotation where the input and output embeddings are tied (the rotation would
store lm_head a second time: a file larger than llama.cpp's of the same type). The CLI takes the
preset's width from the GGUF type (`gguf_preset_bits`). Measured in llama.cpp by
benchmarks/bench_gguf.py (rows `preset-TYPE`).
"""

from __future__ import annotations

from typing import Any

QUALITIES = ("fast", "balanced", "best")
PRESET_BITS = (2, 3, 4)
_GRID = dict(sym=False, damp_percent=0.01, desc_act=True, static_groups=True, mse=True)

# (quality, bits): (options, the bench_quality row that measured exactly these options)
PRESETS: dict[tuple[str, int], tuple[dict[str, Any], str]] = {
    ("fast", 4): (dict(bits=4, group_size=64, method="gptq"), "gptq-w4"),
    ("fast", 3): (dict(bits=3, group_size=64, method="gptq"), "gptq-w3"),
    ("fast", 2): (dict(bits=2, group_size=32, method="gptq"), "gptq-w2"),
    ("balanced", 4): (dict(bits=4, group_size=64, method="gptq", transform="auto"), "gptq-rotate-w4"),
    ("balanced", 3): (dict(bits=3, group_size=64, method="gptq", transform="auto"), "gptq-rotate-w3"),
    ("balanced", 2): (dict(bits=2, group_size=32, method="gptaq", transform="auto"), "gptaq-rotate-w2"),
    ("best", 4): (dict(bits=4, group_size=64, method="gptaq", transform="auto", astro=True,
                       online_rotation="writers", damp_percent=0.1), "gptaq-rotate-astro-w4-writers-damp0.1"),
    ("best", 3): (dict(bits=3, group_size=64, method="gptaq", transform="auto", astro=True, online_rotation="down",
                       refine_steps=25, refine_rounding_lr=5e-3), "gptaq-rotate-astro-w3-online-refine25-rounding"),
    ("best", 2): (dict(bits=2, group_size=32, method="gptaq", transform="auto", astro=True, online_rotation="down",
                       refine_steps=25, refine_rounding_lr=5e-3), "gptaq-rotate-astro-w2-online-refine25-rounding"),
}


# What a GGUF file cannot hold, and what a preset uses in its place there: llama.cpp runs no online
# rotation of a layer's input, and the block-output refinement tunes the GPTQ-style grid's scales (GGUF
# blocks keep their own). The folded residual rotation (per-channel scales where the embeddings are tied:
# transform="auto", folding.choose_transform), the solver and Astro stay.
GGUF_UNSERVED = {"online_rotation": "none", "refine_steps": 0, "refine_rounding_lr": 0.0}
# What a preset changes for a GGUF file, measured in llama.cpp (docs/serving.md#what-best-becomes-in-a-gguf-file):
# best's ten-fold damping at 4 bits goes with its online rotation; on the GGUF grids without it, Q4_0's
# perplexity was higher than with the default damping.
GGUF_CHANGED: dict[tuple[str, int], dict[str, Any]] = {
    ("best", 4): {"damp_percent": 0.01},
}


def preset_options(bits: Any, quality: Any) -> dict[str, Any]:
    """The options of one preset; a ValueError names a bad `bits` or `quality` and what is allowed."""
    if quality not in QUALITIES or not isinstance(quality, str):
        raise ValueError(f"AstroQuantConfig.recommended: quality={quality!r} is not valid; allowed: "
                         + ", ".join(map(repr, QUALITIES)))
    if type(bits) is not int or bits not in PRESET_BITS:
        raise ValueError(f"AstroQuantConfig.recommended: bits={bits!r} is not valid; allowed: "
                         f"{', '.join(map(str, PRESET_BITS))} (the widths the presets were measured at; for 8 bits "
                         "use AstroQuantConfig(bits=8))")
    options, _row = PRESETS[(quality, bits)]
    return {**_GRID, **options}


def gguf_preset_bits(gguf_type: str) -> int:
    """The preset width for a GGUF file type: its main tensor type's code width, within the presets' 2 to 4
    (Q2_K: 2, Q3_K_M: 3, Q4_0 and every wider type: 4)."""
    from .gguf.types import FILE_TYPES, TENSOR_TYPES

    if gguf_type not in FILE_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is not valid; allowed: {', '.join(FILE_TYPES)}")
    return min(max(PRESET_BITS), max(min(PRESET_BITS), TENSOR_TYPES[FILE_TYPES[gguf_type][0]].bits))
