"""Crash-safe runs: checkpoints per block, restart after a SIGKILL, determinism.

A real subprocess is killed while it quantizes (after at least two blocks are checkpointed and
before the last); the restarted run must give the same checkpoint, bit for bit, as a run that
was never interrupted. Two runs with the same config, data and seed must write identical bytes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_astroquant  # noqa: F401
from hf_astroquant import AstroQuantConfig, QuantLinear
from tiny import CrashAfter, calib_ids, save_tiny

LAYERS = 6
RUN = r"""
import sys, time, torch
import hf_astroquant
from transformers import AutoModelForCausalLM
sys.path.insert(0, {tests!r})
from tiny import calib_ids
model_dir, out, resume_dir, method, slow = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
if slow:  # give the parent time to kill us between blocks: every decoder block's forward sleeps
    from transformers.models.llama import modeling_llama
    forward = modeling_llama.LlamaDecoderLayer.forward
    def sleepy(self, *a, **k):
        time.sleep(0.4)
        return forward(self, *a, **k)
    modeling_llama.LlamaDecoderLayer.forward = sleepy
cfg = hf_astroquant.AstroQuantConfig(bits=3, group_size=32, method=method, dataset=calib_ids(),
                                     resume_dir=resume_dir if resume_dir != "-" else None)
model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)
print("RESUMED", model.hf_quantizer.report.resumed_blocks)
model.save_pretrained(out)
"""


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny6")
    save_tiny(path, layers=LAYERS)
    return str(path)


def _run(tmp_path, *args, wait=True):
    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=str(Path(__file__).parent)))
    cmd = [sys.executable, str(script), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _weights(path: Path) -> list:
    """Every safetensors file's header (parsed) and data bytes. Not the raw file: safetensors
    writes the metadata map in Rust HashMap order, which changes from process to process."""
    out = []
    for f in sorted(path.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        out.append((f.name, json.loads(raw[8:8 + n]), raw[8 + n:]))
    assert out
    return out


def _blocks_done(resume_dir: Path) -> int:
    try:
        return json.loads((resume_dir / "state.json").read_text())["blocks_done"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow  # about 30 s each: the run is slowed on purpose so it can be killed between blocks
@pytest.mark.parametrize("method", ["gptq", "rescomp"])
def test_a_killed_run_resumes_and_matches_an_uninterrupted_run_bit_for_bit(tiny6, tmp_path, method):
    resume_dir = tmp_path / "resume"
    proc = _run(tmp_path, tiny6, tmp_path / "killed", resume_dir, method, 1, wait=False)
    deadline = time.time() + 300
    while _blocks_done(resume_dir) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _blocks_done(resume_dir)
    assert 2 <= done < LAYERS
    assert not (tmp_path / "killed").exists()  # it never got to save

    out = _run(tmp_path, tiny6, tmp_path / "resumed", resume_dir, method, 0)
    resumed = int(out.split("RESUMED")[1].split()[0])
    assert resumed >= done  # it started after the checkpointed blocks (maybe one more landed while dying)
    _run(tmp_path, tiny6, tmp_path / "plain", "-", method, 0)
    assert _weights(tmp_path / "resumed") == _weights(tmp_path / "plain")
    cfg_a = json.loads((tmp_path / "resumed" / "config.json").read_text())["quantization_config"]
    cfg_b = json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]
    assert cfg_a == cfg_b  # same quantized/skipped modules, calibration record; resume_dir is not recorded


def test_same_config_data_and_seed_give_identical_bytes(tiny6, tmp_path):
    texts = ["".join(chr(32 + (i * 7 + j) % 90) for j in range(400)) for i in range(6)]

    def run(out):
        from tiny import tiny_tokenizer

        cfg = AstroQuantConfig(bits=4, group_size=32, method="gptaq", dataset=texts, tokenizer=tiny_tokenizer(),
                               n_samples=8, seqlen=64, seed=3)
        AutoModelForCausalLM.from_pretrained(tiny6, quantization_config=cfg).save_pretrained(out)
        return _weights(out), (out / "config.json").read_bytes()

    assert run(tmp_path / "a") == run(tmp_path / "b")


def _quantize(path, **kw):
    kw.setdefault("dataset", calib_ids())
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=AstroQuantConfig(bits=4, group_size=32, **kw))


def test_a_finished_resume_dir_restores_every_block_without_calibrating(tiny6, tmp_path):
    first = _quantize(tiny6, resume_dir=str(tmp_path / "r"))
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert files == [f"block_{i:05d}.safetensors" for i in range(LAYERS)] + ["state.json"]  # streams dropped
    import hf_astroquant.pipeline as pipeline

    class NoBlock(pipeline.BlockListener):
        def before_block(self, *args):
            pytest.fail("calibrated a finished block")

    with pipeline.listening(NoBlock()):
        again = _quantize(tiny6, resume_dir=str(tmp_path / "r"))
    assert again.hf_quantizer.report.resumed_blocks == LAYERS
    assert again.hf_quantizer.report.layer_errors == first.hf_quantizer.report.layer_errors
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(isinstance(m, QuantLinear) for m in again.modules()) == 7 * LAYERS


@pytest.mark.slow  # three rescomp runs of a 6-block model
def test_a_crashed_run_resumes_with_its_partial_full_precision_stream(tiny6, tmp_path):
    """fp_samples: the checkpointed full-precision stream holds only its windows (5 of 16, across
    batches of 4); the resumed run picks it up and ends with the uninterrupted run's weights."""
    import hf_astroquant.pipeline as pipeline

    kw = dict(method="rescomp", fp_samples=5, calibration_batch_size=4)
    plain = _quantize(tiny6, **kw)
    with pipeline.listening(CrashAfter(2)), pytest.raises(RuntimeError, match="simulated crash"):
        _quantize(tiny6, resume_dir=str(tmp_path / "r"), **kw)
    assert _blocks_done(tmp_path / "r") == 2
    again = _quantize(tiny6, resume_dir=str(tmp_path / "r"), **kw)
    assert again.hf_quantizer.report.resumed_blocks == 2
    a, b = plain.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, named", [
    (dict(bits=3), "options (bits: 4 -> 3)"),
    (dict(dataset=calib_ids(seed=9)), "calibration data or batch size"),
    (dict(calibration_batch_size=4), "options (calibration_batch_size: None -> 4)"),
])
def test_a_resume_dir_from_another_run_is_refused(tiny6, tmp_path, change, named):
    _quantize(tiny6, resume_dir=str(tmp_path / "r"), rounding="gptq")
    kw = dict(resume_dir=str(tmp_path / "r"))
    bits = change.pop("bits", 4)
    with pytest.raises(ValueError, match=r"holds a run with different .*" + named.replace("(", r"\(").replace(
            ")", r"\)")):
        AutoModelForCausalLM.from_pretrained(tiny6, quantization_config=AstroQuantConfig(
            bits=bits, group_size=32, **{"dataset": calib_ids(), **kw, **change}))


