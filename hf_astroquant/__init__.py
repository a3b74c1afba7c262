"""hf_astroquant: weight-only post-training quantization as a transformers quantizer plugin.

Importing the package registers ``quant_method="astroquant"`` with transformers, so that
``from_pretrained(..., quantization_config=AstroQuantConfig(...))`` quantizes and
``from_pretrained(saved_dir)`` loads the packed checkpoint back.
"""

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import AstroQuantConfig
from .modules import QuantLinear
from .quantizer import AstroQuantizer

__version__ = "0.1.0"


def _register() -> None:
    """Register with transformers once per process (re-imports and reloads are harmless)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING["astroquant"] = AstroQuantConfig
    AUTO_QUANTIZER_MAPPING["astroquant"] = AstroQuantizer


_register()

__all__ = ["AstroQuantConfig", "AstroQuantizer", "QuantLinear", "__version__"]
