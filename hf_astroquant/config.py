"""`AstroQuantConfig`: every option of the plugin, validated on construction.

The config is what transformers stores in ``config.json`` under ``quantization_config``;
``to_dict()`` is JSON-safe and leaves calibration data (texts, token windows, tokenizer) out.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .modules.kernels import BACKENDS

QUANT_METHOD = "astroquant"
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_METHODS = ("rtn", "gptq", "gptaq", "rescomp")
SUPPORTED_ROUNDING = ("gptq", "successive", "beam")
ASYM_ALPHA_CHOICES = ("auto", "projected")
SUPPORTED_TRANSFORMS = ("none", "rotate", "scale", "adaptive")
CHECKPOINT_FORMAT = "astroquant_v1"  # GPTQ int32 layout, true (not minus-one) zero points

# Keys that `to_dict()` emits besides the constructor options; accepted back by `__init__`.
_RECORD_KEYS = ("quant_method", "checkpoint_format", "calibration", "quantized_modules", "transforms_applied")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"AstroQuantConfig: {name}={value!r} is not valid; allowed: {allowed}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, f"an integer{'' if minimum is None else f' >= {minimum}'}")
    if minimum is not None and value < minimum:
        _fail(name, value, f"an integer >= {minimum}")


def _check_number(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    """A real number (not a bool) for which `ok` holds, as a float; else the error naming `allowed`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        _fail(name, value, allowed)
    return float(value)


