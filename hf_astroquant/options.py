"""Every option of `AstroQuantConfig`, stated once.

Each `Option` carries its group, default, value check (what is allowed, and values that must be
refused), help, whether it is saved in config.json, and how the shell types it. From this one
table come the config's keyword arguments, validation, `to_dict`, its docstring, the CLI's flags
and help, the options table in docs/options.md and the bad-value tests. A new option is one
`Option(...)` here (or in a subclass's ``OPTIONS``); rules between options live in
`config.check_combinations`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import (Boolean, Custom, Integer, Maybe, Number, OneOf, check_asym_alpha, check_dataset,
                     check_directory, check_module_patterns, check_tokenizer, shell_asym_alpha)
from .gguf.types import FILE_TYPES
from .modules.kernels import BACKENDS
from .online_rotation import ONLINE_ROTATIONS
from .unquantized_dtype import DTYPES as UNQUANTIZED_DTYPES

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_METHODS = ("rtn", "gptq", "gptaq", "rescomp")
SUPPORTED_ROUNDING = ("gptq", "successive", "beam")
SUPPORTED_TRANSFORMS = ("none", "rotate", "scale", "adaptive", "auto")
SUPPORTED_STATISTICS_DTYPES = ("float32", "float64")
SUPPORTED_UNQUANTIZED_DTYPES = tuple(UNQUANTIZED_DTYPES)
# Bounds on the options that scale a run's work or memory: generous (tens of times what anyone has
# measured a gain with), so they refuse only slips such as 10**6 before anything long starts.
MAX_WINDOWS = 65536  # calibration windows, and windows per batch
MAX_SEQLEN = 1 << 20  # tokens per calibration window
MAX_STEPS = 100_000  # optimizer steps (Astro, refinement)
MAX_CALIBRATION_TOKENS = 1 << 24  # n_samples × seqlen
GROUPS = {
    "grid": "What is quantized, and onto which grid",
    "solver": "How each weight matrix is solved",
    "calibration": "Calibration data",
    "preconditioning": "Preconditioning (before the solve)",
    "run": "Run and loading options (never saved in the checkpoint)",
}


@dataclass(frozen=True)
class Option:
    name: str
    group: str
    default: Any
    check: Any  # a check of `checks` (allowed text, bad examples, shell type)
    help: str  # one or two sentences, for the shell, the docstring and the options table
    detail: str = ""  # more, for the docstring and docs/options.md only
    saved: bool = True  # written to config.json (run and loading options are not)
    shell: dict = field(default_factory=dict)  # argparse settings over the check's own
    none_word: str = "none"  # how the shell types a None default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def argparse_kwargs(self) -> dict:
        return {**self.check.flag(), **self.shell}

    def shell_default(self) -> str:
        """The default as the user would type it."""
        if self.default is None:
            return self.none_word
        if isinstance(self.default, bool):
            return self.flag if self.default else "--no-" + self.flag[2:]
        return str(self.default)


OPTIONS: tuple[Option, ...] = (
    # ------------------------------------------------------------------ grid
    Option("bits", "grid", 4, OneOf(SUPPORTED_BITS), "weight bit width"),
    Option("group_size", "grid", 128,
           Integer(1, also=(-1,), text="-1 (one group per output channel) or a positive integer"),
           "input columns sharing one scale and zero point; -1: one group per output channel",
           "A size that does not divide a layer's width leaves a shorter last group."),
    Option("sym", "grid", False, Boolean(),
           "symmetric grid (zero point fixed at 2^(bits-1)) instead of asymmetric min/max"),
    Option("mse", "grid", None, Maybe(Boolean()),
           "search each group's clipping range for the smallest rounding error instead of plain min/max "
           "(slower; measured better with the calibrated methods, worse with rtn)",
           "None chooses by method: on for gptq, gptaq and rescomp, off for rtn (measured in "
           "docs/results.md#results). The value chosen is saved.",
           none_word="on, off with --method rtn"),
    Option("gguf_type", "grid", None, Maybe(OneOf(tuple(FILE_TYPES))),
           "solve every Linear onto exactly the grid of its tensor's type in this llama.cpp file type (the _S/_M/_L "
           "mixtures as llama.cpp chooses them), for `hf-astroquant export --format gguf`; replaces bits, "
           "group_size and sym",
           "Types: " + ", ".join(FILE_TYPES) + ". Each tensor's type follows llama.cpp's llama_tensor_get_type "
           "(a type higher for some attn_v/ffn_down/attn_output tensors; rows a K-quant's 256 columns do not tile "
           "fall back as llama.cpp does). The grid (fp16 factors, integer sub-block steps) is fitted up front, "
           "weighted by the Hessian's diagonal, with mse its search; the checkpoint stores the GGML blocks."),
    Option("modules_to_not_convert", "grid", None, Custom(check_module_patterns,
           "None or a list of module names/patterns (strings)", bad=("lm_head", [1], 3),
           shell=dict(nargs="+", metavar="PATTERN")),
           "modules kept in full precision: full names, dotted fragments (mlp.down_proj) or regexes; "
           "lm_head is always kept"),
    Option("unquantized_dtype", "grid", None, Maybe(OneOf(SUPPORTED_UNQUANTIZED_DTYPES), ("auto",)),
           "the dtype the checkpoint stores the unquantized tensors in (embeddings, lm_head, norms, routers); "
           "auto: the source checkpoint's (bfloat16 for most Hub models), whatever dtype calibration ran in",
           "The auto dtype is the floating dtype most of the source's tensors are stored in (read from its "
           "safetensors headers); a source without safetensors files (a GGUF file, a model built in memory) keeps "
           "the loaded dtype. Only narrowing is done. At the end of the run the in-memory values are rounded to "
           "that dtype too (their storage dtype stays), so a reload computes exactly what the quantized model did; "
           "a value beyond float16's range is refused by name. The resolved dtype is saved "
           "(hf_astroquant/unquantized_dtype.py).", none_word="auto"),
    # ------------------------------------------------------------------ solver
    Option("method", "solver", "gptq", OneOf(SUPPORTED_METHODS),
           "solver: rtn (round to nearest, no data), gptq, gptaq (fits the full-precision output; carries a "
           "full-precision stream) or rescomp (gptaq plus a residual toward the original weights; 3 bits and up)"),
    Option("desc_act", "solver", True, Boolean(),
           "act-order: solve columns by descending Hessian diagonal",
           "The column-to-group map is recorded in g_idx. Plain left-to-right GPTQ over-fits out-of-domain "
           "calibration data and measures worse than round-to-nearest (docs/results.md#results)."),
    Option("static_groups", "solver", True, Boolean(),
           "fit every group's grid up front on the original weights, so groups stay contiguous "
           "(needed by rounding beam and successive)"),
    Option("damp_percent", "solver", 0.01, Number(0, 1, low_open=True), "Hessian damping as a fraction of its "
           "mean diagonal",
           "Larger values hold the solver nearer round-to-nearest, fitting less to the calibration text; the W4 "
           "best preset uses 0.1 (measured in docs/results.md#w4-ten-times-the-damping)."),
    Option("true_sequential", "solver", True, Boolean(),
           "each Linear of a block sees the outputs of the already-quantized Linears before it; off: one "
           "full-precision pass per block"),
    Option("alpha", "solver", 0.25, Number(0, 1), "step scale of gptaq's P-term and rescomp's R-term "
           "(0.25 in the reference code)"),
    Option("asym_alpha", "solver", None, Custom(check_asym_alpha, "None, a number in [0, 1], 'auto' or 'projected'",
           bad=(1.5, "best", False, -0.5), shell=dict(type=shell_asym_alpha, metavar="{X,auto,projected,none}")),
           "interpolation of the target X + a*dX: a number in [0, 1], auto or projected (chosen per layer), or "
           "none (0 for gptq, 1 for gptaq/rescomp)",
           "For gptq the interpolated target shifts the weights solved for (W_ref); for gptaq/rescomp it scales "
           "D = 2*dX*X^T/N in the P-term. Any value other than None/0 carries the full-precision stream; 0 "
           "carries none (gptaq is then GPTQ, rescomp GPTQ plus ResComp's residual)."),
    Option("rounding", "solver", "gptq", OneOf(SUPPORTED_ROUNDING),
           "gptq (greedy sweep), beam (beam_width candidates per row) or successive (reverse-order decoding "
           "toward the target; method gptq only)",
           "beam and successive fit every grid up front (static_groups); successive decodes in act-order."),
    Option("beam_width", "solver", 4, Integer(1, maximum=64), "partial solutions kept per row with rounding beam (1 = greedy)"),
    Option("fp_samples", "solver", None, Maybe(Integer(1, maximum=MAX_WINDOWS), ("all",)),
           "asymmetric solvers: how many calibration windows (the first) also run through the full-precision "
           "blocks; fewer save time and memory, at the price of a noisier D",
           none_word="all"),
    Option("block_size", "solver", 128, Integer(1, maximum=65536), "GPTQ lazy-batch width (speed only; results do not change)"),
    Option("refine_steps", "solver", 0, Integer(0, maximum=MAX_STEPS),
           "after each block is solved, Adam steps that tune its layers' scales toward the block's full-precision "
           "output (0: off)",
           "Codes and zero points stay as solved, so the packed format is unchanged; the tuned scales are kept "
           "only where they lower the block's output error over the calibration windows. The target is the "
           "full-precision stream's output when the solver carries one (gptaq, rescomp, asym_alpha), else the "
           "full-precision block's output on the same inputs. Each step runs the block forward and backward on "
           "refine_batch_size windows. It pays at 2 and 3 bits, not at 4 (measured in "
           "docs/results.md#block-output-refinement). With refine_rounding_lr too, see that option."),
    Option("refine_lr", "solver", 5e-3, Number(0, 1, low_open=True), "Adam's learning rate for refine_steps "
           "(on the log of each scale)",
           "The default is the best of 1e-3, 5e-3 and 1e-2 with 50 steps at W2 g32 (measured in "
           "docs/results.md#block-output-refinement)."),
    Option("refine_batch_size", "solver", 8, Integer(1, maximum=MAX_WINDOWS), "calibration windows per refine step"),
    Option("refine_rounding_lr", "solver", 0.0, Number(0, 1), "with refine_steps: Adam's learning rate for each "
           "weight's rounding offset, so a code may move one level from the solved one (0: codes stay as solved)",
           "The code used is clamp(round(x + r), 0, 2^bits - 1), where x is the value the solver rounded (in levels: "
           "GPTQ's updated weight) and the offset r starts at 0 and stays in [-0.5, 0.5] as in AutoRound, so a code "
           "moves at most one level, first where the solver's decision was nearest a tie; the rounding's gradient "
           "passes straight through. Only the greedy sweep (rounding='gptq') records x, so the other roundings "
           "are refused, and experts rounded to nearest for want of tokens keep their codes. The packed format "
           "does not change. At 5e-3 it lowers the perplexity at 2 and 3 bits, not at 4, where the block's error "
           "falls but WikiText-2's perplexity does not (measured in docs/results.md#block-output-refinement)."),
    # ------------------------------------------------------------------ calibration
    Option("dataset", "calibration", None, Custom(check_dataset, "a list of strings, a list of token-id lists, "
           "a 2-D tensor of token ids, a text file path, a datasets.Dataset with a text column, or one of "
           "'wikitext2', 'c4'", bad=(12, {"text": "a"}), shell=dict(metavar="{wikitext2,c4,FILE}")),
           "calibration text: a local text file, or wikitext2 / c4 from the Hugging Face Hub (needs the network)",
           "From Python also a list of strings, token-id windows (a list of lists or a 2-D tensor, used as "
           "given) or a datasets.Dataset with a text column.", saved=False),
    Option("tokenizer", "calibration", None, Custom(check_tokenizer, "None, a tokenizer, or a tokenizer name or path",
           bad=(12, 1.5), shell=dict(metavar="NAME_OR_DIR")),
           "tokenizer for text calibration data (a Hub id or a directory; default: the model's)", none_word="MODEL's",
           saved=False),
    Option("n_samples", "calibration", 128, Integer(1, maximum=MAX_WINDOWS), "calibration windows drawn from text data"),
    Option("seqlen", "calibration", 2048, Integer(1, maximum=MAX_SEQLEN), "tokens per calibration window"),
    Option("seed", "calibration", 0, Integer(0),
           "seed for drawing the calibration windows, the random rotations (transform, online_rotation) and the "
           "refinement's batches"),
    Option("calibration_batch_size", "calibration", None, Maybe(Integer(1, maximum=MAX_WINDOWS), ("auto",)),
           "windows per forward pass; auto: all at once when they fit a 4 GiB activation budget", none_word="auto"),
    Option("statistics_dtype", "calibration", None, Maybe(OneOf(SUPPORTED_STATISTICS_DTYPES), ("auto",)),
           "the dtype H, D and G are summed in; float64 makes the result independent of how the windows are split "
           "into batches and ranks; auto: float64 under torch.distributed, float32 in one process",
           "Each product and every sum is in float64 and H is rounded to float32 once, so a split of the windows "
           "changes H only where float64 rounding crosses a float32 boundary (practically never); in float32 the "
           "order of the sums changes H's last bits, which GPTQ's act-order can amplify into other codes "
           "(measured in docs/scaling.md). float64 costs more time for the statistics (measured in the same table), "
           "and much more on GPUs without fast float64.", none_word="auto"),
    Option("calibrate_all_experts", "calibration", False, Boolean(),
           "mixture-of-experts models: every expert's statistics over every calibration token (the block's output "
           "still mixes the routed experts only); off: each expert sees the tokens routed to it",
           "On costs about num_experts/top_k times the expert compute during calibration; measured on a small "
           "trained MoE it never helped (docs/big-models.md#mixture-of-experts-the-calibration-options)."),
    Option("min_expert_tokens", "calibration", 16, Integer(0),
           "mixture-of-experts models: an expert that saw fewer calibration tokens is rounded to nearest instead "
           "of solved (listed in the report and the model card); one that saw none always is",
           "Measured from 0 to 256 on a small trained MoE: no effect above the calibration-seed noise "
           "(docs/big-models.md#mixture-of-experts-the-calibration-options); 16 keeps near-empty Hessians out "
           "of the solver."),
    # ------------------------------------------------------------------ preconditioning
    Option("astro", "preconditioning", False, Boolean(),
           "Astro: reshape each Linear's weights, inside the flat region of its objective, toward weights that "
           "round with less error, before it is solved",
           "Proximal gradient on H only (algorithms/astro.py); the checkpoint format and inference are unchanged."),
    Option("astro_beta", "preconditioning", 1.0, Number(0), "weight of Astro's group-extent term (0 turns it off)",
           "1 trades the reshaping error against GPTQ's predicted rounding error exactly."),
    Option("astro_steps", "preconditioning", 25, Integer(1, maximum=MAX_STEPS), "FISTA steps of Astro's proximal gradient"),
    Option("astro_lr", "preconditioning", 1.0, Number(0, 1, low_open=True), "Astro's step size as a fraction of 1/L"),
    Option("transform", "preconditioning", "none", OneOf(SUPPORTED_TRANSFORMS),
           "transforms folded into the weights before calibration: rotate, scale, adaptive (per site, "
           "chosen by weight kurtosis), or auto (rotate where it folds exactly into the model, else scale)",
           "rotate: an orthogonal rotation of the residual stream (norm weights folded into the next Linears) "
           "plus a per-head rotation of value/output; scale: per-channel scales searched on activation "
           "statistics; adaptive: per site, rotation or scales by the robust z-score of the weights' kurtosis; "
           "auto (the balanced and best presets): the rotation where it folds exactly, else the scales (post-norm "
           "families: Gemma 2/3, OLMo 2, GLM-4; multimodal projectors), else none (offloaded blocks, or scales "
           "with method='rtn'), the choice and its reason recorded in the report and the card. Each site's "
           "choice is recorded in the saved config (transforms_applied). Which families each folds into, and why "
           "the others are refused: docs/families.md."),
    Option("online_rotation", "preconditioning", "none", OneOf(ONLINE_ROTATIONS),
           "down: each MLP's output projection (down_proj) reads its input rotated online, by a randomized "
           "Kronecker-Hadamard matrix, so its weights and activations lose their outlier channels; writers: "
           "the attention's output projection (o_proj) too",
           "The weight W·R is quantized and the packed layer computes (x·R)·(W·R)ᵀ, at m + a + b multiply-adds "
           "per input element for a width m·a·b (hf_astroquant/online_rotation.py). Served by transformers "
           "(from_pretrained); the GPTQ, compressed-tensors and GGUF exports refuse such a checkpoint. Routed "
           "experts are not rotated. transform='rotate' cannot fold these: no rotation passes act(gate)·up, and "
           "its value/output rotation stays within each head."),
    Option("kurtosis_threshold_attn", "preconditioning", 1.0, Number(text="a finite number (a robust z-score)"),
           "transform adaptive: kurtosis z-score above which an attention site gets rotation instead of scales"),
    Option("kurtosis_threshold_mlp", "preconditioning", 1.0, Number(text="a finite number (a robust z-score)"),
           "transform adaptive: the same for MLP sites (above it down_proj gets nothing)"),
    # ------------------------------------------------------------------ run
    Option("backend", "run", "auto", OneOf(BACKENDS),
           "forward path of the packed layers: auto (the fastest that runs each layer), reference, int4, int8 "
           "or triton",
           "A loading option: pass AstroQuantConfig(backend=...) to from_pretrained of a saved model to "
           "override it.", saved=False),
    Option("resume_dir", "run", None, Custom(check_directory, "None or a directory path", bad=(3, ""),
           shell=dict(metavar="DIR")),
           "checkpoint every finished block here; a rerun with the same directory continues after a crash, "
           "bit for bit", saved=False),
)


def options_table(options: tuple[Option, ...] = OPTIONS, detail: bool = False) -> str:
    """The options as a Markdown table, grouped: name, shell flag, default, allowed values, help."""
    lines = ["| option | flag | default | allowed | what it does |", "|---|---|---|---|---|"]
    for group, title in GROUPS.items():
        members = [o for o in options if o.group == group]
        if members:
            lines.append(f"| **{title}** | | | | |")
        for o in members:
            text = f"{o.help}. {o.detail}" if detail and o.detail else o.help
            cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731 - a Markdown cell
            lines.append(f"| `{o.name}` | `{o.flag}` | `{o.default!r}` | {cell(o.check.allowed)} | {cell(text)} |")
    return "\n".join(lines)
