"""After quantization: GPTQ export for serving engines, the model card, the Hub, load guards."""

from .card import render_card, write_card
from .gptq import ExportError, export_gptq
from .hub import push_folder

__all__ = ["ExportError", "export_gptq", "push_folder", "render_card", "write_card"]