def test_a_resume_dir_for_another_model_is_refused(tiny6, tmp_path):
    other = tmp_path / "other"
    save_tiny(other, layers=LAYERS, seed=7)  # same architecture, other weights
    _quantize(tiny6, resume_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"holds a run with different model weights \(lm_head.weight, "
                                         r"model.embed_tokens.weight\)"):  # (the norms are ones in both)
        _quantize(str(other), resume_dir=str(tmp_path / "r"))


def test_a_corrupt_state_file_is_reported(tiny6, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json is unreadable"):
        _quantize(tiny6, resume_dir=str(tmp_path / "r"))


def test_resume_dir_must_be_a_directory(tiny6, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        _quantize(tiny6, resume_dir=str(tmp_path / "f"))
    with pytest.raises(ValueError, match=r"resume_dir=3 is not valid; allowed: None or a directory path"):
        AstroQuantConfig(resume_dir=3)


def test_unfinished_temporary_files_are_cleared(tiny6, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "block_00000.safetensors.tmp").write_bytes(b"half a file")
    _quantize(tiny6, resume_dir=str(tmp_path / "r"), method="rtn")
    assert not list((tmp_path / "r").glob("*.tmp"))
    assert len(list((tmp_path / "r").glob("block_*.safetensors"))) == LAYERS


def test_resume_dir_is_not_written_to_the_checkpoint_config():
    assert "resume_dir" not in AstroQuantConfig(resume_dir="somewhere").to_dict()
    assert os.fspath(AstroQuantConfig(resume_dir=Path("x")).resume_dir) == "x"
