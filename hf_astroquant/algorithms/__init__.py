"""Pure tensor math: quantization grids and the layer solvers. No transformers imports here."""

from .grid import dequantize, fit_grid, quantize
from .gptq import LayerQuantResult, gptq_quantize
from .rtn import rtn_quantize
from .solve import SolverOptions, solve_linear
from .successive import successive_quantize

__all__ = ["LayerQuantResult", "SolverOptions", "dequantize", "fit_grid", "gptq_quantize", "quantize",
           "rtn_quantize", "solve_linear", "successive_quantize"]
