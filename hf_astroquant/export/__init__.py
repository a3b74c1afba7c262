"""After quantization: exports for serving engines (GPTQ, compressed-tensors), the model card, the Hub, load guards."""

from .card import render_card, write_card
from .compressed_tensors import export_compressed_tensors
from .gptq import export_gptq
from .source import ExportError
from .hub import push_folder

# Engine format name (the CLI's --format) -> its exporter, called as exporter(src, out).
EXPORTERS = {"gptq": export_gptq, "compressed-tensors": export_compressed_tensors}

__all__ = ["EXPORTERS", "ExportError", "export_compressed_tensors", "export_gptq", "push_folder", "render_card", "write_card"]
