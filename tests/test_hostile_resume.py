"""Resume identity by content (issue 43): hostile files and careless commands.

A resume_dir is reused only for the same weights (by content: another path to them is fine),
the same load dtype, and files that are what was written. One crashed run (2 of 4 blocks done)
is made once and copied into each test; an uninterrupted run is the reference for the bits.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_astroquant.pipeline as pipeline
from hf_astroquant import AstroQuantConfig, digests, resume
from tiny import CrashAfter, calib_ids, save_tiny

LAYERS, DONE = 4, 2


def _quantize(path, resume_dir=None, options=None, **kw):
    cfg = AstroQuantConfig(bits=4, group_size=32, dataset=calib_ids(), resume_dir=resume_dir, **(options or {}))
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, **kw)


def _same(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edited(src, dst, name, index=(0, 0), delta=1.0):
    """A copy of the checkpoint at `src`, saved to `dst`, with one element of the weight `name` changed
    (a fine-tune that froze everything else)."""
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.get_parameter(name)[index] += delta
    model.save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(model dir, resume dir of a run that crashed after DONE blocks, the uninterrupted quantized model)."""
    root = tmp_path_factory.mktemp("hostile")
    save_tiny(root / "fp", layers=LAYERS)
    with pipeline.listening(CrashAfter(DONE)), pytest.raises(RuntimeError, match="simulated crash"):
        _quantize(root / "fp", resume_dir=str(root / "crashed"))
    return str(root / "fp"), root / "crashed", _quantize(root / "fp")


@pytest.fixture
def crashed(made, tmp_path):
    """A fresh copy of the crashed run's resume dir."""
    shutil.copytree(made[1], tmp_path / "r")
    return tmp_path / "r"


def test_the_state_records_each_finished_block_and_file(made, crashed):
    state = json.loads((crashed / "state.json").read_text())
    assert state["format"] == resume.FORMAT == 2 and state["blocks_done"] == DONE
    assert sorted(state["blocks"]) == ["model.layers.0", "model.layers.1"]
    assert sorted(state["files"]) == ["block_00000.safetensors", "block_00001.safetensors", "stream_00002.safetensors"]
    for name, rec in state["files"].items():
        assert digests.file_digest(crashed / name) == (rec["size"], rec["digest"])
    model = AutoModelForCausalLM.from_pretrained(made[0])
    assert digests.block_digest(model.model.layers[1]) == state["blocks"]["model.layers.1"]
    fp = state["fingerprint"]
    assert fp["dtype"] == "float32"
    assert sorted(fp["model"]["weights"]) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert "_name_or_path" not in fp["model"]["config"] and "dtype" not in fp["model"]["config"]


def test_the_same_weights_from_another_path_resume_to_the_same_bits(made, crashed, tmp_path):
    shutil.copytree(made[0], tmp_path / "elsewhere")
    again = _quantize(tmp_path / "elsewhere", resume_dir=str(crashed))
    assert again.hf_quantizer.report.resumed_blocks == DONE
    assert _same(again, made[2])


def test_a_changed_finished_block_is_refused_naming_it(made, crashed, tmp_path):
    tuned = _edited(made[0], tmp_path / "tuned", "model.layers.1.mlp.down_proj.weight")  # embeddings frozen
    with pytest.raises(ValueError, match=r"resume_dir '.*' was written from other weights: model\.layers\.1 differs "
                                         r"\(sha256 [0-9a-f]{12}… recorded, [0-9a-f]{12}… now\); use another "
                                         r"resume_dir or delete this one"):
        _quantize(tuned, resume_dir=str(crashed))


def test_a_changed_unfinished_block_resumes_to_what_a_fresh_run_on_it_gives(made, crashed, tmp_path):
    """Only blocks 0 and 1 are finished. Their results (and the stream saved for block 2) depend on
    the calibration data, the weights outside the blocks and blocks 0-1, all checked; never on
    blocks 2-3. So a model that differs only in block 3 resumes to exactly the bits a fresh run on
    it gives: nothing of the old model's block 3 is in the directory to mix in."""
    tuned = _edited(made[0], tmp_path / "tuned", "model.layers.3.self_attn.q_proj.weight")
    again = _quantize(tuned, resume_dir=str(crashed))
    assert again.hf_quantizer.report.resumed_blocks == DONE
    fresh = _quantize(tuned)
    assert _same(again, fresh) and not _same(again, made[2])
    # and block 3's new digest is what the directory now records
    state = json.loads((crashed / "state.json").read_text())
    assert state["blocks_done"] == LAYERS
    assert state["blocks"]["model.layers.3"] == digests.block_digest(AutoModelForCausalLM.from_pretrained(tuned)
                                                                    .model.layers[3])


