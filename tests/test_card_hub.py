"""Model card (no remote code), load guard and the Hub upload path (intercepted at
huggingface_hub's commit API: nothing leaves the machine)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_astroquant
from hf_astroquant import AstroQuantConfig
from hf_astroquant.export.card import PLOT_FILE, REPORT_FILE, render_card
from hf_astroquant.checkpoint.save_hooks import OLD_STUB_MODULE
from hf_astroquant.export.hub import push_folder
from tiny import calib_ids, save_tiny, tiny_tokenizer

SNIPPET_RE = r"```python\n(.*?)```"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    save_tiny(root / "fp", layers=2, hidden=64, inter=128)
    (root / "fp" / "README.md").write_text("---\nlicense: mit\nbase_model: org/tiny-base\n---\n# tiny\n")
    model = AutoModelForCausalLM.from_pretrained(str(root / "fp"), quantization_config=AstroQuantConfig(
        bits=4, group_size=32, dataset=calib_ids()))
    tiny_tokenizer().save_pretrained(root / "q")  # first, so that the card's snippet loads it from here
    model.save_pretrained(root / "q")
    return model, root / "q"


def _logits(model):
    with torch.no_grad():
        return model(calib_ids(2, 16, seed=9)).logits


def test_save_writes_card_plot_report_and_no_remote_code(quantized):
    model, q = quantized
    card = ModelCard.load(q / "README.md")
    assert card.data.license == "mit" and card.data.base_model == "org/tiny-base"  # carried from the base card
    assert {"hf_astroquant", "4-bit"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert "![" in card.text and f"({PLOT_FILE})" in card.text
    png = (q / PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    report = json.loads((q / REPORT_FILE).read_text())
    assert len(report["layer_errors"]) == 14 and report["quantized_packed_bytes"] < report["quantized_fp16_bytes"]
    assert '"bits": 4' in card.text and "relative reconstruction error" in card.text
    config = json.loads((q / "config.json").read_text())
    assert "auto_map" not in config and not list(q.glob("*.py"))
    # the card asks for the import only; it names trust_remote_code only to say it is not needed
    assert "import hf_astroquant" in card.text and "trust_remote_code=True)" not in card.text
    assert "No\n`trust_remote_code=True`" in card.text


def test_a_resave_drops_the_remote_code_map_of_older_versions(quantized, tmp_path):
    _, q = quantized
    old = tmp_path / "old"
    shutil.copytree(q, old)
    config = json.loads((old / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": f"{OLD_STUB_MODULE}.AstroQuantLlamaForCausalLM"}
    (old / "config.json").write_text(json.dumps(config))
    AutoModelForCausalLM.from_pretrained(str(old)).save_pretrained(tmp_path / "new")
    assert "auto_map" not in json.loads((tmp_path / "new" / "config.json").read_text())


def test_the_cards_preset_and_choices_rows_skip_a_record_of_the_wrong_shape(quantized, tmp_path):
    _, q = quantized
    crafted = tmp_path / "crafted"
    shutil.copytree(q, crafted)
    config = json.loads((crafted / "config.json").read_text())
    config["quantization_config"]["preset"] = ["best"]
    (crafted / "config.json").write_text(json.dumps(config))
    report = json.loads((crafted / REPORT_FILE).read_text())
    report["choices"] = {"transform": "scale", "online_rotation": {"asked": "down", "chose": "none", "why": "w"}}
    (crafted / REPORT_FILE).write_text(json.dumps(report))
    text = str(render_card(crafted, plot=False))
    assert "| preset |" not in text and "transform (asked" not in text
    assert "| online_rotation (asked `down`) | `none`: w |" in text


def test_the_card_names_the_error_each_method_records(quantized, tmp_path):
    _, q = quantized
    assert json.loads((q / REPORT_FILE).read_text())["layer_error_kind"] == "output"
    save_tiny(tmp_path / "fp", layers=1, hidden=64, inter=128)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp"), quantization_config=AstroQuantConfig(
        bits=4, group_size=32, method="rtn"))
    model.save_pretrained(tmp_path / "rtn")
    report = json.loads((tmp_path / "rtn" / REPORT_FILE).read_text())
    text = (tmp_path / "rtn" / "README.md").read_text()
    assert report["layer_error_kind"] == "weight"
    assert "relative weight error ‖ΔW‖²/‖W‖²" in text and "tr(ΔW·H·ΔWᵀ)" not in text
    # and the recorded number is that weight-space error
    w = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp")).model.layers[0].mlp.up_proj.weight.detach()
    q_w = model.model.layers[0].mlp.up_proj.dequantize_weight()
    expected = float(((q_w - w) ** 2).sum() / (w ** 2).sum())
    assert report["layer_errors"]["model.layers.0.mlp.up_proj"] == pytest.approx(expected, rel=1e-4)


def test_card_usage_snippet_really_runs(quantized, tmp_path):
    import re

    _, q = quantized
    snippet = re.search(SNIPPET_RE, (q / "README.md").read_text(), re.S).group(1)
    assert repr(str(q)) in snippet
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("T h e")  # the prompt, decoded by the character tokenizer


def test_hand_written_readme_is_kept(quantized, tmp_path):
    model, _ = quantized
    (tmp_path / "README.md").write_text("# my own card\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"
    assert (tmp_path / REPORT_FILE).is_file()


def test_reload_and_resave_keeps_report_and_card(quantized, tmp_path):
    _, q = quantized
    reloaded = AutoModelForCausalLM.from_pretrained(str(q))
    reloaded.save_pretrained(tmp_path)
    assert json.loads((tmp_path / REPORT_FILE).read_text())["layer_errors"] == json.loads(
        (q / REPORT_FILE).read_text())["layer_errors"]
    assert (tmp_path / PLOT_FILE).is_file() and ModelCard.load(tmp_path / "README.md").data.license == "mit"


NO_PLUGIN = r"""
import sys
from transformers import AutoModelForCausalLM
path, mode = sys.argv[1:3]
try:
    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=(mode == "remote"))
