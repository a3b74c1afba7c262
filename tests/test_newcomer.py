"""What a new user meets first: readable output files, cards without local paths, fast offline
errors, shell help, and evaluation text that ships with the package."""

import json
import os
import re
import stat
import time

import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_astroquant import AstroQuantConfig, cli, hub_access
from hf_astroquant.calibration import CalibrationDataError
from hf_astroquant.eval import evaluation_text
from hf_astroquant.export.hub import base_model_info, hub_id_of
from tiny import calib_ids, save_tiny, tiny_tokenizer


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(directory):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*") if p.is_file()}


def test_saved_files_follow_the_umask(tmp_path, umask_022):
    save_tiny(tmp_path / "fp", layers=1, hidden=64, inter=128)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp"), quantization_config=AstroQuantConfig(
        bits=4, group_size=32, dataset=calib_ids(4, 16)))
    model.save_pretrained(tmp_path / "q")
    modes = _modes(tmp_path / "q")
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_cli_outputs_follow_the_umask_and_the_card_names_no_local_path(tmp_path, umask_022, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "models" / "my-tiny"
    save_tiny(src, layers=1, hidden=64, inter=128)
    tiny_tokenizer().save_pretrained(src)
    assert cli.main(["quantize", str(src), "--out", str(tmp_path / "q"), "--method", "rtn", "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "rerun with --base-model ORG/NAME" in out  # nothing names the base model: say how to
    assert set(_modes(tmp_path / "q").values()) == {0o644} and stat.S_IMODE((tmp_path / "q").stat().st_mode) == 0o755
    for name in ("README.md", "astroquant_report.json", "config.json"):
        assert str(tmp_path) not in (tmp_path / "q" / name).read_text(), name
    card = (tmp_path / "q" / "README.md").read_text()
    assert "quantization of my-tiny" in card
    assert cli.main(["quantize", str(src), "--out", str(tmp_path / "q2"), "--method", "rtn", "--group-size", "32",
                     "--base-model", "org/tiny-base"]) == 0
    assert ModelCard.load(tmp_path / "q2" / "README.md").data.base_model == "org/tiny-base"


def test_base_model_is_found_from_config_name_or_path(tmp_path):
    save_tiny(tmp_path / "fp", layers=1, hidden=64, inter=128)
    config = json.loads((tmp_path / "fp" / "config.json").read_text())
    info = base_model_info(tmp_path / "fp")
    assert info == {"source": "fp", "base_model": None, "license": None}
    config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "fp" / "config.json").write_text(json.dumps(config))
    info = base_model_info(str(tmp_path / "fp"))
    assert info["base_model"] == info["source"] == "HuggingFaceTB/SmolLM2-135M"
    config["_name_or_path"] = str(tmp_path / "fp")  # a local path is never taken for an id
    (tmp_path / "fp" / "config.json").write_text(json.dumps(config))
    assert base_model_info(tmp_path / "fp")["base_model"] is None


@pytest.mark.parametrize("text,expected", [
    ("org/name", "org/name"), ("https://huggingface.co/HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
    ("https://huggingface.co/datasets/wikitext/x", None), ("/home/me/model", None), ("name", None), (None, None),
    ("a b/c", None),
])
def test_hub_id_of(text, expected):
    assert hub_id_of(text) == expected


def test_hub_reachability_honours_the_offline_settings(monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no connection when offline"))
    assert hub_access.unreachable_reason() == "HF_HUB_OFFLINE is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert hub_access.unreachable_reason() == "HF_DATASETS_OFFLINE is set"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    calls = []

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout: calls.append((addr, timeout)) or Conn())
    assert hub_access.unreachable_reason() is None
    assert calls == [(("huggingface.co", 443), hub_access.CONNECT_TIMEOUT_S)]  # one attempt


def test_shipped_wikitext2_evaluates_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text, what = evaluation_text("wikitext2-raw")
    assert what == "WikiText-2 test (wiki.test.raw)" and text.startswith(" = Robert Boulter = \n")
    assert len(text) == 1_285_622 and "\r" not in text  # the released file, read with universal newlines
    start = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set. Offline, use 'wikitext2-raw'"):
        evaluation_text("wikitext2")
    assert time.perf_counter() - start < 5


def test_calibration_data_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    from hf_astroquant.quantizer import AstroQuantizer

    save_tiny(tmp_path / "fp", layers=1, hidden=64, inter=128)
    monkeypatch.setattr(AstroQuantizer, "_process_model_before_weight_loading",
                        lambda *a, **k: pytest.fail("the model was loaded before the data was checked"))
    with pytest.raises(CalibrationDataError, match="neither an existing text file"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp"), quantization_config=AstroQuantConfig(
            dataset=str(tmp_path / "missing.txt"), tokenizer=tiny_tokenizer()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationDataError, match="HF_HUB_OFFLINE is set"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp"), quantization_config=AstroQuantConfig(
            dataset="c4", tokenizer=tiny_tokenizer()))


def test_cli_checks_the_data_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("hf_astroquant.workflows.sources._load_tokenizer",
                        lambda *a, **k: pytest.fail("loaded before the data was checked"))
    save_tiny(tmp_path / "fp", layers=1, hidden=64, inter=128)
    for argv, message in [(["--dataset", "wikitext2"], "HF_HUB_OFFLINE is set"),
                          (["--dataset", str(tmp_path / "no.txt")], "neither an existing text file"),
                          (["--dataset", str(tmp_path / "fp" / "config.json"), "--eval-data", "wikitext2"],
                           "Offline, use 'wikitext2-raw'")]:
        assert cli.main(["quantize", str(tmp_path / "fp"), "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_cli_help_is_written_for_the_shell():
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name, command in sub.items():
        text = command.format_help()
        assert "None" not in text and "a list of" not in text and "``" not in text and "datasets.Dataset" not in text
        for action in command._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.dest)
    helps = cli.option_help()
    assert all("(default: " in h for h in helps.values())
    assert helps["bits"].endswith("(default: 4)") and helps["desc_act"].endswith("(default: --desc-act)")
    assert helps["calibration_batch_size"].endswith("(default: auto)") and helps["fp_samples"].endswith("(default: all)")


def test_a_bad_flag_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "m", "--out", "o", "--bits", "5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "usage:" not in err
    assert re.match(r"hf-astroquant quantize: error: argument --bits: invalid choice: 5 .*--help\)", err)