def test_a_changed_weight_outside_the_blocks_is_refused_naming_it(made, crashed, tmp_path):
    tuned = _edited(made[0], tmp_path / "tuned", "lm_head.weight")
    with pytest.raises(ValueError, match=r"holds a run with different model weights \(lm_head\.weight\)"):
        _quantize(tuned, resume_dir=str(crashed))


def test_another_load_dtype_is_refused_naming_dtype(made, crashed):
    with pytest.raises(ValueError, match=r"holds a run with different dtype \(float32 -> bfloat16\); use another"):
        _quantize(made[0], resume_dir=str(crashed), dtype=torch.bfloat16)


def _one_line_refusal(made, crashed, file, why):
    with pytest.raises(ValueError) as err:
        _quantize(made[0], resume_dir=str(crashed))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"resume_dir {str(crashed)!r}: {file} is damaged (")
    assert why in msg and msg.endswith("; delete the directory to start over")


def test_scales_multiplied_in_a_block_file_are_refused_naming_the_file(made, crashed):
    path = crashed / "block_00001.safetensors"
    tensors = load_file(path)
    scales = [k for k in tensors if k.endswith(".scales")]
    assert scales
    tensors[scales[0]] = tensors[scales[0]] * 7
    save_file(tensors, path)
    _one_line_refusal(made, crashed, "block_00001.safetensors", "")


def test_a_flipped_byte_is_refused_by_its_hash(made, crashed):
    for name in ("block_00000.safetensors", "stream_00002.safetensors"):
        shutil.copy(made[1] / "block_00000.safetensors", crashed / "block_00000.safetensors")
        shutil.copy(made[1] / "stream_00002.safetensors", crashed / "stream_00002.safetensors")
        path = crashed / name
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x10  # inside the last tensor's data: same size, still parses
        path.write_bytes(bytes(raw))
        _one_line_refusal(made, crashed, name, "hash differs from the one recorded when it was written")


@pytest.mark.parametrize("name", ["block_00001.safetensors", "stream_00002.safetensors"])
def test_a_truncated_file_is_refused_naming_it(made, crashed, name):
    path = crashed / name
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    _one_line_refusal(made, crashed, name, f"{size // 2} bytes, {size} were written")


def test_a_missing_file_is_refused_naming_it(made, crashed):
    (crashed / "stream_00002.safetensors").unlink()
    _one_line_refusal(made, crashed, "stream_00002.safetensors", "missing")


def test_an_unparsable_file_that_matches_a_forged_record_is_one_line(made, crashed):
    """Even when state.json was edited to match a garbage file, no raw SafetensorError escapes."""
    garbage = crashed / "block_00001.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    state = json.loads((crashed / "state.json").read_text())
    size, digest = digests.file_digest(garbage)
    state["files"]["block_00001.safetensors"] = {"size": size, "digest": digest}
    (crashed / "state.json").write_text(json.dumps(state))
    _one_line_refusal(made, crashed, "block_00001.safetensors", "unreadable: ")


def test_extra_files_in_the_directory_are_ignored(made, crashed):
    (crashed / "notes.txt").write_text("not ours")
    (crashed / "block_00003.safetensors").write_bytes(b"garbage from an older run")
    (crashed / "stream_00009.safetensors").write_bytes(b"more garbage")
    (crashed / "sub").mkdir()
    again = _quantize(made[0], resume_dir=str(crashed))
    assert again.hf_quantizer.report.resumed_blocks == DONE
    assert _same(again, made[2])
    assert (crashed / "notes.txt").exists()


