"""Each block is calibrated with the keyword arguments the model itself gives it.

Models with `config.layer_types` give each layer type its own attention mask and rotary embeddings
(Gemma 3: sliding layers with rope θ = 10⁴ and a windowed mask, full layers with θ = 10⁶ and the
causal mask). Running every block with the first block's arguments moves the hidden states away
from the model's own from the first full-attention layer on.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from hf_astroquant import AstroQuantConfig, QuantLinear
from hf_astroquant.stream import capture_block_inputs, run_block
from tiny import SeenBlocks, calib_ids, tiny_llama

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def tiny_gemma3(seed=0):
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=LAYER_TYPES, max_position_embeddings=256)
    return Gemma3ForCausalLM(cfg).eval()


def _replay(blocks, x, kwargs_per_block):
    """Hidden states after each block when block i runs on block i−1's output with kwargs_per_block[i]."""
    out = []
    for block, kw in zip(blocks, kwargs_per_block):
        x = run_block(block, x, kw)
        out.append(x)
    return out


@torch.no_grad()
def test_every_block_gets_its_own_mask_and_rotary_embeddings():
    model = tiny_gemma3()
    batches = [calib_ids(2, 32, seed=1)]
    blocks = list(model.model.layers)
    inputs, kwargs = capture_block_inputs(model, blocks, batches)
    assert len(inputs) == 1 and [len(k) for k in kwargs] == [1, 1, 1, 1]
    own = model(batches[0], output_hidden_states=True).hidden_states  # embeddings, then each block's output
    replayed = _replay(blocks, inputs[0], [k[0] for k in kwargs])
    for i in range(len(blocks) - 1):  # the last entry is after the final norm
        assert torch.allclose(replayed[i], own[i + 1], atol=1e-5), i
    # the old behaviour, every block with block 0's arguments, is wrong from the first full-attention layer
    first_only = _replay(blocks, inputs[0], [kwargs[0][0]] * len(blocks))
    assert torch.allclose(first_only[0], own[1], atol=1e-5)
    assert not torch.allclose(first_only[1], own[2], atol=1e-3)
    # the layer types' own arguments: two distinct sets, alternating
    assert kwargs[0][0]["position_embeddings"] is kwargs[2][0]["position_embeddings"]
    assert kwargs[0][0]["position_embeddings"] is not kwargs[1][0]["position_embeddings"]


def test_the_recorders_leave_the_blocks_as_they_were():
    model = tiny_llama()
    blocks = list(model.model.layers)
    before = [b.forward for b in blocks]
    ids = calib_ids(2, 16, seed=2)
    with torch.no_grad():
        ref = model(ids).logits
        inputs, kwargs = capture_block_inputs(model, blocks, [ids, ids[:1]])
        assert torch.equal(model(ids).logits, ref)
    assert [len(k) for k in kwargs] == [2] * len(blocks) and [x.shape[0] for x in inputs] == [2, 1]
    assert all("forward" not in b.__dict__ for b in blocks) and [b.forward for b in blocks] == before
    # a Llama gives every block the same objects: nothing is held twice
    assert all(k[0]["position_embeddings"] is kwargs[0][0]["position_embeddings"] for k in kwargs)


def test_a_model_whose_code_between_blocks_fails_falls_back_to_the_first_blocks_kwargs(caplog):
    model = tiny_llama(layers=3)
    blocks = list(model.model.layers)
    # something the model runs after block 0 fails (here a hook on block 1, which runs before its recorder)
    handle = blocks[1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        inputs, kwargs = capture_block_inputs(model, blocks, [calib_ids(1, 8)])
    finally:
        handle.remove()
    assert [len(k) for k in kwargs] == [1, 1, 1] and kwargs[1][0] is kwargs[0][0] and kwargs[2][0] is kwargs[0][0]
    assert "could not record the keyword arguments of blocks [1, 2]" in caplog.text


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_gemma3_blocks_are_calibrated_with_their_own_arguments(tmp_path, method):
    """The calibration loop hands block i (and, for GPTAQ, its full-precision stream) block i's kwargs."""
    import hf_astroquant.pipeline as pipeline

    model = tiny_gemma3()
    model.save_pretrained(tmp_path / "fp")
    with pipeline.listening(SeenBlocks()) as seen:
        q = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp"), quantization_config=AstroQuantConfig(
            bits=4, group_size=16, method=method, dataset=calib_ids(8, 32)))
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 4 * 7
    assert not seen.fp_kwargs if method == "gptq" else len(seen.fp_kwargs) == 4
    for kwargs in ([seen.q_kwargs, seen.fp_kwargs] if method == "gptaq" else [seen.q_kwargs]):
        pe = [kwargs[i][0]["position_embeddings"] for i in range(4)]
        assert len(pe) == 4 and pe[0] is pe[2] and pe[1] is pe[3] and pe[0] is not pe[1]
        # sliding layers rotate with θ = 10⁴, full layers with θ = 10⁶: different cos tables
        assert not torch.allclose(pe[0][0], pe[1][0])
