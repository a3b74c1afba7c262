"""transformers' Conv1D (GPT-2): quantized like any Linear (its weight transposed to the Linear
convention), every weight matrix of the blocks packed, saved and reloaded to identical logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hf_astroquant import AstroQuantConfig
from hf_astroquant.full_precision import full_precision_weights
from hf_astroquant.linear_like import as_linear, convert_conv1d, features
from hf_astroquant.modules import QUANTIZED_LAYERS
from tiny import calib_ids


def test_as_linear_computes_what_the_conv1d_computes():
    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, 5, 40)
    linear = as_linear(conv)
    assert features(conv) == features(linear) == (40, 24)
    torch.testing.assert_close(linear(x), conv(x), rtol=0, atol=1e-6)
    root = torch.nn.Module()
    root.a, root.b = Conv1D(8, 4), Conv1D(8, 4)
    assert convert_conv1d(root, "blk", lambda n: n != "blk.b") == ["blk.a"]
    assert isinstance(root.a, torch.nn.Linear) and isinstance(root.b, Conv1D)
    with pytest.raises(ValueError, match="no weights in memory"):
        as_linear(Conv1D(8, 4).to("meta"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).eval().save_pretrained(root / "fp")
    return root


def _logits(model):
    with torch.no_grad():
        return model(calib_ids(2, 16, seed=9)).logits


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_gpt2_is_quantized_whole_and_reloads_identically(gpt2, method, tmp_path):
    fp = AutoModelForCausalLM.from_pretrained(gpt2 / "fp").eval()
    q = AutoModelForCausalLM.from_pretrained(gpt2 / "fp", quantization_config=AstroQuantConfig(
        bits=8, group_size=32, method=method, dataset=calib_ids()))
    blocks = {f"transformer.h.{i}": b for i, b in enumerate(q.transformer.h)}
    assert full_precision_weights(blocks, QUANTIZED_LAYERS) == {}  # walks the parameters, not a Linear list
    assert sum(isinstance(m, QUANTIZED_LAYERS) for m in q.modules()) == 8  # c_attn, c_proj, c_fc, mlp.c_proj × 2
    # at 8 bits the quantized model computes nearly what the fp one does: the transpose is right
    ref, got = _logits(fp), _logits(q)
    assert (got - ref).abs().max() / ref.abs().max() < 0.02
    q.save_pretrained(tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert torch.equal(_logits(back), got)
