"""The command line's workflows as Python functions: `quantize` a model into a folder, `evaluate` a
saved one, `export` one to a serving format, `push` one to the Hub.

    from hf_astroquant import AstroQuantConfig, evaluate, quantize

    result = quantize("HuggingFaceTB/SmolLM2-135M", "smollm2-w4", AstroQuantConfig(bits=4, dataset="wikitext2"),
                      eval_data="wikitext2-raw")
    print(result.perplexity, result.report["peak_rss_bytes"])
    evaluate("smollm2-w4", data="wikitext2-raw", baseline="HuggingFaceTB/SmolLM2-135M")

Each function makes the checks `hf-astroquant` makes, in the same order: every argument and the
data are checked before anything is loaded; an output is written into a hidden sibling folder and
put in place only when complete, never over what the run reads nor over a folder it did not write
(`output_dir`). A refusal is a ValueError (`WorkflowError`, or the config's, the data's or the
output's own) whose message is the one line the shell prints. The `hf-astroquant` commands parse
their flags, call these functions and print the returned rows.

- `quantizing`: `quantize` and its `QuantizeResult`;
- `evaluating`: `evaluate` and its `EvalResult`; `pushing`: `push` and its `PushResult`;
- `exporting`: `export`, any registered format (export/registry.py), returning its `ExportSummary`;
- `measurements_record` (report.py): the one place that adds a workflow's measurements to a run's
  `astroquant_report`;
- `sources`: model sources (Hub id, directory, .gguf file), tokenizers, placement, `WorkflowError`.
"""

from ..report import measurements_record
from .evaluating import EvalResult, evaluate
from .exporting import export
from .pushing import PushResult, push
from .quantizing import QuantizeResult, quantize
from .sources import DTYPES, WorkflowError, resolve_source

__all__ = ["DTYPES", "EvalResult", "PushResult", "QuantizeResult", "WorkflowError", "evaluate", "export", "measurements_record",
           "push", "quantize", "resolve_source"]