class AstroQuantConfig(QuantizationConfigMixin):
    """Configuration of an hf_astroquant quantization run (or of a pre-quantized checkpoint).

    Args:
        bits: weight bit width, one of 2, 3, 4, 8.
        group_size: input columns sharing one scale/zero; -1 means one group per output channel.
            A size that does not divide ``in_features`` leaves a shorter last group.
        sym: symmetric grid (zero point fixed at 2^(bits-1)) instead of asymmetric min/max.
        desc_act: act-order: quantize columns by descending Hessian diagonal; the column to group
            map is recorded in ``g_idx``.
        static_groups: with ``desc_act``, fix every group's scale/zero up front on the original
            weights, so groups stay contiguous in the original column order.
        damp_percent: Hessian damping, as a fraction of the mean of its diagonal.
        true_sequential: quantize the Linears of a block in execution order, each seeing inputs
            from the already-quantized Linears before it; False uses one full-precision pass.
        method: "rtn" (round to nearest, data-free), "gptq", "gptaq" (asymmetric calibration: the
            quantized layer fed the quantized model's inputs is fitted to the full-precision
            output) or "rescomp" (GPTAQ plus the compensation-aware residual that pulls every step
            back toward the original weights; at 2 bits it runs GPTAQ, which measured better
            there). gptaq/rescomp carry the full-precision stream.
        alpha: step scale of GPTAQ's P-term and ResComp's R-term (0.25 in the reference code).
        asym_alpha: interpolation between the symmetric (0) and asymmetric (1) targets,
            X_α = X + α·ΔX: None (0 for gptq, 1 for gptaq/rescomp), a number in [0, 1], "auto"
            (per layer, the closed form α* clamped to [0, 1]) or "projected" (per layer, the share
            of the mismatch W·ΔX that the layer can reach). Any value other than None/0 carries
            the full-precision stream, with every method; 0 carries none: gptaq is then GPTQ and
            rescomp GPTQ plus ResComp's residual alone (the pull toward the original weights).
        rounding: "gptq" (greedy column sweep), "beam" (bounded search: `beam_width` partial
            solutions per output row, every grid level a candidate; grids fitted up front) or
            "successive" (Cholesky-of-H reverse-order decoding toward the (shifted) target;
            method "gptq" only; grids fitted up front).
        beam_width: K, the partial solutions kept per row with rounding="beam" (1 = greedy).
        fp_samples: with the asymmetric solvers (gptaq, rescomp, or any asym_alpha): how many
            of the calibration windows also run through the full-precision blocks. D =
            2·ΔX·Xᵀ/N is averaged over those windows only; H always uses them all. None: every
            window. Fewer windows cut the full-precision forward, D's cost and the stream's
            memory in proportion, at the price of a noisier D.
        mse: search a per-group clipping range that minimizes the rounding error (GPTQ's `mse`
            grid option) instead of plain min/max.
        dataset: calibration data: a list of strings, token-id windows (list of lists or a 2-D
            tensor, used as given), a local text file path, a `datasets.Dataset` with a text
            column, or the names "wikitext2" / "c4" (downloaded through `datasets`).
        tokenizer: a tokenizer (or a name/path for `AutoTokenizer`) for text calibration data.
        n_samples: number of calibration windows drawn from text data.
        seqlen: tokens per calibration window.
        seed: seed for drawing calibration windows.
        modules_to_not_convert: modules left in full precision: a full name, a dotted fragment of
            one ("mlp.down_proj", "layers.0.self_attn") or a regex; the output embedding
            (lm_head) is always kept.
        block_size: lazy-batch width of the GPTQ solver (columns updated together).
        calibration_batch_size: windows per forward pass during calibration; None picks the
            largest that fits a memory budget (one pass over everything when it fits).
        backend: forward path of the packed layers: "auto" (the fastest kernel that can run each
            layer on its device), "reference" (de-quantize then matmul), "int4" (PyTorch's int4
            kernels, 2/3/4 bits), "int8" (PyTorch's int8 kernel on CPU, 8 bits, one group per
            row) or "triton" (our Triton kernel on CUDA, any bit width and group layout). A
            loading option: never written to the checkpoint; pass `AstroQuantConfig(backend=...)`
            to `from_pretrained` of a saved model to override it.
        resume_dir: a directory where every finished block is checkpointed (atomically); a run
            given a directory that holds an interrupted run of the same model, options and data
            starts after its last finished block and gives the same result bit for bit. A run
            option: never written to the checkpoint.
        astro: Astro preconditioning: before each Linear is solved, move its weights inside the
            flat region of its reconstruction objective toward weights whose quantization groups
            have small extents where rounding errors cost the most (proximal gradient on H only;
            see `algorithms/astro.py`). The checkpoint format and inference are unchanged.
        astro_beta: weight of Astro's group-extent term (β ≥ 0); 1 trades the reshaping error
            against GPTQ's predicted rounding error exactly; 0 disables the reshaping.
        astro_steps: FISTA steps of Astro's proximal gradient in the Jacobi metric diag(H) (≥ 1).
        astro_lr: step size of those steps as a fraction of 1/L (L the gradient's Lipschitz
            constant), in (0, 1].
        transform: zero-cost transforms folded into the weights before calibration: "none",
            "rotate" (an orthogonal rotation of the residual stream with the RMSNorm weights
            folded into the next Linears, plus a per-head rotation of value/output), "scale"
            (per-channel scales searched on activation statistics, folded into the preceding
            norm or Linear) or "adaptive" (per site, rotation or scales chosen by the robust
            z-score of the weights' kurtosis). Each site's choice is recorded in the saved config
            (`transforms_applied`).
        kurtosis_threshold_attn: with transform="adaptive", the robust z-score of weight kurtosis
            above which an attention site (q/k/v input, value/output) gets rotation only (the
            residual rotation; the per-head rotation for value/output); at or below it, scales.
        kurtosis_threshold_mlp: the same for MLP sites: above it gate/up keep the residual
            rotation only and down_proj (where no rotation folds) gets nothing; at or below, scales.
        solve_devices: spread the Linears that share one input (q/k/v, gate/up) over devices and
            solve them in parallel: None (solve where the block is), a list of devices
            (["cuda:0", "cuda:1"]) or "auto" (the accelerators in the model's device_map). Results
            can differ in rounding from one device type to another. A run option: never written to
            the checkpoint.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        desc_act: bool = False,
        static_groups: bool = False,
        damp_percent: float = 0.01,
        true_sequential: bool = True,
        method: str = "gptq",
        mse: bool = False,
        alpha: float = 0.25,
        asym_alpha: float | str | None = None,
        rounding: str = "gptq",
        beam_width: int = 4,
        fp_samples: int | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        n_samples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        block_size: int = 128,
        calibration_batch_size: int | None = None,
        backend: str = "auto",
        resume_dir: str | os.PathLike | None = None,
        solve_devices: list[str] | str | None = None,
        astro: bool = False,
        astro_beta: float = 1.0,
        astro_steps: int = 25,
        astro_lr: float = 1.0,
        transform: str = "none",
        kurtosis_threshold_attn: float = 1.0,
        kurtosis_threshold_mlp: float = 1.0,
        **kwargs: Any,
    ):
        unknown = sorted(set(kwargs) - set(_RECORD_KEYS))
        if unknown:
            raise TypeError(
                f"AstroQuantConfig got unknown option(s) {unknown}; known options: "
                f"{sorted(self._option_names())}"
            )
        quant_method = kwargs.get("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            _fail("quant_method", quant_method, repr(QUANT_METHOD))
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.desc_act = desc_act
        self.static_groups = static_groups
        self.damp_percent = damp_percent
        self.true_sequential = true_sequential
        self.method = method
        self.mse = mse
        self.alpha = alpha
        self.asym_alpha = asym_alpha
        self.rounding = rounding
        self.beam_width = beam_width
        self.fp_samples = fp_samples
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.n_samples = n_samples
        self.seqlen = seqlen
        self.seed = seed
        self.modules_to_not_convert = modules_to_not_convert
        self.block_size = block_size
        self.calibration_batch_size = calibration_batch_size
        self.backend = backend
        self.resume_dir = resume_dir
        self.solve_devices = solve_devices
        self.astro = astro
        self.astro_beta = astro_beta
        self.astro_steps = astro_steps
        self.astro_lr = astro_lr
        self.transform = transform
        self.kurtosis_threshold_attn = kurtosis_threshold_attn
        self.kurtosis_threshold_mlp = kurtosis_threshold_mlp
        self.transforms_applied = kwargs.get("transforms_applied")
        self.checkpoint_format = kwargs.get("checkpoint_format", CHECKPOINT_FORMAT)
        # Filled in after calibration: what data was used, which modules were packed.
        self.calibration = kwargs.get("calibration")
        self.quantized_modules = kwargs.get("quantized_modules")
        self.post_init()

    @staticmethod
    def _option_names() -> list[str]:
        import inspect

        return [p for p in inspect.signature(AstroQuantConfig.__init__).parameters if p not in ("self", "kwargs")]

    def post_init(self) -> None:
        """Validate every option; raise ValueError naming the bad value and what is allowed."""
        if type(self.bits) is not int or self.bits not in SUPPORTED_BITS:
            _fail("bits", self.bits, ", ".join(map(str, SUPPORTED_BITS)))
        _check_int("group_size", self.group_size)
        if self.group_size != -1 and self.group_size < 1:
            _fail("group_size", self.group_size, "-1 (one group per output channel) or a positive integer")
        for name in ("sym", "desc_act", "static_groups", "true_sequential", "mse"):
            _check_bool(name, getattr(self, name))
        self.damp_percent = _check_number("damp_percent", self.damp_percent, "a number in (0, 1]", lambda v: 0 < v <= 1)
        if self.method not in SUPPORTED_METHODS:
            _fail("method", self.method, ", ".join(repr(m) for m in SUPPORTED_METHODS))
        self.alpha = _check_number("alpha", self.alpha, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        a = self.asym_alpha
        if isinstance(a, str):
            if a not in ASYM_ALPHA_CHOICES:
                _fail("asym_alpha", a, "None, a number in [0, 1], 'auto' or 'projected'")
        elif a is not None:
            self.asym_alpha = _check_number("asym_alpha", a, "None, a number in [0, 1], 'auto' or 'projected'",
                                            lambda v: 0 <= v <= 1)
        if self.rounding not in SUPPORTED_ROUNDING:
            _fail("rounding", self.rounding, ", ".join(repr(r) for r in SUPPORTED_ROUNDING))
        _check_int("beam_width", self.beam_width, 1)
        if self.rounding == "successive" and self.method not in ("gptq", "rtn"):
            _fail("rounding", self.rounding, f"'gptq' or 'beam' with method={self.method!r} ('successive' decodes "
                  "toward a fixed target: use method='gptq' with asym_alpha for the asymmetric target)")
        if self.method == "rtn" and (self.asym_alpha not in (None, 0.0) or self.rounding != "gptq"):
            _fail("method", self.method, "'gptq', 'gptaq' or 'rescomp' when asym_alpha or rounding is set "
                  "(round-to-nearest uses no calibration data)")
        if self.fp_samples is not None:
            _check_int("fp_samples", self.fp_samples, 1)
            if not self.solver_options().needs_fp_stream:
                _fail("fp_samples", self.fp_samples, f"None with method={self.method!r} and asym_alpha="
                      f"{self.asym_alpha!r} (only the asymmetric solvers carry the full-precision stream)")
        _check_int("n_samples", self.n_samples, 1)
        _check_int("seqlen", self.seqlen, 1)
        _check_int("seed", self.seed, 0)
        _check_int("block_size", self.block_size, 1)
        if self.calibration_batch_size is not None:
            _check_int("calibration_batch_size", self.calibration_batch_size, 1)
        mtnc = self.modules_to_not_convert
        if mtnc is not None:
            if isinstance(mtnc, str) or not isinstance(mtnc, (list, tuple)) or not all(isinstance(m, str) for m in mtnc):
                _fail("modules_to_not_convert", mtnc, "None or a list of module names/patterns (strings)")
            self.modules_to_not_convert = list(mtnc)
        if self.resume_dir is not None:
            if not isinstance(self.resume_dir, (str, os.PathLike)) or not os.fspath(self.resume_dir):
                _fail("resume_dir", self.resume_dir, "None or a directory path")
            self.resume_dir = os.fspath(self.resume_dir)
        self._check_solve_devices()
        self._check_preconditioning()
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, ", ".join(repr(b) for b in BACKENDS))
        if self.checkpoint_format != CHECKPOINT_FORMAT:
            _fail("checkpoint_format", self.checkpoint_format, repr(CHECKPOINT_FORMAT))
        if self.dataset is not None:
            _check_dataset_type(self.dataset)
        if self.tokenizer is not None and not isinstance(self.tokenizer, (str, os.PathLike)) \
                and not callable(self.tokenizer):
            _fail("tokenizer", type(self.tokenizer).__name__, "None, a tokenizer, or a tokenizer name or path")

    def _check_preconditioning(self) -> None:
        _check_bool("astro", self.astro)
        self.astro_beta = _check_number("astro_beta", self.astro_beta, "a finite number >= 0",
                                        lambda v: 0 <= v < math.inf)
        _check_int("astro_steps", self.astro_steps, 1)
        self.astro_lr = _check_number("astro_lr", self.astro_lr, "a number in (0, 1]", lambda v: 0 < v <= 1)
        if self.astro and self.method == "rtn":
            _fail("astro", self.astro, "False with method='rtn' (Astro needs the calibration Hessian)")
        if self.transform not in SUPPORTED_TRANSFORMS:
            _fail("transform", self.transform, ", ".join(repr(t) for t in SUPPORTED_TRANSFORMS))
        if self.transform in ("scale", "adaptive") and self.method == "rtn":
            _fail("transform", self.transform, "'none' or 'rotate' with method='rtn' (scales are searched on "
                  "calibration activations)")
        for name in ("kurtosis_threshold_attn", "kurtosis_threshold_mlp"):
            setattr(self, name, _check_number(name, getattr(self, name), "a finite number (a robust z-score)",
                                              math.isfinite))

    def _check_solve_devices(self) -> None:
        import torch

        sd = self.solve_devices
        allowed = "None, 'auto', or a non-empty list of devices such as ['cuda:0', 'cuda:1']"
        if sd is None or sd == "auto":
            return
        if isinstance(sd, (list, tuple)) and list(sd) == ["auto"]:  # the CLI's --solve-devices auto
            self.solve_devices = "auto"
            return
        if isinstance(sd, str) or not isinstance(sd, (list, tuple)) or not sd:
            _fail("solve_devices", sd, allowed)
        for d in sd:
            try:
                if not isinstance(d, str):
                    raise TypeError
                torch.device(d)
            except (TypeError, RuntimeError):
                _fail("solve_devices", sd, allowed)
        self.solve_devices = list(sd)

    @property
    def needs_calibration_data(self) -> bool:
        return self.method != "rtn"

    def solver_options(self):
        """The options of the layer solver (`algorithms.solve.SolverOptions`)."""
        from .algorithms.solve import SolverOptions

        return SolverOptions(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act,
                             static_groups=self.static_groups, damp_percent=self.damp_percent,
                             block_size=self.block_size, mse=self.mse, method=self.method, alpha=self.alpha,
                             asym_alpha=self.asym_alpha, rounding=self.rounding, beam_width=self.beam_width,
                             astro=self.astro, astro_beta=self.astro_beta, astro_steps=self.astro_steps,
                             astro_lr=self.astro_lr)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for config.json: options and records, never the calibration data."""
        out: dict[str, Any] = {"quant_method": QUANT_METHOD}
        for name in self._option_names():
            if name in ("dataset", "tokenizer", "backend", "resume_dir", "solve_devices"):  # data, loading/run options
                continue
            out[name] = getattr(self, name)
        for name in _RECORD_KEYS:
            out[name] = getattr(self, name)
        return out

    def get_loading_attributes(self) -> dict[str, Any]:
        """Options that apply when loading a saved model (transformers copies them over the saved config)."""
        return {"backend": self.backend}

    def to_diff_dict(self) -> dict[str, Any]:
        default = AstroQuantConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or default.get(k) != v}

    def __repr__(self) -> str:
        return f"AstroQuantConfig({self.to_json_string(use_diff=False).strip()})"


def _check_dataset_type(dataset: Any) -> None:
    """Shallow type check at construction time; the contents are checked when calibration runs."""
    import torch

    if isinstance(dataset, (str, os.PathLike, torch.Tensor, list, tuple)):
        return
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            return
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    _fail(
        "dataset",
        type(dataset).__name__,
        "a list of strings, a list of token-id lists, a 2-D tensor of token ids, a text file path, "
        "a datasets.Dataset with a text column, or one of 'wikitext2', 'c4'",
    )
