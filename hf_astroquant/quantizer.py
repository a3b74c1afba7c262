"""`AstroQuantizer`: the transformers HfQuantizer glue. No math here.

Calibration path (`pre_quantized=False`): transformers loads the full-precision model, then
`_process_model_after_weight_loading` runs the block-by-block pipeline and swaps each quantized
Linear for a `QuantLinear`. Pre-quantized path: `_process_model_before_weight_loading` swaps the
Linears named in the checkpoint's config on the meta model, so the packed tensors load by name.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from . import experts, model_limits, unquantized_dtype
from .calibration import prepare_calibration
from .checkpoint import guard, validate
from .checkpoint.save_hooks import install_save_hooks
from .config import AstroQuantConfig
from .linear_like import LINEAR_LIKE, features
from .modules import QUANTIZED_LAYERS, empty_layer, set_backend
from .blocks import set_submodule
from .pipeline import quantize_model
from .report import run_record

logger = logging.getLogger("hf_astroquant")


class AstroQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: AstroQuantConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self.report = None
        self.calibration = None  # prepare_calibration's (windows, record), made in validate_environment
        self.source_dtype = None  # the source checkpoint's dtype (unquantized_dtype.py)

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            cfg = self.quantization_config
            if cfg.needs_calibration_data and cfg.dataset is None:
                raise ValueError(
                    f"AstroQuantConfig(method={cfg.method!r}) needs calibration data: pass dataset=... "
                    "(texts, token windows, a text file, a datasets.Dataset, or 'wikitext2'/'c4')"
                )
            if cfg.needs_calibration_data:
                # before any weight is loaded: bad or unreachable data fails in seconds, not after the load
                self.calibration = prepare_calibration(cfg.dataset, cfg.tokenizer, cfg.n_samples, cfg.seqlen, cfg.seed)

    def update_dtype(self, dtype):
        return dtype if dtype is not None else torch.float32

    def _should_convert(self, name: str) -> bool:
        """False when a pattern matches the name the transformers way, or as a dotted fragment of it
        ("layers.1.self_attn" excludes "model.layers.1.self_attn.q_proj")."""
        if not should_convert_module(name, self.modules_to_not_convert):
            return False
        dotted = f".{name}."
        return not any(f".{p}." in dotted for p in self.modules_to_not_convert)

    def _process_model_before_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
        )
        if not self.pre_quantized:
            if self.calibration is not None:  # before the weights load: data the model cannot read fails now
                model_limits.check_windows(self.calibration[0], model)
            # headers only: the dtype the source stores its tensors in (unquantized_dtype.py)
            self.source_dtype = unquantized_dtype.source_dtype(guard.read_headers(
                [f for f in kwargs.get("checkpoint_files") or [] if str(f).endswith(".safetensors")]))
            return
        names = cfg.quantized_modules
        if names is None:  # older or hand-written configs: every Linear not excluded
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and self._should_convert(n)]
        else:  # a checkpoint with quantized experts holds them per expert (experts.py)
            experts.split_named(model, names)
        modules = dict(model.named_modules())
        missing = [n for n in names if not isinstance(modules.get(n), LINEAR_LIKE)]
        if missing:
            raise ValueError(
                f"this astroquant checkpoint quantized modules that the model does not have as Linear layers: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        expected = {}
        rotated = set(cfg.input_rotated_modules or ())
        guard.check_rotated_listed(rotated, names, {n for n in names if cfg.tensor_type_of(n) is not None})
        for name in names:
            linear = modules[name]
            layer = empty_layer(*features(linear), cfg, cfg.tensor_type_of(name), linear.bias is not None,
                                dtype=linear.weight.dtype, device=linear.weight.device, rotated_input=name in rotated)
            set_submodule(model, name, layer)
            # a family's own init of the parent (GPT-2 rescales c_proj.weight) would reach for the dense
            # weight the packed layer no longer has; the checkpoint gives every weight anyway
            parent = name.rpartition(".")[0]
            if parent:
                model.get_submodule(parent)._is_hf_initialized = True
            expected.update(guard.expected_tensors(name, layer))
        guard.check_checkpoint(kwargs.get("checkpoint_files") or [], expected, getattr(model, "base_model_prefix", ""),
                               guard.saved_names(model, expected))
        key = guard.guard_key(names)
        if key is not None:  # the load guard (see checkpoint/guard.py) is expected here, not a stray tensor
            patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
            model._keys_to_ignore_on_load_unexpected = patterns | {guard.ignore_pattern(key), guard.ignore_pattern(
                _strip_prefix(model, key))}

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if not self.pre_quantized:
            self.report = quantize_model(model, cfg, self._should_convert, calibration=self.calibration)
            self.calibration = None  # the windows are not needed after calibration
            quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS))
            if not quantized:
                raise ValueError(
                    f"astroquant quantized no layer of {type(model).__name__}: every Linear in its decoder blocks "
                    f"was excluded or never reached (modules_to_not_convert={cfg.modules_to_not_convert!r})"
                )
            cfg.quantized_modules = quantized
            cfg.checkpoint_names = guard.renamed_modules(model, quantized)
            cfg.modules_to_not_convert = sorted(set(self.modules_to_not_convert) | set(self.report.skipped)
                                                | set(self.report.routers))
            cfg.calibration = self.report.calibration or None
            cfg.transforms_applied = self.report.transforms or None
            cfg.input_rotated_modules = self.report.input_rotated or None
            saved_dtype = unquantized_dtype.resolve(cfg.unquantized_dtype, self.source_dtype)
            unquantized_dtype.round_in_memory(model, QUANTIZED_LAYERS, saved_dtype)
            cfg.unquantized_dtype = unquantized_dtype.name_of(saved_dtype)
            model.config.quantization_config = cfg
            logger.info("astroquant: quantized %d Linear layers in %.1f s", len(quantized), self.report.seconds)
            model.astroquant_report = run_record(model, self.report)
        else:  # the packed values, before any forward path reads them (checkpoint/validate.py)
            validate.check_model(model, bool(cfg.sym))
        for module in model.modules():
            if isinstance(module, QUANTIZED_LAYERS):
                for buf in module.buffers():
                    buf.requires_grad_(False)
        counts = set_backend(model, cfg.backend)
        logger.info("astroquant: forward paths %s", counts)
        install_save_hooks(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """The model's state dict plus the load guard (checkpoint/guard.py); metadata for the header."""
        cfg = self.quantization_config
        state_dict = unquantized_dtype.cast_state_dict(model.state_dict(), cfg.quantized_modules,
                                                       unquantized_dtype.resolve(cfg.unquantized_dtype, None))
        key = guard.guard_key(cfg.quantized_modules)
        if key is not None:
            state_dict[key] = guard.guard_tensor()
        return state_dict, dict(guard.GUARD_METADATA)

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # The kernels are prepared at load time; a traced forward only reads them (tested).
        return True



def _strip_prefix(model, key: str) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key
