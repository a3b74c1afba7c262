"""Calibration of accelerate-dispatched models: disk offload, max_memory, mixed placements.

The quantized checkpoint must match the one from an unconstrained (all in memory) run bit for
bit, the packed layers of offloaded blocks must really leave memory, and the result must save
and reload like any other.
"""

import glob

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_astroquant  # noqa: F401
from hf_astroquant import AstroQuantConfig, QuantLinear
from hf_astroquant.offload import execution_device, is_offloaded
from tiny import calib_ids, save_tiny

MIXED = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk",
         "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu"}


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4")
    save_tiny(path, layers=4)
    return str(path)


def _cfg(**kw):
    kw.setdefault("dataset", calib_ids())
    return AstroQuantConfig(bits=kw.pop("bits", 4), group_size=32, backend="reference", **kw)


def _saved(model, path) -> dict:
    model.save_pretrained(path)
    out = {}
    for f in sorted(glob.glob(f"{path}/*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kw", [dict(), dict(method="rescomp", bits=3), dict(method="rtn"),
                                dict(desc_act=True, calibration_batch_size=4)])
def test_offloaded_calibration_matches_an_unconstrained_run_bit_for_bit(tiny4, tmp_path, kw):
    ids = calib_ids(2, 16, seed=5)
    full = AutoModelForCausalLM.from_pretrained(tiny4, quantization_config=_cfg(**kw))
    off = AutoModelForCausalLM.from_pretrained(tiny4, quantization_config=_cfg(**kw), device_map=MIXED,
                                               offload_folder=str(tmp_path / "offload"))
    # the blocks placed on disk got packed layers whose tensors live on disk, not in memory
    q_disk = off.model.layers[1].self_attn.q_proj
    assert isinstance(q_disk, QuantLinear) and is_offloaded(q_disk) and q_disk.qweight.device.type == "meta"
    assert (tmp_path / "offload" / "model.layers.1.self_attn.q_proj.qweight.dat").exists()
    q_cpu = off.model.layers[0].self_attn.q_proj
    assert isinstance(q_cpu, QuantLinear) and not is_offloaded(q_cpu) and q_cpu.qweight.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(off(ids).logits, full(ids).logits)
    _assert_same(_saved(off, tmp_path / "off"), _saved(full, tmp_path / "full"))


def test_max_memory_puts_every_block_on_disk_and_the_result_reloads(tiny4, tmp_path):
    ids = calib_ids(2, 16, seed=5)
    off = AutoModelForCausalLM.from_pretrained(tiny4, quantization_config=_cfg(), device_map="auto",
                                               max_memory={"cpu": "20KB"}, offload_folder=str(tmp_path / "o"))
    assert set(off.hf_device_map.values()) == {"disk"}
    packed = [m for m in off.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 28 and all(m.qweight.device.type == "meta" for m in packed)
    assert execution_device(off.model.layers[2]) == torch.device("cpu")
    with torch.no_grad():
        before = off(ids).logits
    assert all(m.active_backend == "reference" for m in packed)  # a kernel layout would stay resident
    off.save_pretrained(tmp_path / "saved")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved",
                                                quantization_config=AstroQuantConfig(backend="reference"))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, before)


def test_an_offloaded_linear_that_calibration_never_reaches_stays_offloaded(tiny4, tmp_path):
    off = AutoModelForCausalLM.from_pretrained(
        tiny4, quantization_config=_cfg(), device_map=MIXED, offload_folder=str(tmp_path / "o"))
    assert isinstance(off.model.layers[1].mlp.down_proj, QuantLinear)
    # the lm_head stays in full precision and on disk, as transformers placed it
    assert isinstance(off.lm_head, torch.nn.Linear) and off.lm_head.weight.device.type == "meta"


def test_meta_weights_without_hooks_are_refused():
    layer = torch.nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match="meta device and no accelerate hook"):
        execution_device(layer)


def test_solve_devices_is_retired_with_a_pointer_to_torchrun():
    # one multi-device path: torch.distributed (tests/test_distributed.py)
    with pytest.raises(TypeError, match="solve_devices was retired.*torchrun --nproc-per-node"):
        AstroQuantConfig(solve_devices=["cpu", "cpu"])


def test_tied_embeddings_offloaded_to_disk(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)).save_pretrained(
        tmp_path / "fp")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_cfg())
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_cfg(), device_map="auto",
                                               max_memory={"cpu": "20KB"}, offload_folder=str(tmp_path / "o"))
    ids = calib_ids(2, 16, seed=3)
    off.save_pretrained(tmp_path / "s")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s", quantization_config=AstroQuantConfig(backend="reference"))
    with torch.no_grad():
        expected = full(ids).logits
        assert torch.equal(off(ids).logits, expected) and torch.equal(back(ids).logits, expected)


@pytest.mark.parametrize("batch", [None, 4])
def test_offloaded_blocks_make_their_fp_inputs_stage_by_stage_with_the_same_bits(tiny4, tmp_path, monkeypatch, batch):
    # The stage-by-stage full-precision inputs (past stream.FP_CAPTURE_BUDGET) put each solved
    # Linear's original weights back for a forward: on disk-offloaded blocks too, whose other modules
    # accelerate loads around every call.
    import hf_astroquant.stream as stream

    kw = dict(method="gptaq", bits=3, desc_act=True, calibration_batch_size=batch)
    full = AutoModelForCausalLM.from_pretrained(tiny4, quantization_config=_cfg(**kw))
    monkeypatch.setattr(stream, "FP_CAPTURE_BUDGET", 0)
    off = AutoModelForCausalLM.from_pretrained(tiny4, quantization_config=_cfg(**kw), device_map=MIXED,
                                               offload_folder=str(tmp_path / "offload"))
    assert off.hf_quantizer.report.fp_stream_bytes < full.hf_quantizer.report.fp_stream_bytes
    _assert_same(_saved(off, tmp_path / "off"), _saved(full, tmp_path / "full"))
