"""Mixture-of-experts layers: the fused 3-D experts of five families become per-expert Linears that
compute exactly what the fused module does, every expert is solved from the tokens routed to it (or
every token, calibrate_all_experts), an expert with too few tokens gets the stated fallback, routers
stay in full precision, and the packed model saves and reloads to identical logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_astroquant import AstroQuantConfig
from hf_astroquant.full_precision import full_precision_weights
from hf_astroquant.experts import ExpertList, expert_lists, layout_of, router_names, split_all
from hf_astroquant.export.card import REPORT_FILE
from hf_astroquant.export.gptq import export_gptq
from hf_astroquant.modules import QUANTIZED_LAYERS
from moe_families import FAMILIES, tiny_moe_model
from tiny import calib_ids

IDS = calib_ids(2, 16, seed=9)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _blocks(model):
    return {f"model.layers.{i}": b for i, b in enumerate(model.model.layers)}


@pytest.mark.parametrize("family", FAMILIES)
def test_split_experts_compute_exactly_what_the_fused_module_computes(family):
    model = tiny_moe_model(family)
    ref = _logits(model)
    for name, block in _blocks(model).items():
        split_all(block, name, lambda n: True)
    lists = expert_lists(model)
    assert lists and all(isinstance(m, ExpertList) and len(m) == 4 for m in lists.values())
    assert not any(layout_of(m) for m in model.modules())  # nothing fused left
    # Same arithmetic, other kernels: the fused module multiplies each expert's tokens through a slice of a
    # 3-D weight (batched or grouped matmul), the split one through a Linear, and BLAS blocks the reduction by
    # ISA (bit-equal on AVX-512, not on AMD's AVX2-only EPYC). So: equal to float32 rounding, far below the
    # 0.5-0.9 that two swapped experts give on these logits (measured on every family here).
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    for experts in lists.values():  # every expert on every token: the routed output is unchanged
        experts.all_tokens = True
    assert torch.allclose(_logits(model), ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    for family in FAMILIES:
        tiny_moe_model(family).save_pretrained(root / family)
    return root


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_packed_and_the_model_reloads_identically(saved, family, method, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(saved / family, quantization_config=AstroQuantConfig(
        bits=4, group_size=32, method=method, dataset=calib_ids()))
    routers = router_names(q)
    assert routers
    left = full_precision_weights(_blocks(q), QUANTIZED_LAYERS)  # walks the parameters, not a Linear list
    assert {n for shares in left.values() for n in shares} == {f"{r}.weight" for r in routers}
    cfg = q.config.quantization_config
    assert set(routers) <= set(cfg.modules_to_not_convert)
    assert any(".experts.3." in n for n in cfg.quantized_modules)
    report = q.astroquant_report
    for name, counts in report["expert_tokens"].items():  # top-2 of 4 on 16 windows of 32 tokens
        assert len(counts) == 4 and sum(counts) == 2 * 16 * 32, name
    got = _logits(q)
    q.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / REPORT_FILE).read_text())["expert_tokens"] == report["expert_tokens"]
    card = (tmp_path / "q" / "README.md").read_text()
    low, high = min(min(c) for c in report["expert_tokens"].values()), max(max(c) for c in report["expert_tokens"].values())
    assert f"experts each; {low} to {high} calibration tokens routed to an expert; 0 expert Linear(s)" in card
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert torch.equal(_logits(back), got)


def _block_output_error(family, cfg):
    """Relative error of the last MoE block's output against the full-precision model's, on held-out text."""
    fp = tiny_moe_model(family)
    ids = calib_ids(8, 32, seed=5)
    with torch.no_grad():
        ref = fp(ids, output_hidden_states=True).hidden_states[-1]
    q = AutoModelForCausalLM.from_config(fp.config).eval()
    q.load_state_dict(fp.state_dict())
    from hf_astroquant.pipeline import quantize_model

    report = quantize_model(q, cfg, lambda n: "lm_head" not in n)
    with torch.no_grad():
        got = q(ids, output_hidden_states=True).hidden_states[-1]
    return float((got - ref).norm() / ref.norm()), report


def test_gptq_on_the_experts_beats_round_to_nearest_in_either_calibration_mode():
    grid = dict(bits=3, group_size=32)
    rtn, _ = _block_output_error("qwen3_moe", AstroQuantConfig(**grid, method="rtn"))
    routed, report = _block_output_error("qwen3_moe", AstroQuantConfig(**grid, dataset=calib_ids(32)))
    every, report_all = _block_output_error("qwen3_moe", AstroQuantConfig(**grid, dataset=calib_ids(32),
                                                                          calibrate_all_experts=True))
    assert routed < rtn and every < rtn, (routed, every, rtn)
    assert report.expert_fallback == {} and report_all.expert_fallback == {}
    # the counts are the real routing's either way (block 0's input is the embedding in both runs)
    first = "model.layers.0.mlp.experts"
    assert report.expert_tokens[first] == report_all.expert_tokens[first]


def test_an_expert_with_too_few_tokens_is_rounded_to_nearest_and_listed(saved):
    q = AutoModelForCausalLM.from_pretrained(saved / "qwen3_moe", quantization_config=AstroQuantConfig(
        bits=4, group_size=32, dataset=calib_ids(4), min_expert_tokens=60))
    report = q.astroquant_report
    low = {f"{name}.{e}": c for name, counts in report["expert_tokens"].items() for e, c in enumerate(counts) if c < 60}
    assert low, report["expert_tokens"]  # 4 windows of 32 tokens, top-2 of 4: some expert sees fewer than 60
    expected = {f"{e}.{p}": c for e, c in low.items() for p in ("gate_proj", "up_proj", "down_proj")}
    assert report["expert_fallback"] == expected
    everything = AutoModelForCausalLM.from_pretrained(saved / "qwen3_moe", quantization_config=AstroQuantConfig(
        bits=4, group_size=32, dataset=calib_ids(4), min_expert_tokens=60, calibrate_all_experts=True))
    assert everything.astroquant_report["expert_fallback"] == {}  # every expert saw all 128 tokens


class NeverThree(torch.nn.Module):
    """A top-2 router that never picks expert 3."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        logits = torch.nn.functional.linear(x, self.weight)
        logits[:, 3] = float("-inf")
        scores, index = torch.topk(logits.softmax(-1), 2, dim=-1)
        return logits, scores, index


