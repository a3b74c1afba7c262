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


@pytest.mark.parametrize("kw", [dict(), dict(method="gptaq"), dict(calibration_batch_size=4, desc_act=True)])
def test_a_stage_spread_over_devices_gives_the_same_checkpoint(tiny4, kw):
    # Two CPU "devices": the stage's Linears are solved in parallel threads and copied back, the
    # path that spreads q/k/v and gate/up over GPUs. On one device type the result must not move.
    import threading

    import hf_astroquant.pipeline as pipeline

    class Threads(pipeline.BlockListener):  # which thread solved each Linear
        def __init__(self):
            self.solved_in = {}

        def before_solve(self, name, weight, hessian, d):
            self.solved_in[name] = threading.current_thread()

    with pipeline.listening(Threads()) as seen:
        spread = AutoModelForCausalLM.from_pretrained(tiny4, quantization_config=_cfg(solve_devices=["cpu", "cpu"],
                                                                                        **kw))
    plain = AutoModelForCausalLM.from_pretrained(tiny4, quantization_config=_cfg(**kw))
    # q/k/v went out together, to worker threads
    assert seen.solved_in["model.layers.0.self_attn.q_proj"] is not threading.main_thread()
    assert len({seen.solved_in[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"}) == 2
    a, b = spread.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "solve_devices" not in spread.config.quantization_config.to_dict()


def test_solve_devices_auto_reads_the_accelerators_of_the_device_map():
    from hf_astroquant.block_solve import solve_devices

    model = torch.nn.Module()
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cuda:1", "lm_head": "cpu", "x": "disk"}
    assert solve_devices(AstroQuantConfig(solve_devices="auto"), model) == [torch.device("cuda:0"),
                                                                            torch.device("cuda:1")]
    model.hf_device_map = {"": "cpu"}
    assert solve_devices(AstroQuantConfig(solve_devices="auto"), model) is None  # nothing to spread over
    assert solve_devices(AstroQuantConfig(solve_devices=["auto"]), model) is None  # the CLI's form
    assert solve_devices(AstroQuantConfig(solve_devices=["cpu", "meta"]), model) == [torch.device("cpu"),
                                                                                     torch.device("meta")]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_stage_spread_over_two_gpus(tiny4):
    cfg = _cfg(solve_devices=["cuda:0", "cuda:1"])
    model = AutoModelForCausalLM.from_pretrained(tiny4, quantization_config=cfg, device_map={"": 0})
    assert all(m.qweight.device == torch.device("cuda:0") for m in model.modules() if isinstance(m, QuantLinear))


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
