"""The `hf-astroquant` CLI: every config option has a flag that reaches the config; bad input ends in
one clear line and exit status 2; quantize -> eval -> export -> push on a tiny model."""

import json
import subprocess
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_astroquant
from hf_astroquant import AstroQuantConfig, cli, pipeline
from hf_astroquant.export.card import REPORT_FILE
from tiny import CrashAfter, calib_ids, save_tiny, tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "fp", layers=2, hidden=64, inter=128)
    tiny_tokenizer().save_pretrained(root / "fp")
    (root / "calib.txt").write_text(TEXT)
    (root / "eval.txt").write_text(TEXT[::-1])
    return root


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_config_option_has_a_flag_with_help():
    parser = cli.build_parser()
    quantize = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("quantize"))
    flags = {s for action in quantize._actions for s in action.option_strings}
    helps = cli.option_help()
    for name in AstroQuantConfig._option_names():
        assert "--" + name.replace("_", "-") in flags, name
        assert len(helps[name]) > 20, name


def test_flags_reach_the_config():
    parser = cli.build_parser()
    args = parser.parse_args([
        "quantize", "m", "--out", "o", "--bits", "3", "--group-size", "32", "--sym", "--desc-act", "--static-groups",
        "--damp-percent", "0.05", "--no-true-sequential", "--method", "gptaq", "--mse", "--alpha", "0.5",
        "--asym-alpha", "auto", "--rounding", "beam", "--beam-width", "2", "--dataset", "c4", "--n-samples", "8",
        "--seqlen", "64", "--seed", "3", "--modules-to-not-convert", "mlp.down_proj", "layers.0", "--block-size", "64",
        "--calibration-batch-size", "4", "--backend", "reference", "--fp-samples", "6"])
    cfg = cli.config_from_args(args)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.static_groups) == (3, 32, True, True, True)
    assert (cfg.damp_percent, cfg.true_sequential, cfg.method, cfg.mse, cfg.alpha) == (0.05, False, "gptaq", True, 0.5)
    assert (cfg.asym_alpha, cfg.rounding, cfg.beam_width, cfg.dataset) == ("auto", "beam", 2, "c4")
    assert (cfg.n_samples, cfg.seqlen, cfg.seed, cfg.block_size, cfg.calibration_batch_size) == (8, 64, 3, 64, 4)
    assert cfg.modules_to_not_convert == ["mlp.down_proj", "layers.0"] and cfg.backend == "reference"
    assert cfg.fp_samples == 6
    unset = cli.config_from_args(parser.parse_args(["quantize", "m", "--out", "o", "--asym-alpha", "0.3"]))
    assert unset.bits == AstroQuantConfig().bits and unset.asym_alpha == 0.3  # unset flags keep the defaults


@pytest.mark.parametrize("argv,message", [
    (["quantize", "{fp}", "--out", "{tmp}/o", "--group-size", "0", "--dataset", "{calib}"],
     "group_size=0 is not valid; allowed: -1"),
    (["quantize", "{fp}", "--out", "{tmp}/o", "--asym-alpha", "2", "--dataset", "{calib}"],
     "asym_alpha=2.0 is not valid"),
    (["quantize", "{fp}", "--out", "{tmp}/o"], "needs calibration data: pass --dataset"),
    (["quantize", "{tmp}/missing.gguf", "--out", "{tmp}/o"], "GGUF file .*missing.gguf does not exist"),
    (["quantize", "{calib}", "--out", "{tmp}/o"], "neither a model directory .* nor a .gguf file"),
    (["quantize", "not a model", "--out", "{tmp}/o"], "'not a model' is not an existing path"),
    (["quantize", "{fp}", "--out", "{tmp}/o", "--dataset", "{tmp}/nofile.txt"],
     "neither an existing text file nor one of wikitext2, c4"),
    (["quantize", "no-such-org/no-such-model", "--out", "{tmp}/o", "--method", "rtn"],
     "no-such-org/no-such-model"),  # a Hub id: offline (HF_HUB_OFFLINE=1 in the test) it cannot be fetched
    (["eval", "{tmp}/nowhere"], "is not a saved model directory"),
    (["eval", "{fp}", "--data", ""], "nothing to evaluate"),
    (["export", "{fp}", "--format", "gptq", "--out", "{tmp}/g"], "cannot export to GPTQ: .* not an hf_astroquant"),
    (["export", "{fp}", "--format", "compressed-tensors", "--out", "{tmp}/g"],
     "cannot export to compressed-tensors: .* not an hf_astroquant"),
    (["export", "{fp}", "--format", "compressed-tensors", "--checkpoint-format", "gptq_v2", "--out", "{tmp}/g"],
     "--checkpoint-format is a GPTQ option; --format compressed-tensors has none"),
    (["push", "{fp}", "bad repo id"], "repo_id='bad repo id' is not a Hub repository id"),
    (["quantize", "{fp}", "--out", "{tmp}/o", "--dataset", "{calib}", "--max-memory", "lots"],
     "--max-memory 'lots': expected DEVICE=SIZE"),
])
def test_bad_input_is_one_clear_line(source, tmp_path, capsys, monkeypatch, argv, message):
    import re

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [a.format(fp=source / "fp", tmp=tmp_path, calib=source / "calib.txt") for a in argv]
    code, _, err = _run(argv, capsys)
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()


@pytest.mark.parametrize("argv,message", [
    (["quantize", "m", "--out", "o", "--bits", "5"], "invalid choice: 5"),
    (["quantize", "m", "--out", "o", "--damp-percent", "lots"], "invalid float value: 'lots'"),
    (["quantize", "m", "--out", "o", "--asym-alpha", "half"], "'half' is not a number in"),
    (["export", "d", "--format", "awq", "--out", "x"], "invalid choice: 'awq'"),
    (["quantize", "m"], "the following arguments are required: --out"),
])
def test_argument_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_quantize_eval_export_push_end_to_end(source, tmp_path, capsys, hub):
    out = tmp_path / "q"
    code, stdout, _ = _run(["quantize", source / "fp", "--out", out, "--bits", "4", "--group-size", "32", "--sym",
                            "--dataset", source / "calib.txt", "--n-samples", "8", "--seqlen", "32",
                            "--eval-data", source / "eval.txt", "--eval-seqlen", "64", "--license", "mit"], capsys)
    assert code == 0
    assert "layers quantized" in stdout and "perplexity, quantized" in stdout
    report = json.loads((out / REPORT_FILE).read_text())
    ppl = report["perplexity"]
    assert ppl["base"] > 1 and ppl["quantized"] > 1 and ppl["seqlen"] == 64 and report["license"] == "mit"
    assert "perplexity, quantized" in (out / "README.md").read_text()
    card = (out / "README.md").read_text()
    assert repr(out.name) in card and str(tmp_path) not in card  # the final directory by name, never its path
    assert not list(tmp_path.glob(".q.partial-*"))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert sum(isinstance(m, hf_astroquant.QuantLinear) for m in model.modules()) == 14

    code, stdout, _ = _run(["eval", out, "--data", source / "eval.txt", "--seqlen", "64"], capsys)
    assert code == 0 and f"{ppl['quantized']:.2f}" in stdout  # same text, same windows: same number
    code, stdout, _ = _run(["eval", out, "--data", source / "calib.txt", "--seqlen", "32",
                            "--baseline", source / "fp"], capsys)
    assert code == 0 and "baseline" in stdout
    after = json.loads((out / REPORT_FILE).read_text())["perplexity"]
    assert after["data"] == "text file calib.txt" and after["seqlen"] == 32 and after["base"] < after["quantized"]

    code, stdout, _ = _run(["export", out, "--format", "gptq", "--out", tmp_path / "g"], capsys)
    assert code == 0 and "desc_act" in stdout
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and "auto_map" not in config
    assert "vllm" in (tmp_path / "g" / "README.md").read_text()
    code, _, err = _run(["export", out, "--format", "gptq", "--out", tmp_path / "g"], capsys)
    assert code == 2 and "exists and is not empty" in err
    code, stdout, _ = _run(["export", out, "--format", "compressed-tensors", "--out", tmp_path / "ct"], capsys)
    assert code == 0 and "pack-quantized" in stdout and "lm_head" in stdout and "vLLM" not in stdout  # it serves this
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors" and "auto_map" not in config
    card = (tmp_path / "ct" / "README.md").read_text()
    assert "compressed-tensors" in card and "symmetric: True" in card and "4-bit" in card

    code, stdout, _ = _run(["push", out, "me/tiny-cli", "--private"], capsys)
    assert code == 0 and hub.repos == [("me/tiny-cli", True)] and "commit" in stdout
    pushed = AutoModelForCausalLM.from_pretrained(str(hub.root / "me--tiny-cli"))
    ids = calib_ids(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(pushed(ids).logits, model(ids).logits)


def test_offloaded_quantize_with_resume_matches_the_plain_run(source, tmp_path, capsys):
    from safetensors.torch import load_file

    common = ["quantize", source / "fp", "--dataset", source / "calib.txt", "--seqlen", "32", "--n-samples", "4",
              "--group-size", "32", "--backend", "reference"]
    code, _, err = _run(common + ["--out", tmp_path / "plain"], capsys)
    assert code == 0, err
    code, _, err = _run(common + ["--out", tmp_path / "off", "--max-memory", "cpu=10KB", "--offload-folder",
                                  tmp_path / "offload", "--resume-dir", tmp_path / "resume"], capsys)
    assert code == 0, err
    assert (tmp_path / "resume" / "state.json").exists() and any((tmp_path / "offload").iterdir())
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_out_dir_is_never_half_written(source, tmp_path, capsys):
    out = tmp_path / "q"
    common = ["quantize", source / "fp", "--out", out, "--method", "rtn", "--bits", "4", "--group-size", "32"]
    assert _run(common, capsys)[0] == 0
    first = (out / "model.safetensors").read_bytes()
    code, _, err = _run(common, capsys)
    assert code == 2 and "--overwrite" in err

    with pipeline.listening(CrashAfter(1, KeyboardInterrupt())), pytest.raises(KeyboardInterrupt):
        _run(common + ["--overwrite"], capsys)
    assert (out / "model.safetensors").read_bytes() == first  # the previous result is intact
    assert not list(tmp_path.glob(".q.*"))  # and no partial directory is left behind
    assert _run(common + ["--overwrite", "--bits", "8"], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8


def test_lm_eval_bridge(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    assert _run(["quantize", source / "fp", "--out", out, "--method", "rtn", "--group-size", "32"], capsys)[0] == 0
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = _run(["eval", out, "--data", "", "--tasks", "hellaswag"], capsys)
    assert code == 2 and "pip install lm-eval" in err
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["model"], calls["batch_size"] = pretrained, batch_size

    def simple_evaluate(model, tasks, limit):
        calls["tasks"], calls["limit"] = tasks, limit
        return {"results": {t: {"alias": t, "acc,none": 0.25, "acc_stderr,none": 0.01} for t in tasks}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    code, stdout, _ = _run(["eval", out, "--data", "", "--tasks", "arc_easy,piqa", "--limit", "5",
                            "--batch-size", "2"], capsys)
    assert code == 0 and calls["tasks"] == ["arc_easy", "piqa"] and calls["limit"] == 5 and calls["batch_size"] == 2
    assert isinstance(calls["model"].model.layers[0].mlp.up_proj, hf_astroquant.QuantLinear)
    assert json.loads((out / REPORT_FILE).read_text())["lm_eval"] == {"arc_easy/acc": 0.25, "piqa/acc": 0.25}
    assert "lm-eval arc_easy/acc" in (out / "README.md").read_text()


def test_python_dash_m_and_console_script():
    for cmd in ([sys.executable, "-m", "hf_astroquant", "--version"], ["hf-astroquant", "--version"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == f"hf-astroquant {hf_astroquant.__version__}"


def test_export_names_what_vllm_will_refuse(source, tmp_path, capsys):
    out = tmp_path / "q3"
    assert _run(["quantize", source / "fp", "--out", out, "--bits", "3", "--group-size", "32", "--method", "rtn"],
                capsys)[0] == 0
    code, stdout, _ = _run(["export", out, "--format", "compressed-tensors", "--out", tmp_path / "ct"], capsys)
    assert code == 0 and "vLLM" in stdout and "CPU kernel serves 4 bits only" in stdout
    code, stdout, _ = _run(["export", out, "--format", "gptq", "--checkpoint-format", "gptq_v2",
                            "--out", tmp_path / "g"], capsys)
    assert code == 0 and "refuses asymmetric GPTQ" in stdout and "4 or 8 bits, not 3" in stdout
