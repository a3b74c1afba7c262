"""`AstroQuantConfig`: every option of the plugin (`options.OPTIONS`), validated on construction.

The config is what transformers stores in ``config.json`` under ``quantization_config``;
``to_dict()`` is JSON-safe and leaves calibration data (texts, token windows, tokenizer) and the
run options out. The keyword arguments, their checks, the docstring, the CLI flags and the
options table all come from ``OPTIONS``; a subclass adds an option by extending it.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .checks import Invalid
from .options import GROUPS, MAX_CALIBRATION_TOKENS, OPTIONS, Option

QUANT_METHOD = "astroquant"
CHECKPOINT_FORMAT = "astroquant_v1"  # GPTQ int32 layout, true (not minus-one) zero points
# ResComp's residual pulls every column toward W0 by more than a 2-bit grid can follow: measured
# worse than GPTAQ there (docs/results.md#asymmetric-calibration), as its reference code finds.
RESCOMP_MIN_BITS = 3
# The options a GGUF type fixes per tensor, which must stay at their defaults beside gguf_type.
GGUF_FIXED = ("bits", "group_size", "sym")

# Keys that `to_dict()` emits besides the options; accepted back by `__init__`.
RECORD_KEYS = ("quant_method", "checkpoint_format", "calibration", "quantized_modules", "transforms_applied",
                "gguf_tensor_types", "checkpoint_names", "input_rotated_modules", "preset")
# Options of earlier versions, still found in saved configs: read and dropped. (rotation_candidates chose a
# rotation per layer; the checkpoint stores each layer's rotation, so such files load as before.)
RETIRED_OPTIONS = ("rotation_candidates",)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"AstroQuantConfig: {name}={value!r} is not valid; allowed: {allowed}")


def _docstring(options: tuple[Option, ...]) -> str:
    lines = ["Configuration of an hf_astroquant quantization run (or of a pre-quantized checkpoint).", "",
             "Every option is a keyword argument; `AstroQuantConfig.recommended(bits, quality)` gives a measured "
             "preset.", ""]
    for group, title in GROUPS.items():
        members = [o for o in options if o.group == group]
        if members:
            lines += [f"{title}:", ""]
            for o in members:
                text = f"{o.help}. {o.detail}".strip() if o.detail else o.help
                lines.append(f"    {o.name} (default {o.default!r}; {o.check.allowed}): {text}")
            lines.append("")
    return "\n".join(lines)


class AstroQuantConfig(QuantizationConfigMixin):
    OPTIONS: tuple[Option, ...] = OPTIONS

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        _describe(cls)

    def __init__(self, **kwargs: Any):
        names = self._option_names()
        if "solve_devices" in kwargs:
            raise TypeError(f"{type(self).__name__}: solve_devices was retired in 0.3.0; calibrate on several devices "
                            "with torch.distributed instead: torchrun --nproc-per-node N hf-astroquant quantize ... "
                            "(docs/scaling.md)")
        unknown = sorted(set(kwargs) - set(names) - set(RECORD_KEYS) - set(RETIRED_OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; known options: {sorted(names)}")
        quant_method = kwargs.get("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            _fail("quant_method", quant_method, repr(QUANT_METHOD))
        self.quant_method = QUANT_METHOD
        for o in self.OPTIONS:
            setattr(self, o.name, kwargs[o.name] if o.name in kwargs else copy.deepcopy(o.default))
        self.transforms_applied = kwargs.get("transforms_applied")
        self.checkpoint_format = kwargs.get("checkpoint_format", CHECKPOINT_FORMAT)
        # Filled in after calibration: what data was used, which modules were packed.
        self.calibration = kwargs.get("calibration")
        self.quantized_modules = kwargs.get("quantized_modules")
        self.gguf_tensor_types = kwargs.get("gguf_tensor_types")  # with gguf_type: each module's tensor type
        # {quantized module: the name its tensors are saved under}, where transformers renames it on save
        # (Mixtral's "mlp" is "block_sparse_moe" in its checkpoints); the exports read the files by these
        self.checkpoint_names = kwargs.get("checkpoint_names")
        self.input_rotated_modules = kwargs.get("input_rotated_modules")  # online_rotation: the layers that rotate x
        # recommended(): {"quality", "bits", "options": the options the preset set and the caller left}; a run
        # may fit those to the model (transform="auto"; online_rotation where there is nothing to rotate)
        self.preset = kwargs.get("preset")
        self.post_init()

    @classmethod
    def _option_names(cls) -> list[str]:
        return [o.name for o in cls.OPTIONS]

    @classmethod
    def option(cls, name: str) -> Option:
        return next(o for o in cls.OPTIONS if o.name == name)

    @classmethod
    def recommended(cls, bits: int = 4, quality: str = "balanced", **overrides: Any) -> "AstroQuantConfig":
        """A measured preset (`presets.PRESETS`): quality "fast", "balanced" or "best" at 2, 3 or 4 bits;
        `overrides` (any option, the data included) go on top."""
        from .presets import GGUF_CHANGED, GGUF_UNSERVED, preset_options

        options = preset_options(bits, quality)
        preset: dict[str, Any] = {"quality": quality, "bits": bits}
        if overrides.get("gguf_type") is not None:  # the GGUF type fixes the grid; the file holds no more
            options = {k: v for k, v in options.items() if k not in GGUF_FIXED}
            left = {k: v for k, v in GGUF_UNSERVED.items() if k in options and options[k] != v}
            changed = {k: v for k, v in GGUF_CHANGED.get((quality, bits), {}).items() if options.get(k) != v}
            options.update(left)
            options.update(changed)
            preset.update(engine="gguf", left_out=sorted(left), changed=dict(sorted(changed.items())))
        preset["options"] = sorted(set(options) - set(overrides))
        return cls(**{**options, **overrides, "preset": preset})

    def from_preset(self, option: str) -> bool:
        """Whether `option` is a preset's choice (recommended()) rather than the caller's."""
        return isinstance(self.preset, dict) and option in (self.preset.get("options") or ())

    def post_init(self) -> None:
        """Validate every option; raise ValueError naming the bad value and what is allowed."""
        for o in self.OPTIONS:
            value = getattr(self, o.name)
            try:
                setattr(self, o.name, o.check(value))
            except Invalid as err:
                _fail(o.name, value if err.shown is None else err.shown, err.allowed)
        if self.mse is None:  # the measured better choice for the method (options.py), saved as chosen
            self.mse = self.method != "rtn"
        if self.checkpoint_format != CHECKPOINT_FORMAT:
            _fail("checkpoint_format", self.checkpoint_format, repr(CHECKPOINT_FORMAT))
        check_combinations(self)

    def tensor_type_of(self, module: str) -> str | None:
        """The GGUF tensor type a module is solved onto (with gguf_type), else None."""
        return (self.gguf_tensor_types or {}).get(module)

    @property
    def needs_calibration_data(self) -> bool:
        return self.method != "rtn"

    def solver_options(self):
        """The options of the layer solver (`algorithms.solve.SolverOptions`)."""
        import dataclasses

        from .algorithms.solve import SolverOptions

        return SolverOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SolverOptions)
                               if hasattr(self, f.name)})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for config.json: saved options and records, never the calibration data."""
        out: dict[str, Any] = {"quant_method": QUANT_METHOD}
        for o in self.OPTIONS:
            if o.saved:
                out[o.name] = getattr(self, o.name)
        for name in RECORD_KEYS:
            out[name] = getattr(self, name)
        return out

    def get_loading_attributes(self) -> dict[str, Any]:
        """Options that apply when loading a saved model (transformers copies them over the saved config)."""
        return {"backend": self.backend}

    def to_diff_dict(self) -> dict[str, Any]:
        default = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or default.get(k) != v}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json_string(use_diff=False).strip()})"


