"""After quantization: exports for serving engines (GPTQ, compressed-tensors, GGUF), the model card, the Hub.

Each export format is one module here that registers an `Exporter` (registry.py); the CLI's
`export --format` and its flags come from the registry. GGUF's own code is the package
hf_astroquant.gguf; the load guards and save hooks of our own checkpoints are hf_astroquant.checkpoint.
"""

from .card import render_card, write_card
from .compressed_tensors import export_compressed_tensors
from .gptq import export_gptq
from .source import ExportError
from .hub import push_folder
from .registry import ExportOption, Exporter, ExportSummary, exporters, register_exporter

# Every format, GGUF included, is in the registry (`exporters()`); hf_astroquant.workflows.export runs
# any of them as `hf-astroquant export` does.

__all__ = ["ExportError", "ExportOption", "ExportSummary", "Exporter", "export_compressed_tensors",
           "export_gptq", "exporters", "push_folder", "register_exporter", "render_card", "write_card"]
