"""`hf-astroquant export --format gguf`: one .gguf file (llama.cpp, Ollama and LM Studio read it as is).

The format's code is the package hf_astroquant.gguf (gguf/export.py's `export_gguf` writes the file, in
place and only when complete, replacing only a file of ours); this module puts it in the registry.
gguf-py is imported only when a file is written.
"""

from __future__ import annotations

from pathlib import Path

from ..gguf.types import FILE_TYPES
from .card import format_bytes
from .registry import ExportOption, Exporter, ExportSummary, register_exporter
from .source import ExportError


class GGUFExporter(Exporter):
    name, display_name, order = "gguf", "GGUF", 30
    engines = ("llama.cpp, Ollama, LM Studio: a checkpoint quantized with --gguf-type, or a full-precision model "
               "as F16/F32")
    file_suffix = ".gguf"
    options = (ExportOption("--gguf-type", choices=("F16", "F32") + tuple(FILE_TYPES), default=None, metavar="TYPE",
                            help="--format gguf: for a full-precision DIR, F16 (default) or F32; a DIR quantized "
                                 "with --gguf-type is written in the type it was solved for (naming it is optional)"),)

    def export(self, src: Path, out: Path, *, overwrite: bool = False, gguf_type: str | None = None) -> ExportSummary:
        from ..gguf.export import export_gguf
        from ..gguf.tensors import GGUFWriteError

        try:
            summary = export_gguf(src, out, gguf_type, overwrite=overwrite)
        except GGUFWriteError as err:  # what llama.cpp's graph cannot run: the format cannot hold it
            raise ExportError(str(err)) from err
        types = ", ".join(f"{k} {v}" for k, v in sorted(summary["tensor_types"].items()))
        run = f"llama-cli -m {out}  (or: ollama create NAME with FROM {out} in a Modelfile)"
        rows = [("format", f"gguf ({summary['gguf_type']})"), ("architecture", summary["arch"]),
                ("tokenizer", f"{summary['tokenizer']} ({summary['tokenizer_pre']})"),
                ("tensors", f"{summary['tensors']}: {types}"), ("size", format_bytes(summary["bytes"])),
                ("run it", run)]
        return ExportSummary(self.name, out, [out.name], rows, [run], summary)


register_exporter(GGUFExporter())
