"""After quantization: exports for serving engines (GPTQ, compressed-tensors), the model card, the Hub, load guards."""

from .card import render_card, write_card
from .compressed_tensors import export_compressed_tensors
from .gptq import export_gptq
from .source import ExportError
from .hub import push_folder

__all__ = ["ExportError", "export_compressed_tensors", "export_gptq", "push_folder", "render_card", "write_card"]