def test_an_expert_no_token_reaches_is_rounded_to_nearest(saved):
    model = tiny_moe_model("qwen3_moe")
    for layer in model.model.layers:  # expert 3 of every layer is never chosen
        layer.mlp.gate = NeverThree(layer.mlp.gate.weight)
    from hf_astroquant.pipeline import quantize_model

    report = quantize_model(model, AstroQuantConfig(bits=4, group_size=32, dataset=calib_ids(4)),
                            lambda n: "lm_head" not in n)
    assert {c[3] for c in report.expert_tokens.values()} == {0}
    assert report.expert_fallback["model.layers.1.mlp.experts.3.down_proj"] == 0
    assert not report.skipped
    assert isinstance(model.model.layers[1].mlp.experts[3].down_proj, QUANTIZED_LAYERS)


def test_bad_expert_options_are_refused_by_name():
    with pytest.raises(ValueError, match="min_expert_tokens=-1"):
        AstroQuantConfig(min_expert_tokens=-1)
    with pytest.raises(ValueError, match="calibrate_all_experts='yes'"):
        AstroQuantConfig(calibrate_all_experts="yes")


def test_gguf_types_are_refused_for_a_moe_model(saved):
    with pytest.raises(ValueError, match="mixture-of-experts"):
        AutoModelForCausalLM.from_pretrained(saved / "qwen3_moe", quantization_config=AstroQuantConfig(
            gguf_type="Q4_0", method="rtn"))


@pytest.mark.parametrize("family,expert", [("qwen3_moe", "mlp.experts.1.gate_proj"),
                                           ("mixtral", "block_sparse_moe.experts.1.w1")])
def test_the_gptq_export_names_experts_as_their_checkpoints_do(saved, family, expert, tmp_path):
    from safetensors import safe_open

    q = AutoModelForCausalLM.from_pretrained(saved / family, quantization_config=AstroQuantConfig(
        bits=4, group_size=32, method="rtn"))
    q.save_pretrained(tmp_path / "q")
    export_gptq(tmp_path / "q", tmp_path / "gptq")
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"model.layers.0.{expert}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")} <= keys
    assert not [k for k in keys if k.endswith("gate_up_proj") or k.endswith("experts.down_proj")]


def _safetensors(model, path) -> dict:
    from safetensors.torch import load_file

    model.save_pretrained(path)
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("family,method", [("qwen3_moe", "gptq"), ("gpt_oss", "gptaq"), ("mixtral", "gptq")])
def test_experts_offloaded_to_disk_give_the_unconstrained_checkpoint(saved, family, method, tmp_path):
    """Block 1 on disk (accelerate offload): its fused experts are read once when the block is
    calibrated, their packed layers written back to the offload folder per expert, and the
    checkpoint equals the in-memory run's tensor for tensor; a resumed run (every block done)
    places the packed experts without reading the fused weights."""
    from hf_astroquant.offload import is_offloaded

    def cfg(**kw):
        return AstroQuantConfig(bits=4, group_size=32, method=method, dataset=calib_ids(), backend="reference", **kw)

    mixed = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}
    full = AutoModelForCausalLM.from_pretrained(saved / family, quantization_config=cfg())
    off = AutoModelForCausalLM.from_pretrained(saved / family, quantization_config=cfg(resume_dir=str(tmp_path / "r")),
                                               device_map=mixed, offload_folder=str(tmp_path / "offload"))
    expert = off.model.layers[1].mlp.experts[3]
    packed = getattr(expert, expert.names[0])
    assert isinstance(packed, QUANTIZED_LAYERS) and is_offloaded(packed) and packed.qweight.device.type == "meta"
    assert (tmp_path / "offload" / f"model.layers.1.mlp.experts.3.{expert.names[0]}.qweight.dat").exists()
    assert torch.equal(_logits(off), _logits(full))
    want = _safetensors(full, tmp_path / "full")
    got = _safetensors(off, tmp_path / "off")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    again = AutoModelForCausalLM.from_pretrained(saved / family, quantization_config=cfg(resume_dir=str(tmp_path / "r")),
                                                 device_map=mixed, offload_folder=str(tmp_path / "offload2"))
    assert again.hf_quantizer.report.resumed_blocks == 2
    resumed = _safetensors(again, tmp_path / "again")
    assert resumed.keys() == want.keys() and all(torch.equal(resumed[k], want[k]) for k in want)
