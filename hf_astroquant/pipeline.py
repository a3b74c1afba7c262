"""The block-by-block calibration driver: capture, solve, pack, propagate.

For each decoder block, in order:
  1. the block's inputs X are what the already-quantized prefix of the model produces
     (optionally the full-precision stream X̃ is carried beside it: stream.py);
  2. the preconditioning transform, when one is asked for, folds its scales (preconditioner.py);
  3. the block step (block_solve.py) solves every Linear of the block in execution order from its
     statistics (statistics.py, layer_solve.py), against the input X̃ the full-precision block gave
     the same Linear for the asymmetric solvers, and returns what it made (`BlockResult`);
  4. the driver records it in the report, puts the packed layers in the model, and with
     `resume_dir` checkpoints the finished block (resume.py); the block's outputs (computed with
     quantized weights) become the next block's inputs.
Under torch.distributed every rank runs this loop on its share of the windows (distributed.py):
the block step sums the statistics over ranks and spreads the solves; after each block the ranks
check that they hold the same packed layers, and rank 0 alone writes the checkpoint.
Data flows one way: each step returns what it made and this module passes it on. Tools and tests
watch the loop through `listening` (a `BlockListener`), never by patching it.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import digests, distributed, offload, resume
from .block_solve import BlockResult, calibrate_block
from .blocks import block_targets, find_blocks, place_layer, text_config
from .calibration import batch_rows, batch_windows, prepare_calibration
from .config import AstroQuantConfig
from .experts import onload_experts, router_names, split_all
from .gguf import types as gguf_types
from .layer_solve import LayerSolver, SolvedLayer, rounded_layer
from .linear_like import convert_conv1d
from .memory import trim_heap
from .online_rotation import NothingToRotate, detach_left_in_full_precision, rotate_inputs
from .preconditioner import Preconditioner
from .report import QuantizationReport, report_state, restore_report
from .stream import FullPrecisionStream, auto_batch_size, capture_block_inputs, fp_stream_batches

logger = logging.getLogger("hf_astroquant")


class BlockListener:
    """Told what the block loop does (`listening`); a listener overrides what it wants to see. A listener
    that raises stops the run (as a crash would: finished blocks stay checkpointed)."""

    def before_block(self, i: int, name: str, stream: tuple[list, list], fp_stream: tuple[list, list] | None) -> None:
        """Block i is next: its quantized-stream (inputs, kwargs per batch) and full-precision stream's."""

    def before_solve(self, name: str, weight: torch.Tensor, hessian: torch.Tensor, d: torch.Tensor | None) -> None:
        """The Linear `name` is about to be solved from exactly these W, normalized H and D."""

    def after_block(self, i: int, name: str, result: BlockResult) -> None:
        """Block i is done: recorded, installed in the model and (with resume_dir) checkpointed."""


_LISTENERS: list[BlockListener] = []


@contextmanager
def listening(listener: BlockListener):
    """Tell `listener` what every block loop run inside the `with` does."""
    _LISTENERS.append(listener)
    try:
        yield listener
    finally:
        _LISTENERS.remove(listener)


def _tell(event: str, *args) -> None:
    for listener in list(_LISTENERS):
        getattr(listener, event)(*args)


def quantize_model(model: nn.Module, cfg: AstroQuantConfig, should_convert: Callable[[str], bool],
                   stream_fp: bool = False,
                   calibration: tuple[list[torch.Tensor], dict[str, Any]] | None = None) -> QuantizationReport:
    """Quantize every Linear inside the decoder blocks of `model` in place; return a report.

    `stream_fp` carries the full-precision stream X̃ beside the quantized one even for the solvers that
    do not need it (a listener's `before_block` sees both streams). With
    `cfg.resume_dir`, every finished block is checkpointed and a later run with the same
    directory starts after the last one (see resume.py). `calibration` is `prepare_calibration`'s
    result when the caller has prepared it already (the quantizer does, before the model loads).
    """
    run = _Run(model, cfg, should_convert)
    run.prepare_calibration(calibration)
    run.open_resume_dir()
    if run.pre is not None:  # before finished blocks are restored: their norms and embeddings rotate too
        with run.report.timing("preconditioning"):
            run.pre.before_calibration()
        run.report.transforms = run.pre.record
    if cfg.online_rotation != "none":
        with run.report.timing("preconditioning"):
            run.rotate_inputs()
    run.restore_finished_blocks()
    if cfg.method == "rtn":  # (transform is "none" or "rotate" here: scales need data)
        run.round_to_nearest()
    else:
        with torch.inference_mode(False), torch.no_grad():
            run.calibrate(stream_fp)
    if run.report.input_rotated:
        left = detach_left_in_full_precision(model)  # (their weights are W again)
        run.report.input_rotated = [n for n in run.report.input_rotated if n not in left]
    return run.stamp()


