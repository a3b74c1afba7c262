"""Weight matrices left in full precision inside the decoder blocks are found by walking the
parameters (not the list of Linears), warned about once with their share of the block, and recorded
in the report and the card."""

import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_astroquant import AstroQuantConfig
from hf_astroquant.full_precision import full_precision_weights, summary
from hf_astroquant.export.card import REPORT_FILE
from tiny import calib_ids, save_tiny


class Packed(nn.Module):  # stands in for a packed layer: it holds no weight parameter
    def __init__(self, i, o):
        super().__init__()
        self.in_features, self.out_features = i, o
        self.bias = nn.Parameter(torch.zeros(o))


def test_shares_by_walking_the_parameters():
    block = nn.Module()
    block.attn = Packed(8, 16)  # 128 elements, packed
    block.norm = nn.LayerNorm(8)  # vectors: counted nowhere
    block.experts = nn.Module()
    block.experts.gate_up = nn.Parameter(torch.zeros(4, 6, 8))  # 192, a 3-D stack of matrices
    block.router = nn.Linear(8, 4, bias=True)  # 32 (its bias not counted)
    other = nn.Module()
    other.proj = Packed(8, 8)
    found = full_precision_weights({"m.0": block, "m.1": other}, (Packed,))
    assert found == {"m.0": {"m.0.experts.gate_up": 192 / 352, "m.0.router.weight": 32 / 352}}
    assert summary(found) == "2 tensor(s), up to 63.6% of a block's weights (listed in astroquant_report.json)"
    assert summary({}) == "none"


def tiny_moe(path):
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                         num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=128, max_position_embeddings=128, decoder_sparse_step=1,
                         mlp_only_layers=[])
    Qwen3MoeForCausalLM(cfg).eval().save_pretrained(path)


def test_moe_experts_left_in_full_precision_are_warned_about_and_recorded(tmp_path, caplog):
    tiny_moe(tmp_path / "fp")
    with caplog.at_level(logging.WARNING, logger="hf_astroquant"):  # experts excluded: they stay fused, in fp32
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=AstroQuantConfig(
            bits=4, group_size=32, method="rtn", modules_to_not_convert=["lm_head", "experts"]))
    found = model.astroquant_report["full_precision_weights"]
    assert set(found) == {"model.layers.0", "model.layers.1"}
    names = set(found["model.layers.0"])
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
            "model.layers.0.mlp.gate.weight"} == names
    # experts: gate_up 4·64·64 = 16384 and down 4·64·32 = 8192 elements; router 4·64; attention (packed)
    # q, o 64·64 and k, v 32·64: 12288; so 37120 in all
    assert found["model.layers.0"]["model.layers.0.mlp.experts.gate_up_proj"] == pytest.approx(16384 / 37120)
    warnings = [r.getMessage() for r in caplog.records if "left in full precision" in r.getMessage()]
    assert len(warnings) == 1 and "model.layers.0.mlp.experts.gate_up_proj (44.1% of its block)" in warnings[0]
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / REPORT_FILE).read_text())
    assert saved["full_precision_weights"] == found
    card = (tmp_path / "q" / "README.md").read_text()
    assert "weights left in full precision inside the blocks | 6 tensor(s), up to 66.9% of a block's weights" in card


def test_excluded_linears_are_listed_and_a_dense_model_lists_nothing(tmp_path, caplog):
    save_tiny(tmp_path / "fp", layers=2, hidden=64, inter=128)
    with caplog.at_level(logging.WARNING, logger="hf_astroquant"):
        whole = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=AstroQuantConfig(
            bits=4, group_size=32, dataset=calib_ids()))
    assert whole.astroquant_report["full_precision_weights"] == {}
    assert not [r for r in caplog.records if "left in full precision" in r.getMessage()]
    part = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=AstroQuantConfig(
        bits=4, group_size=32, method="rtn", modules_to_not_convert=["lm_head", "down_proj"]))
    found = part.astroquant_report["full_precision_weights"]
    # per block: q, o 64·64; k, v 64·32; gate, up, down 64·128
    assert found["model.layers.1"] == {"model.layers.1.mlp.down_proj.weight": pytest.approx(8192 / 36864)}


def test_the_cli_summary_names_what_stayed_in_full_precision(tmp_path, capsys):
    from hf_astroquant import cli
    from tiny import tiny_tokenizer

    tiny_moe(tmp_path / "fp")
    tiny_tokenizer().save_pretrained(tmp_path / "fp")
    code = cli.main(["quantize", str(tmp_path / "fp"), "--out", str(tmp_path / "q"), "--bits", "4", "--group-size",
                     "32", "--method", "rtn", "--modules-to-not-convert", "lm_head", "experts"])
    assert code == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "full precision in the blocks" in x)
    assert "6 tensor(s), up to 66.9% of a block's weights" in line


def test_a_multimodal_wrapper_quantizes_its_language_model_and_records_the_vision_tower(tmp_path):
    from transformers import AutoModelForImageTextToText, Gemma3Config, Gemma3ForConditionalGeneration

    from hf_astroquant.blocks import text_config
    from hf_astroquant.stream import auto_batch_size

    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    fp = Gemma3ForConditionalGeneration(cfg).eval()
    fp.save_pretrained(tmp_path / "fp")
    assert text_config(fp).hidden_size == 64  # the top-level config has none: the heuristics read this one
    # the batch-size heuristic sizes a window by the text model's widths, not by defaults for a 7B model
    assert auto_batch_size(fp, 32, torch.device("cpu")) > auto_batch_size(torch.nn.Module(), 32, torch.device("cpu"))
    q = AutoModelForImageTextToText.from_pretrained(tmp_path / "fp", quantization_config=AstroQuantConfig(
        bits=4, group_size=32, dataset=calib_ids()))
    report = q.astroquant_report
    assert report["full_precision_weights"] == {}  # every weight matrix of the language model's blocks is packed
    assert set(report["full_precision_outside_blocks"]) == {"model.vision_tower", "model.multi_modal_projector",
                                                            "model.language_model.embed_tokens", "lm_head"}
    assert all(n.startswith("model.language_model.layers.") for n in q.config.quantization_config.quantized_modules)
    assert len(q.config.quantization_config.quantized_modules) == 14
    for (name, a), b in zip(fp.model.vision_tower.named_parameters(), q.model.vision_tower.parameters()):
        assert torch.equal(a, b), name  # the vision tower is untouched
    q.save_pretrained(tmp_path / "q")
    assert "`model.vision_tower`" in (tmp_path / "q" / "README.md").read_text()
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "q").eval()
    ids = calib_ids(2, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, q(input_ids=ids).logits)
