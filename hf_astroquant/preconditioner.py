"""The preconditioning transforms (folding.py) driven from the block loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import AstroQuantConfig
from .distributed import Ranks
from .statistics import summing_dtype
from .online_rotation import input_rotation_of
from .stream import run_block

class Preconditioner:
    """transform="rotate" | "scale" | "adaptive" (folding.py), driven from the block loop:
    the residual rotation before the first block's inputs are captured (checked on the model's
    logits), scales per block on the inputs the block sees (before its full-precision stream and
    its calibration; checked on the block's output)."""

    def __init__(self, model: nn.Module, cfg: AstroQuantConfig, blocks, names: list[str], transform: str,
                 ranks: Ranks | None = None):
        """`transform`: "rotate", "scale" or "adaptive" (transform="auto" resolved: folding.choose_transform);
        `ranks`: the scale search's statistics are summed over them (each holds a share of the windows)."""
        from . import folding as pc

        self.pc, self.model, self.cfg, self.blocks, self.names = pc, model, cfg, blocks, names
        self.ranks = ranks or Ranks()
        self.transform = transform
        self.sites = pc.check_foldable(model, blocks, names, transform)
        self.record: dict[str, Any] = {"transform": transform, "blocks": {n: {} for n in names}}
        self.scale_sites: list[list[str]] = [[] for _ in names]

    def before_calibration(self) -> None:
        pc, cfg = self.pc, self.cfg
        if self.transform == "scale":
            self.scale_sites = [pc.scale_sites(bs) for bs in self.sites]
            return
        if self.transform == "rotate":
            self._rotate()
            for bs in self.sites:
                self.record["blocks"][bs.name] = pc.rotation_record(bs)
            return
        # adaptive: the residual rotation, then per site by the kurtosis z-score of the rotated weights
        before = self._rotate(value_output=[False] * len(self.names))
        kurt = [pc.site_kurtosis(bs) for bs in self.sites]
        choices = pc.adaptive_choices(kurt, cfg.kurtosis_threshold_attn, cfg.kurtosis_threshold_mlp)
        pc.rotate_value_outputs(self.model, self.sites, cfg.seed, [c.get("vo") == "rotate" for c in choices])
        pc.check_kept(before, pc.probe_logits(self.model), weight_dtype(self.model),
                      "the residual and value/output rotations")
        for bs, c, k in zip(self.sites, choices, kurt):
            self.record["blocks"][bs.name] = dict(c)
            self.record.setdefault("kurtosis", {})[bs.name] = {site: round(v, 4) for site, v in k.items()}
        allowed = [set(pc.scale_sites(bs)) for bs in self.sites]
        self.scale_sites = [[site for site, choice in c.items() if choice == "scale" and site in ok]
                            for c, ok in zip(choices, allowed)]

    def without_scales_on_rotated_inputs(self) -> None:
        """Leave out of the scale search every site whose consumers rotate their input online
        (online_rotation.py): they no longer read the channels the scales would divide."""
        for bs, sites in zip(self.sites, self.scale_sites):
            consumers = bs.consumers()
            for site in [s for s in sites if any(input_rotation_of(m) is not None for m in consumers.get(s, ()))]:
                sites.remove(site)
                self.record["blocks"][bs.name][site] = "online rotation"

    def _rotate(self, value_output: list[bool] | None = None) -> torch.Tensor:
        """The residual rotation, checked on the logits; returns the logits from before it (the reference)."""
        pc = self.pc
        before = pc.probe_logits(self.model)
        self.record.update(pc.rotate_residual(self.model, self.sites, self.cfg.seed, value_output))
        self.record["logit_deviation"] = pc.check_kept(before, pc.probe_logits(self.model),
                                                       weight_dtype(self.model), "the residual rotation")
        return before

    def before_block(self, i: int, inputs: list[torch.Tensor], kwargs_list: list[dict]) -> None:
        sites = self.scale_sites[i]
        if not sites:
            return
        pc, block, bs = self.pc, self.blocks[i], self.sites[i]
        stats = pc.SiteStats(bs, sites, summing_dtype(self.cfg.statistics_dtype, self.ranks.active))
        try:
            outs = [run_block(block, x, kw) for x, kw in zip(inputs[:1], kwargs_list[:1])]
            for x, kw in zip(inputs[1:], kwargs_list[1:]):
                run_block(block, x, kw)
        finally:
            stats.close()
        self.ranks.sum([stats.h[site] for site in sorted(stats.h)])  # every rank's windows
        h = {site: t.to(torch.float32) for site, t in stats.h.items()}
        alphas = pc.scale_block(self.model, bs, h, sites, self.cfg.bits, self.cfg.group_size, self.cfg.sym)
        if any(a > 0 for a in alphas.values()):
            pc.check_kept(outs[0], run_block(block, inputs[0], kwargs_list[0]), weight_dtype(self.model),
                          f"the scales of {bs.name}")
        rec = self.record["blocks"][bs.name]
        for site, a in alphas.items():
            rec[site] = "scale" if a > 0 else "none"
            rec.setdefault("scale_alpha", {})[site] = a


def weight_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype
