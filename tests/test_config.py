import json

import pytest
import torch

from hf_astroquant import AstroQuantConfig


def test_defaults_and_quant_method():
    cfg = AstroQuantConfig()
    assert cfg.quant_method == "astroquant" and cfg.bits == 4 and cfg.method == "gptq"
    d = cfg.to_dict()
    assert d["quant_method"] == "astroquant"
    json.dumps(d)


@pytest.mark.parametrize("name,value", [
    ("bits", 2), ("bits", 3), ("bits", 8), ("group_size", -1), ("group_size", 1), ("group_size", 96),
    ("sym", True), ("desc_act", False), ("static_groups", False), ("damp_percent", 0.1), ("damp_percent", 1),
    ("true_sequential", False), ("method", "rtn"), ("mse", False), ("n_samples", 1), ("seqlen", 16),
    ("seed", 7), ("modules_to_not_convert", ["mlp.down_proj"]), ("block_size", 1), ("calibration_batch_size", 3),
])
def test_every_option_is_kept_and_round_trips_through_json(name, value):
    cfg = AstroQuantConfig(**{name: value})
    assert getattr(cfg, name) == value
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d[name] == value
    again = AstroQuantConfig.from_dict(d)
    assert getattr(again, name) == value
    assert again.to_dict() == d


def test_unknown_option_is_an_error_naming_it():
    with pytest.raises(TypeError, match="bit"):
        AstroQuantConfig(bit=4)


def test_to_dict_leaves_calibration_data_out():
    cfg = AstroQuantConfig(dataset=["some text"], tokenizer=lambda text, **kw: None)  # any callable stands for a tokenizer
    d = cfg.to_dict()
    assert "dataset" not in d and "tokenizer" not in d
    json.dumps(d)
    cfg = AstroQuantConfig(dataset=torch.zeros(2, 8, dtype=torch.long))
    assert "dataset" not in cfg.to_dict()


def test_records_round_trip():
    d = AstroQuantConfig().to_dict()
    d.update(quantized_modules=["model.layers.0.mlp.up_proj"], calibration={"source": "x", "n_samples": 1})
    cfg = AstroQuantConfig.from_dict(d)
    assert cfg.quantized_modules == ["model.layers.0.mlp.up_proj"] and cfg.calibration["source"] == "x"
    with pytest.raises(ValueError, match="checkpoint_format"):
        AstroQuantConfig(checkpoint_format="gptq")
    with pytest.raises(ValueError, match="quant_method"):
        AstroQuantConfig(quant_method="gptq")


def test_repr_and_diff_dict():
    cfg = AstroQuantConfig(bits=3)
    assert "bits" in cfg.to_diff_dict() and "group_size" not in cfg.to_diff_dict()
    assert "AstroQuantConfig" in repr(cfg)


def test_registration_is_idempotent():
    """Importing twice, reloading, or registering again keeps one working registration."""
    import subprocess
    import sys

    code = (
        "import importlib, hf_astroquant\n"
        "importlib.reload(hf_astroquant); hf_astroquant._register()\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as C, AUTO_QUANTIZER_MAPPING as Q\n"
        "assert Q['astroquant'] is hf_astroquant.AstroQuantizer\n"
        "assert C['astroquant'] is hf_astroquant.AstroQuantConfig\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