def test_a_directory_in_the_old_format_is_refused(made, crashed):
    state = json.loads((crashed / "state.json").read_text())
    state["format"] = 1
    (crashed / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"was written in format 1; this version reads format 2\. Delete it"):
        _quantize(made[0], resume_dir=str(crashed))


def test_a_state_file_of_the_wrong_shape_is_reported(made, crashed):
    state = json.loads((crashed / "state.json").read_text())
    state["blocks_done"] = "2"
    (crashed / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"state\.json is unreadable \(bad blocks_done/n_blocks\); delete"):
        _quantize(made[0], resume_dir=str(crashed))


def test_a_crash_before_the_state_is_written_leaves_the_last_state_usable(made, tmp_path, monkeypatch):
    """state.json goes last: a run killed after block 2's files are in place but before the state
    that names them resumes from the previous state (block 2's stray file is ignored, then replaced)."""
    shutil.copytree(made[1], tmp_path / "r")
    real = resume.atomic_write_bytes

    def crash_on_state(path, data):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(resume, "atomic_write_bytes", crash_on_state)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _quantize(made[0], resume_dir=str(tmp_path / "r"))
    assert (tmp_path / "r" / "block_00002.safetensors").exists()
    assert (tmp_path / "r" / "stream_00003.safetensors").exists()
    assert json.loads((tmp_path / "r" / "state.json").read_text())["blocks_done"] == DONE
    monkeypatch.setattr(resume, "atomic_write_bytes", real)
    again = _quantize(made[0], resume_dir=str(tmp_path / "r"))
    assert again.hf_quantizer.report.resumed_blocks == DONE
    assert _same(again, made[2])
    assert not (tmp_path / "r" / "stream_00003.safetensors").exists()


def test_an_offloaded_model_resumes_checking_its_blocks_through_the_hooks(made, tmp_path):
    """Blocks 1-2 and lm_head on disk: the finished offloaded block is hashed from the offload store
    (the same digest the loop took from its onloaded weights), and the resumed run's bits are the
    uninterrupted one's."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "disk"}

    def run(n, **kw):
        return _quantize(made[0], device_map=device_map, offload_folder=str(tmp_path / f"offload{n}"), **kw)

    with pipeline.listening(CrashAfter(DONE)), pytest.raises(RuntimeError, match="simulated crash"):
        run(0, resume_dir=str(tmp_path / "r"))
    state = json.loads((tmp_path / "r" / "state.json").read_text())
    assert state["blocks"] == json.loads((made[1] / "state.json").read_text())["blocks"]  # same digests in memory
    again = run(1, resume_dir=str(tmp_path / "r"))
    assert again.hf_quantizer.report.resumed_blocks == DONE
    plain = run(2)

    def saved(model, out):  # the checkpoint's tensors (read back through the hooks)
        model.save_pretrained(out)
        return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}

    got = saved(again, tmp_path / "again")
    for want in (saved(plain, tmp_path / "plain"), saved(made[2], tmp_path / "in_memory")):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # and a changed offloaded finished block is caught from the store
    tuned = _edited(made[0], tmp_path / "tuned", "model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.1 differs"):
        _quantize(tuned, resume_dir=str(tmp_path / "r"), device_map=device_map, offload_folder=str(tmp_path / "o3"))


@pytest.mark.parametrize("options", [dict(transform="rotate"), dict(method="rtn")])
def test_a_rotated_or_rounded_run_resumes_to_the_same_bits(made, tmp_path, options):
    """transform="rotate": the blocks are hashed as the loop reads them, rotated (a function of the
    weights and the fingerprinted seed), and a resumed run's rotation gives the same digests.
    method="rtn": its block loop records the digests too."""
    plain = _quantize(made[0], options=options)
    with pipeline.listening(CrashAfter(DONE)), pytest.raises(RuntimeError, match="simulated crash"):
        _quantize(made[0], resume_dir=str(tmp_path / "r"), options=options)
    again = _quantize(made[0], resume_dir=str(tmp_path / "r"), options=options)
    assert again.hf_quantizer.report.resumed_blocks == DONE
    assert _same(again, plain)
    tuned = _edited(made[0], tmp_path / "tuned", "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.0 differs"):
        _quantize(tuned, resume_dir=str(tmp_path / "r"), options=options)
