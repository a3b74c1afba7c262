"""The CLI's workflows from Python (`hf_astroquant.workflows`): quantize -> evaluate -> push on a tiny
model write what the shell writes, and refuse what it refuses (ValueError, before anything loads,
nothing left at the output)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_astroquant
from hf_astroquant import AstroQuantConfig, pipeline, workflows
from hf_astroquant.export.card import REPORT_FILE
from hf_astroquant.output_dir import MANIFEST
from hf_astroquant.workflows import WorkflowError, evaluate, measurements_record, push, quantize
from tiny import CrashAfter, calib_ids, save_tiny, save_tiny_with_tokenizer, tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 40
RTN = dict(method="rtn", bits=4, group_size=32)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflows")
    save_tiny_with_tokenizer(root / "fp", layers=2, hidden=64, inter=128)
    (root / "calib.txt").write_text(TEXT)
    (root / "eval.txt").write_text(TEXT[::-1])
    return root


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_the_package_exports_the_workflows():
    assert hf_astroquant.quantize is quantize and hf_astroquant.evaluate is evaluate and hf_astroquant.push is push
    assert issubclass(WorkflowError, ValueError)


def test_quantize_evaluate_push(source, tmp_path, hub):
    out = tmp_path / "q"
    cfg = AstroQuantConfig(bits=4, group_size=32, sym=True, dataset=str(source / "calib.txt"), n_samples=8, seqlen=32)
    result = quantize(source / "fp", out, cfg, eval_data=source / "eval.txt", eval_seqlen=64, license="mit")
    assert result.out == out and cfg.tokenizer is None  # the caller's config is left as it was
    assert result.config.tokenizer is not None and result.config.bits == 4 and result.seconds > 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert result.report == report and report["license"] == "mit" and report["peak_rss_bytes"] > 0
    ppl = report["perplexity"]
    assert ppl == result.perplexity and ppl["base"] > 1 and ppl["quantized"] > 1 and ppl["seqlen"] == 64
    assert ppl["data"] == "text file eval.txt" and ppl["windows"] >= 1
    rows = dict(result.rows)
    assert rows["model"] == str(source / "fp") and rows["output"] == str(out) and rows["layers quantized"] == 14
    assert rows["perplexity, quantized (text file eval.txt)"] == f"{ppl['quantized']:.2f}"
    card = (out / "README.md").read_text()
    assert "perplexity, quantized" in card and repr(out.name) in card and str(tmp_path) not in card
    manifest = set(json.loads((out / MANIFEST).read_text())["files"])
    assert manifest == set(_tree(out)) - {MANIFEST} and "tokenizer.json" in manifest
    assert not list(tmp_path.glob(".q.*"))
    assert sum(isinstance(m, hf_astroquant.QuantLinear) for m in result.model.modules()) == 14

    tree = _tree(out)
    same = evaluate(out, data=source / "eval.txt", seqlen=64, write=False)
    assert f"{same.perplexity['quantized']:.2f}" == f"{ppl['quantized']:.2f}" and same.lm_eval is None
    assert same.report["perplexity"] == same.perplexity and _tree(out) == tree  # write=False: nothing written
    other = evaluate(out, data=source / "calib.txt", seqlen=32, baseline=source / "fp")
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved == other.report and saved["perplexity"] == other.perplexity and saved["license"] == "mit"
    assert other.perplexity["data"] == "text file calib.txt"
    assert other.perplexity["base"] < other.perplexity["quantized"]
    assert dict(other.rows)[f"perplexity, baseline {source / 'fp'}"] == f"{other.perplexity['base']:.2f}"
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == set(_tree(out)) - {MANIFEST}  # still ours

    pushed = push(out, "me/tiny-workflows", private=True)
    assert hub.repos == [("me/tiny-workflows", True)] and "commit" in pushed.commit.commit_url
    reloaded = AutoModelForCausalLM.from_pretrained(str(hub.root / "me--tiny-workflows"))
    ids = calib_ids(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, result.model(ids).logits)


def test_a_preset_config_runs_as_given_and_a_loaded_tokenizer_is_saved(source, tmp_path):
    cfg = AstroQuantConfig.recommended(4, "fast", group_size=32, dataset=str(source / "calib.txt"), n_samples=4,
                                       seqlen=32, tokenizer=tiny_tokenizer())
    result = quantize(source / "fp", tmp_path / "q", cfg)
    names = ("bits", "group_size", "sym", "method", "desc_act", "static_groups", "mse", "damp_percent", "dataset",
             "n_samples", "seqlen")
    assert {n: getattr(result.config, n) for n in names} == {n: getattr(cfg, n) for n in names}
    assert result.config.tokenizer is cfg.tokenizer and (tmp_path / "q" / "tokenizer.json").is_file()
    assert result.perplexity == {} and "perplexity" not in result.report
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["preset"] == cfg.preset and cfg.preset["quality"] == "fast"  # the preset's record is kept
    assert "| preset | `fast` at 4 bits |" in (tmp_path / "q" / "README.md").read_text()


@pytest.mark.parametrize("call,message", [
    (lambda s, t: quantize(s / "fp", t / "o", AstroQuantConfig()), "needs calibration data: pass --dataset"),
    (lambda s, t: quantize(t / "missing.gguf", t / "o", AstroQuantConfig(**RTN)),
     "GGUF file .*missing.gguf does not exist"),
    (lambda s, t: quantize(s / "calib.txt", t / "o", AstroQuantConfig(**RTN)), "neither a model directory"),
    (lambda s, t: quantize("not a model", t / "o", AstroQuantConfig(**RTN)), "'not a model' is not an existing path"),
    (lambda s, t: quantize(s / "fp", t / "o", AstroQuantConfig(dataset=str(t / "no.txt"))),
     "neither an existing text file nor one of wikitext2, c4"),
    (lambda s, t: quantize(s / "fp", t / "o", AstroQuantConfig(**RTN), max_memory=["lots"]),
     "--max-memory 'lots': expected DEVICE=SIZE"),
    (lambda s, t: quantize(s / "fp", t / "o", AstroQuantConfig(**RTN), offload_folder=s / "calib.txt"),
     "exists and is not a directory"),
    (lambda s, t: quantize(s / "fp", t / "o", AstroQuantConfig(**RTN), eval_seqlen=0), "eval_seqlen=0 is not valid"),
    (lambda s, t: quantize(s / "fp", t / "o", AstroQuantConfig(**RTN), dtype="float64"),
     "dtype='float64' is not valid"),
    (lambda s, t: quantize(s / "fp", t / "o", AstroQuantConfig(**RTN), eval_data="nothing-such"),
     "evaluation data 'nothing-such' is neither"),
    (lambda s, t: quantize(s / "fp", s / "fp", AstroQuantConfig(**RTN), overwrite=True), "is MODEL itself"),
    (lambda s, t: quantize(s / "fp", t / "o", AstroQuantConfig(**RTN, resume_dir=str(t / "o" / "state"))),
     "holds --resume-dir"),
    (lambda s, t: evaluate(t / "nowhere"), "is not a saved model directory"),
    (lambda s, t: evaluate(s / "fp", data=None), "nothing to evaluate"),
    (lambda s, t: evaluate(s / "fp", data="", tasks=""), "nothing to evaluate"),
    (lambda s, t: evaluate(s / "fp", seqlen=0), "seqlen=0 is not valid"),
    (lambda s, t: push(t / "nowhere", "me/x"), "is not a saved model directory"),
    (lambda s, t: push(s / "fp", "bad repo id"), "repo_id='bad repo id' is not a Hub repository id"),
])
def test_refusals_are_value_errors_before_any_work(source, tmp_path, monkeypatch, hub, call, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("hf_astroquant.workflows.sources._load_tokenizer",
                        lambda *a, **k: pytest.fail("loaded before the arguments were checked"))
    before = _tree(source)
    with pytest.raises(ValueError, match=message):
        call(source, tmp_path)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*")) and _tree(source) == before
    assert hub.repos == []


def test_the_data_is_checked_before_anything_loads(source, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("hf_astroquant.workflows.sources._load_tokenizer",
                        lambda *a, **k: pytest.fail("loaded before the data was checked"))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        quantize(source / "fp", tmp_path / "o", AstroQuantConfig(dataset="wikitext2"))
    with pytest.raises(ValueError, match="Offline, use 'wikitext2-raw'"):
        quantize(source / "fp", tmp_path / "o", AstroQuantConfig(**RTN), eval_data="wikitext2")


def test_a_tokenizer_that_cannot_load_is_refused_or_noted(tmp_path, capsys):
    save_tiny(tmp_path / "notok", layers=1, hidden=64, inter=128)
    (tmp_path / "calib.txt").write_text(TEXT)
    with pytest.raises(WorkflowError, match=r"cannot load the tokenizer of .*notok.* \(the directory has none of"):
        quantize(tmp_path / "notok", tmp_path / "o", AstroQuantConfig(dataset=str(tmp_path / "calib.txt")))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    quantize(tmp_path / "notok", tmp_path / "o", AstroQuantConfig(**RTN))  # round-to-nearest needs none
    assert "no tokenizer saved with the model" in capsys.readouterr().err and (tmp_path / "o" / "config.json").is_file()


def test_an_output_is_never_half_written_nor_replaced_unasked(source, tmp_path):
    out = tmp_path / "q"
    quantize(source / "fp", out, AstroQuantConfig(**RTN))
    first = _tree(out)
    with pytest.raises(ValueError, match="exists and is not empty; pass --overwrite"):
        quantize(source / "fp", out, AstroQuantConfig(**RTN))

    with pipeline.listening(CrashAfter(1, KeyboardInterrupt())), pytest.raises(KeyboardInterrupt):
        quantize(source / "fp", out, AstroQuantConfig(**RTN), overwrite=True)
    assert _tree(out) == first and not list(tmp_path.glob(".q.*"))
    (out / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that hf-astroquant did not write \(notes.md\)"):
        quantize(source / "fp", out, AstroQuantConfig(**RTN), overwrite=True)
    (out / "notes.md").unlink()
    quantize(source / "fp", out, AstroQuantConfig(**{**RTN, "bits": 8}), overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8


def test_placement_takes_a_mapping_or_the_shells_strings(tmp_path):
    from hf_astroquant.workflows.sources import _placement

    assert _placement(None, None, None) == {}
    assert _placement(None, {0: "20GiB", "cpu": "8GiB"}, None) == {"max_memory": {0: "20GiB", "cpu": "8GiB"},
                                                                     "device_map": "auto"}
    assert _placement(None, "cpu=8GiB", None)["max_memory"] == {"cpu": "8GiB"}
    assert _placement("cpu", ["0=20GiB", "cpu=8GiB"], tmp_path) == {
        "device_map": "cpu", "max_memory": {0: "20GiB", "cpu": "8GiB"}, "offload_folder": tmp_path}


def test_measurements_record_is_one_copy_with_what_was_measured():
    report = {"layer_errors": {"a": 0.1}, "source": "old"}
    record = measurements_record(report, source={"source": "org/m", "base_model": None, "license": "apache-2.0"},
                                 base_model="org/base", license=None, perplexity={"quantized": 9.0})
    assert report == {"layer_errors": {"a": 0.1}, "source": "old"}  # a copy
    assert record == {"layer_errors": {"a": 0.1}, "source": "org/m", "license": "apache-2.0",
                      "base_model": "org/base", "perplexity": {"quantized": 9.0}}
    assert list(record)[-1] == "perplexity"
    measured = measurements_record(None, lm_eval={"piqa/acc": 0.5}, peak_memory=True)
    assert measured["lm_eval"] == {"piqa/acc": 0.5} and measured["peak_rss_bytes"] > 0
    assert ("peak_cuda_bytes" in measured) == torch.cuda.is_available()
    assert workflows.measurements_record is measurements_record
