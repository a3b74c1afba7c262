"""`export`: a saved checkpoint of ours to a format a serving engine reads, through the exporter registry."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import output_dir
from .sources import WorkflowError


def export(directory: str | os.PathLike, out: str | os.PathLike, format: str, *,  # noqa: A002 (the CLI's name)
           overwrite: bool = False, **options):
    """Export the saved `directory` to `out` in `format` (`hf-astroquant export`): the format's options
    (defaults filled in) and refusals are checked before any work; a folder format is written into a
    hidden sibling with the run report and a model card, then put in place (only over an output of
    ours, with `overwrite`); a one-file format (GGUF) writes its file in place only when complete.
    Returns the exporter's `ExportSummary`."""
    from ..export.card import REPORT_FILE, write_card
    from ..export.registry import get_exporter
    from ..export.source import ExportError

    src, out = Path(directory), Path(out)
    exporter = get_exporter(format)
    values = {o.dest: o.default for o in exporter.options}
    values.update(options)
    exporter.check(**values)
    tmp_out = None if exporter.file_suffix else output_dir.prepare(out, overwrite, {"DIR": src})
    try:
        if tmp_out is None:
            return exporter.export(src, out, overwrite=overwrite, **values)
        summary = exporter.export(src, tmp_out, overwrite=True, **values)
        if (src / REPORT_FILE).is_file():
            shutil.copy2(src / REPORT_FILE, tmp_out / REPORT_FILE)
        write_card(tmp_out, model_id=out.name)  # a name, never a path of this machine
        output_dir.finish(tmp_out, out)
        return summary
    except BaseException as err:
        if tmp_out is not None:
            output_dir.discard(tmp_out)
        if isinstance(err, ExportError):
            raise WorkflowError(f"cannot export to {exporter.display_name}: {err}") from err
        raise