except RuntimeError as err:
    print("REFUSED", err)
else:
    print("LOADED")
print("hf_astroquant" in sys.modules)
"""


@pytest.mark.parametrize("mode", ["plain", "remote"])
def test_without_the_plugin_loading_fails_loudly_and_runs_no_code(quantized, mode):
    _, q = quantized
    run = subprocess.run([sys.executable, "-c", NO_PLUGIN, str(q), mode], capture_output=True, text=True, timeout=300)
    assert "REFUSED" in run.stdout and "ignore_mismatched_sizes" in run.stdout, run.stdout + run.stderr[-2000:]
    assert "LOADED" not in run.stdout
    assert run.stdout.split()[-1] == "False"  # trust_remote_code found nothing to import


def _tamper(q, tmp_path, edit):

    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.qweight"), r"model.layers.1.mlp.up_proj.qweight: missing"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.scales": torch.zeros(3, 64)}),
     r"q_proj.scales: shape \[3, 64\], expected \[2, 64\]"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.qzeros":
                         t["model.layers.0.mlp.down_proj.qzeros"].float()}), r"down_proj.qzeros: dtype F32, expected I32"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.scales":
                         t["model.layers.0.mlp.down_proj.scales"].to(torch.int32)}), r"down_proj.scales: dtype I32"),
])
def test_tampered_checkpoint_is_refused(quantized, tmp_path, edit, message):
    _, q = quantized
    bad = _tamper(q, tmp_path, edit)
    with pytest.raises(ValueError, match="does not match its quantization config.*" + message):
        AutoModelForCausalLM.from_pretrained(str(bad))


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors_is_refused(quantized, tmp_path, damage):

    _, q = quantized
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    path = bad / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{garbage" + data[16:])
    with pytest.raises(ValueError, match="cannot read the safetensors file .*model.safetensors: Error while "
                                         "deserializing header"):
        AutoModelForCausalLM.from_pretrained(str(bad))


def test_model_push_to_hub_uploads_our_card_and_loads_back(quantized, hub):
    model, _ = quantized
    model.push_to_hub("me/tiny-astro-w4", private=True)
    assert hub.repos == [("me/tiny-astro-w4", True)]
    folder = hub.root / "me--tiny-astro-w4"
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", PLOT_FILE, REPORT_FILE} <= names
    card = (folder / "README.md").read_text()
    assert "from_pretrained('me/tiny-astro-w4')" in card and "hf_astroquant" in card
    assert "automatically generated" not in card  # not transformers' generic card
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    assert torch.equal(_logits(reloaded), _logits(model))


def test_save_pretrained_push_to_hub_and_push_folder(quantized, hub, tmp_path):
    model, q = quantized
    model.save_pretrained(tmp_path / "s", push_to_hub=True, repo_id="me/saved")
    assert (hub.root / "me--saved" / "README.md").is_file()
    push_folder(q, "me/folder", commit_message="hello")
    assert hub.commits[-1][:2] == ("me/folder", "hello")
    assert "from_pretrained('me/folder')" in (hub.root / "me--folder" / "README.md").read_text()
    assert "from_pretrained('me/folder')" not in (q / "README.md").read_text()  # the folder is left as it was
    with pytest.raises(ValueError, match="repo_id='not a repo' is not a Hub repository id"):
        push_folder(q, "not a repo")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_folder(tmp_path / "empty", "me/x")


def test_card_of_a_gptq_export_shows_serving_usage(quantized, tmp_path):
    from hf_astroquant.export.gptq import export_gptq

    _, q = quantized
    export_gptq(q, tmp_path / "g")
    card = render_card(tmp_path / "g", model_id="me/tiny-gptq")
    assert "vllm" in card.text and "quant_method: \"gptq\"" in card.text and "gptq" in card.data.tags
    assert hf_astroquant.__version__ in card.text
