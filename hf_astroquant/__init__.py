"""hf_astroquant: weight-only post-training quantization as a transformers quantizer plugin.

Importing the package registers ``quant_method="astroquant"`` with transformers, so that
``from_pretrained(..., quantization_config=AstroQuantConfig(...))`` quantizes and
``from_pretrained(saved_dir)`` loads the packed checkpoint back.
"""

import transformers.quantizers.auto as _hf_auto
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import AstroQuantConfig
from .modules import QuantLinear, set_backend
from .quantizer import AstroQuantizer
from .workflows import evaluate, push, quantize  # the CLI's workflows (hf_astroquant.workflows)

__version__ = "0.3.1"


def _register() -> None:
    """Register with transformers once per process (re-imports and reloads are harmless)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING["astroquant"] = AstroQuantConfig
    AUTO_QUANTIZER_MAPPING["astroquant"] = AstroQuantizer
    # Lets from_pretrained(saved, quantization_config=AstroQuantConfig(backend=...)) override the
    # loading options (`get_loading_attributes`) of a saved config, as it does for GPTQ.
    if AstroQuantConfig not in _hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        _hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*_hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES, AstroQuantConfig)


_register()

__all__ = ["AstroQuantConfig", "AstroQuantizer", "QuantLinear", "__version__", "evaluate", "push", "quantize",
           "set_backend"]