def _describe(cls: type) -> None:
    """The keyword signature and docstring of `cls` from its OPTIONS."""
    params = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in cls.OPTIONS]
    cls.__signature__ = inspect.Signature(params)
    cls.__doc__ = _docstring(cls.OPTIONS)


_describe(AstroQuantConfig)


def check_combinations(cfg: AstroQuantConfig) -> None:
    """Rules between options. Each combination that cannot do what it says is refused here, with what
    to set instead: no option silently changes what another one does."""
    m = cfg.method
    if cfg.n_samples * cfg.seqlen > MAX_CALIBRATION_TOKENS:
        _fail("n_samples", cfg.n_samples, f"at most {MAX_CALIBRATION_TOKENS // cfg.seqlen} with seqlen={cfg.seqlen} "
              f"(n_samples × seqlen is bounded by {MAX_CALIBRATION_TOKENS:,} calibration tokens, 64 times the "
              "defaults' 262,144)")
    if cfg.gguf_type is not None:
        for name in GGUF_FIXED:
            if getattr(cfg, name) != cfg.option(name).default:
                _fail(name, getattr(cfg, name), f"its default {cfg.option(name).default!r} with "
                      f"gguf_type={cfg.gguf_type!r} (the GGUF type fixes each tensor's bits, sub-block and grid)")
        if not cfg.static_groups:
            _fail("static_groups", cfg.static_groups, f"True with gguf_type={cfg.gguf_type!r} (a GGUF grid is "
                  "fitted up front)")
    if cfg.rounding == "successive" and m not in ("gptq", "rtn"):
        _fail("rounding", cfg.rounding, f"'gptq' or 'beam' with method={m!r} ('successive' decodes toward a fixed "
              "target: use method='gptq' with asym_alpha for the asymmetric target)")
    if cfg.rounding in ("beam", "successive") and not cfg.static_groups:
        _fail("static_groups", cfg.static_groups, f"True with rounding={cfg.rounding!r} (it fits every group's grid "
              "up front), or rounding='gptq'")
    if cfg.rounding == "successive" and not cfg.desc_act:
        _fail("desc_act", cfg.desc_act, "True with rounding='successive' (it always decodes the columns in "
              "act-order), or rounding='gptq' / 'beam'")
    if m == "rescomp" and cfg.bits < RESCOMP_MIN_BITS:
        _fail("method", m, f"'gptq' or 'gptaq' at bits={cfg.bits} (ResComp's residual measured worse than GPTAQ "
              "below 3 bits, docs/results.md#asymmetric-calibration; use method='gptaq')")
    if m == "rtn" and (cfg.asym_alpha not in (None, 0.0) or cfg.rounding != "gptq"):
        _fail("method", m, "'gptq', 'gptaq' or 'rescomp' when asym_alpha or rounding is set "
              "(round-to-nearest uses no calibration data)")
    if cfg.fp_samples is not None and not cfg.solver_options().needs_fp_stream:
        _fail("fp_samples", cfg.fp_samples, f"None with method={m!r} and asym_alpha={cfg.asym_alpha!r} (only the "
              "asymmetric solvers carry the full-precision stream)")
    if cfg.refine_steps and m == "rtn":
        _fail("refine_steps", cfg.refine_steps, "0 with method='rtn' (it tunes against calibration data)")
    if cfg.refine_steps and cfg.gguf_type is not None:
        _fail("refine_steps", cfg.refine_steps, f"0 with gguf_type={cfg.gguf_type!r} (it tunes the scales of "
              "the GPTQ-style grid; GGUF blocks keep their own)")
    if cfg.refine_rounding_lr and not cfg.refine_steps:
        _fail("refine_rounding_lr", cfg.refine_rounding_lr, "0 unless refine_steps > 0 (the rounding offsets are "
              "tuned by the refine steps)")
    if cfg.refine_rounding_lr and cfg.rounding != "gptq":
        _fail("refine_rounding_lr", cfg.refine_rounding_lr, f"0 with rounding={cfg.rounding!r} (only the greedy "
              "sweep, rounding='gptq', records how near each rounding decision was)")
    if cfg.online_rotation != "none" and cfg.gguf_type is not None:
        _fail("online_rotation", cfg.online_rotation, f"'none' with gguf_type={cfg.gguf_type!r} (GGUF files have no "
              "online rotation of a layer's input)")
    if cfg.astro and m == "rtn":
        _fail("astro", cfg.astro, "False with method='rtn' (Astro needs the calibration Hessian)")
    if cfg.transform in ("scale", "adaptive") and m == "rtn":
        _fail("transform", cfg.transform, "'none' or 'rotate' with method='rtn' (scales are searched on "
              "calibration activations)")