class _Run:
    """The state of one `quantize_model` call, and its steps: calibration data, resume, the block loop."""

    def __init__(self, model: nn.Module, cfg: AstroQuantConfig, should_convert: Callable[[str], bool]):
        self.start = time.perf_counter()
        self.model, self.cfg, self.should_convert = model, cfg, should_convert
        self.ranks = distributed.current()  # one rank, or this process's place under torch.distributed
        self.report = QuantizationReport()
        block_name, self.blocks = find_blocks(model)
        self.names = [f"{block_name}.{i}" for i in range(len(self.blocks))]
        for name, block in zip(self.names, self.blocks):  # GPT-2's Conv1D: one convention for every solver
            convert_conv1d(block, name, should_convert)
            split_all(block, name, should_convert)  # MoE experts as per-expert Linears (experts.py)
        routers = {r for name, block in zip(self.names, self.blocks) for r in router_names(block, name)}
        self.report.routers = sorted(routers)
        if routers and cfg.gguf_type is not None:
            raise ValueError(f"gguf_type={cfg.gguf_type!r}: the GGUF export does not write mixture-of-experts "
                             "tensors yet; quantize this model without gguf_type (GPTQ or compressed-tensors export)")
        self.should_convert = should_convert = lambda n, keep=should_convert: keep(n) and n not in routers
        if cfg.gguf_type is not None:
            self.should_convert = self._choose_gguf_types(should_convert)
        self.windows, self.batches, self.batch_size, self.window_ids = [], [], 0, []
        self.device = offload.execution_device(self.blocks[0])
        self.transform = self._choose_transform()
        self.pre = (Preconditioner(model, cfg, self.blocks, self.names, self.transform, self.ranks)
                    if self.transform != "none" else None)
        self.checkpoints, self.state, self.first, self.earlier_seconds = None, None, 0, 0.0
        self.digests: dict[int, str] = {}  # with resume_dir: block i's weights digest, taken when the loop reads it

    def _choose_transform(self) -> str:
        """The transform this run folds: the option's, or for "auto" the one that fits the model (recorded)."""
        if self.cfg.transform != "auto":
            return self.cfg.transform
        from .folding import choose_transform

        chosen, why = choose_transform(self.model, self.blocks, self.names, self.cfg.method,
                                       keep_tied=self.cfg.gguf_type is not None)
        self.report.choices["transform"] = {"asked": "auto", "chose": chosen, "why": why}
        logger.info("astroquant: transform='auto' runs %r here: %s", chosen, why)
        return chosen

    def rotate_inputs(self) -> None:
        """online_rotation: rotate the output projections' inputs (online_rotation.py); their channels
        are no longer the ones transform="scale" would scale."""
        try:
            self.report.input_rotated = rotate_inputs(self.model, self.blocks, self.names, self.should_convert,
                                                      self.cfg.seed, self.cfg.online_rotation)
        except NothingToRotate as err:
            if not self.cfg.from_preset("online_rotation"):
                raise
            self.report.choices["online_rotation"] = {"asked": self.cfg.online_rotation, "chose": "none",
                                                      "why": err.reason}
            logger.info("astroquant: the preset's online rotation is left out: %s", err)
        if self.pre is not None:
            self.pre.without_scales_on_rotated_inputs()

    def _choose_gguf_types(self, should_convert):
        """Record each target's GGUF tensor type (llama.cpp's mixture, `gguf_types.tensor_type`) in
        `cfg.gguf_tensor_types`; returns `should_convert` less the Linears no GGUF block tiles (left in
        full precision, as llama.cpp writes them in F16)."""
        cfg, config = self.cfg, text_config(self.model)
        heads = getattr(config, "num_attention_heads", None) or 1
        n_gqa = heads // (getattr(config, "num_key_value_heads", None) or heads)
        types, full = {}, []
        for i, (name, block) in enumerate(zip(self.names, self.blocks)):
            for lname, linear in block_targets(name, block, should_convert).items():
                t = gguf_types.tensor_type(cfg.gguf_type, gguf_types.role_of(lname), i, len(self.blocks),
                                           linear.in_features, n_gqa)
                if t == "F16":
                    full.append(lname)
                else:
                    types[lname] = t
        if full:
            logger.warning("astroquant: %d Linear(s) have widths no GGUF block tiles; kept in full precision: %s",
                           len(full), full[:4])
            self.report.skipped.extend(full)
        cfg.gguf_tensor_types = types
        return lambda n: should_convert(n) and n not in full

    def prepare_calibration(self, calibration) -> None:
        cfg = self.cfg
        if cfg.method == "rtn":
            return
        self.windows, record = calibration or prepare_calibration(cfg.dataset, cfg.tokenizer, cfg.n_samples,
                                                                  cfg.seqlen, cfg.seed)
        self.report.calibration = record
        seqlen = max(len(w) for w in self.windows)
        self.batch_size = cfg.calibration_batch_size or auto_batch_size(self.model, seqlen, self.device)
        share = self.ranks.share(len(self.windows))  # all of them on one rank
        mine = [self.windows[k] for k in share]
        if (self.ranks.active and cfg.fp_samples is not None and cfg.fp_samples < self.ranks.world_size
                and cfg.solver_options().needs_fp_stream):
            raise ValueError(f"fp_samples={cfg.fp_samples} with {self.ranks.world_size} ranks: each rank needs at "
                             f"least one window with the full-precision stream; raise fp_samples to at least "
                             f"{self.ranks.world_size}, or leave it unset")
        self.batches = batch_windows(mine, self.batch_size)
        # each batch row's window among all ranks' (refinement steps through the same pieces on any number)
        self.window_ids = [[share[k] for k in rows] for rows in batch_rows([len(w) for w in mine], self.batch_size)]
        logger.info("calibrating on %d windows (%s) in %d batch(es)%s", len(mine), record["source"],
                    len(self.batches),
                    f" on rank {self.ranks.rank} of {self.ranks.world_size}" if self.ranks.active else "")

    def open_resume_dir(self) -> None:
        cfg = self.cfg
        if cfg.resume_dir is None:
            return
        # (before any transform: the weights outside the blocks as loaded, by content)
        self.checkpoints = resume.ResumeDir(cfg.resume_dir, resume.fingerprint(cfg, self.model, self.windows,
                                                                                self.batch_size, self.blocks,
                                                                                self.ranks.world_size),
                                            self.ranks)
        self.state = self.checkpoints.load()
        if self.state is not None and self.state["blocks_done"] > 0 and self.transform not in ("none", "rotate"):
            raise ValueError(f"resume_dir with transform={self.transform!r}: the scales searched for finished "
                             "blocks are not checkpointed; rerun without resume_dir (or an empty one)")

    def restore_finished_blocks(self) -> None:
        if self.state is None:
            return
        self.first = self.state["blocks_done"]
        self.earlier_seconds = restore_report(self.report, self.state["report"])
        for i in range(self.first):
            # the block's weights as the loop would have read them (after the model-wide rotations,
            # functions of the weights and the fingerprinted options), hashed before they are replaced
            self.checkpoints.check_block(self.names[i], digests.block_digest(self.blocks[i]))
            resume.load_block(self.model, self.names[i], self.blocks[i], self.should_convert, self.cfg,
                              self.checkpoints.block_tensors(i))
        self.report.resumed_blocks = self.first
        logger.warning("astroquant: resuming from %s: %d of %d blocks were already done", self.cfg.resume_dir,
                       self.first, len(self.blocks))

    def stamp(self) -> QuantizationReport:
        """Bring the report's seconds (and the phases' remainder) up to now."""
        self.report.seconds = self.earlier_seconds + time.perf_counter() - self.start
        self.report.close_phases()
        if self.ranks.active:
            self.report.distributed = self.ranks.record()
        return self.report

    def read_block(self, i: int) -> None:
        """With resume_dir: take block i's weights digest, now that the loop has it in memory (onloaded),
        before anything rewrites it. (With transform "scale"/"adaptive" the block's scales are folded
        in by then; such runs never reuse finished blocks: `open_resume_dir`.)"""
        if self.checkpoints is not None:
            self.digests[i] = digests.block_digest(self.blocks[i])

    def finish_block(self, i: int, packed: dict[str, torch.Tensor] | None, inputs, fp_inputs) -> None:
        if self.checkpoints is not None:
            self.stamp()
            self.checkpoints.save_block(i, self.names[i], self.digests.pop(i), packed, inputs, fp_inputs,
                                        report_state(self.report), len(self.blocks))

    def todo(self) -> list[int]:
        return list(range(self.first, len(self.blocks)))

    def round_to_nearest(self) -> None:
        cfg = self.cfg
        self.report.layer_error_kind = "weight"
        for i in tqdm(self.todo(), desc="astroquant rtn", unit="block", disable=not self.ranks.is_writer):
            name = self.names[i]
            targets = block_targets(name, self.blocks[i], self.should_convert)
            homes = offload.onload(targets)
            self.read_block(i)
            solved, packed = {}, {} if self.checkpoints is not None else None
            for lname, linear in targets.items():
                W = linear.weight.data.float()
                res, layer = rounded_layer(cfg, lname, linear, mse=cfg.mse)
                solved[lname] = SolvedLayer(layer, float(((res.weight - W) ** 2).sum() / (W ** 2).sum()))
                del res
                place_layer(self.model, lname, layer, homes, packed)  # at once: one full-size weight at a time
            result = BlockResult([], None, solved, [], {})
            self.report.add_block(name, result)
            self.finish_block(i, packed, None, None)
            _tell("after_block", i, name, result)

    def start_streams(self, fp_wanted: bool, asymmetric: bool, store: torch.device):
        """The first block's inputs: (quantized stream, kwargs[block][batch], full-precision stream or None,
        its kwargs[block][batch]), from the finished blocks' checkpoint when resuming."""
        inputs, kwargs_list = capture_block_inputs(self.model, self.blocks, self.batches)
        fp_inputs, fp_kwargs = None, kwargs_list
        if fp_wanted:
            fp_samples = self.cfg.fp_samples if asymmetric else None
            if fp_samples is not None:  # the first fp_samples windows of all: those of them this rank holds
                fp_samples = self.ranks.local_count(fp_samples)
            fp_batches = fp_stream_batches(self.batches, fp_samples)
            if fp_batches is self.batches:
                fp_inputs = [x.to(store, copy=True) for x in inputs]
            else:  # fewer windows: their own block inputs and kwargs (attention masks are per batch)
                fp_inputs, fp_kwargs = capture_block_inputs(self.model, self.blocks, fp_batches)
                fp_inputs = [x.to(store) for x in fp_inputs]
                logger.info("full-precision stream on %d of %d windows (fp_samples)",
                            sum(len(b) for b in fp_batches), sum(len(b) for b in self.batches))
        if self.todo() and self.first > 0:
            saved_q, saved_fp = self.checkpoints.stream(self.first)
            inputs = [x.to(self.device) for x in saved_q]
            if fp_inputs is not None:
                fp_inputs = [x.to(store) for x in saved_fp]
        return inputs, kwargs_list, fp_inputs, fp_kwargs

    def install(self, result: BlockResult, targets: dict, homes: dict) -> dict | None:
        """Put every solved layer where its Linear lived; return its tensors for a checkpoint."""
        packed = {} if self.checkpoints is not None else None
        for lname, linear in targets.items():
            if lname in result.solved:
                layer = result.solved[lname].layer
                layer.set_backend("auto")  # calibration ran the reference path; inference picks
                place_layer(self.model, lname, layer, homes, packed)
            elif lname in homes:  # never reached: keep it in full precision, offloaded as before
                offload.restore(linear, homes[lname])
        return packed

    def calibrate(self, stream_fp: bool) -> None:
        cfg = self.cfg
        solver = LayerSolver(cfg, self.report.timing, lambda *a: _tell("before_solve", *a) if _LISTENERS else None)
        asymmetric = solver.options.needs_fp_stream
        # The full-precision stream X̃ lives on the CPU when the blocks run on an accelerator.
        store = torch.device("cpu") if self.device.type != "cpu" else self.device
        fp = FullPrecisionStream(store, self.device, self.report.timing)
        inputs, kwargs_list, fp_inputs, fp_kwargs = self.start_streams(stream_fp or asymmetric, asymmetric, store)
        for i in tqdm(self.todo(), desc=f"astroquant {cfg.method}", unit="block", initial=self.first,
                      total=len(self.blocks), disable=not self.ranks.is_writer):
            name, block = self.names[i], self.blocks[i]
            if self.pre is not None:
                with self.report.timing("preconditioning"):
                    self.pre.before_block(i, inputs, kwargs_list[i])
            stream, fp_stream = (inputs, kwargs_list[i]), None if fp_inputs is None else (fp_inputs, fp_kwargs[i])
            _tell("before_block", i, name, stream, fp_stream)
            targets = block_targets(name, block, self.should_convert)
            homes = {**onload_experts(block, name), **offload.onload(targets)}
            self.read_block(i)
            result = calibrate_block(block, name, targets, solver, stream, fp_stream, fp, self.ranks, self.window_ids)
            if self.ranks.active:  # every rank must hold what rank 0 writes
                self.ranks.check_same(digests.combined_digest(digests.weights_digests(
                    (f"{n}.{k}", v) for n, s in result.solved.items() for k, v in s.layer.state_dict().items())),
                    f"packed layers of {name}")
            self.report.add_block(name, result)
            self.finish_block(i, self.install(result, targets, homes), result.outputs, result.fp_outputs)
            inputs, fp_inputs = result.outputs, result.fp_outputs
            _tell("after_block", i, name, result)
            del result, stream, fp_stream
            # Hook closures and the tracebacks of early-stopped forwards form reference cycles that
            # hold a block's tensors; collect them now rather than at some later block.
            gc.collect()
            trim_heap()
