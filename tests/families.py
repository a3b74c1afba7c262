"""Tiny random models (hidden 64, 2 blocks, vocab 128) of the decoder families transformers 5 ships,
built in the test: one row per family in FAMILIES. Sliding-window families get a window (8) shorter
than the calibration windows, with a full-attention layer beside a sliding one."""

import torch
import transformers as tf

from moe_families import FAMILIES as MOE_FAMILIES
from moe_families import tiny_moe_model

VOCAB = 128
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, **IDS)
HYBRID = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])

# family: (config class, its arguments). Where a family names its widths differently, its own names.
DENSE = {
    "llama": (tf.LlamaConfig, LLAMA_LIKE),
    "mistral": (tf.MistralConfig, dict(LLAMA_LIKE, sliding_window=8)),
    "qwen2": (tf.Qwen2Config, dict(LLAMA_LIKE, use_sliding_window=True, max_window_layers=1, **HYBRID)),
    "qwen3": (tf.Qwen3Config, dict(LLAMA_LIKE, head_dim=16)),
    "gemma": (tf.GemmaConfig, dict(LLAMA_LIKE, head_dim=16)),
    "gemma2": (tf.Gemma2Config, dict(LLAMA_LIKE, head_dim=16, **HYBRID)),
    "gemma3_text": (tf.Gemma3TextConfig, dict(LLAMA_LIKE, head_dim=16, **HYBRID)),
    "phi": (tf.PhiConfig, dict(LLAMA_LIKE, partial_rotary_factor=0.5)),
    "phi3": (tf.Phi3Config, LLAMA_LIKE),
    "gpt_neox": (tf.GPTNeoXConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128, **IDS)),
    "opt": (tf.OPTConfig, dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                               word_embed_proj_dim=64, vocab_size=VOCAB, max_position_embeddings=128, **IDS)),
    "falcon": (tf.FalconConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                     new_decoder_architecture=True, num_kv_heads=2, **IDS)),
    "gpt2": (tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                                 eos_token_id=0)),
    "stablelm": (tf.StableLmConfig, LLAMA_LIKE),
    "olmo": (tf.OlmoConfig, LLAMA_LIKE),
    "olmo2": (tf.Olmo2Config, LLAMA_LIKE),
    "cohere": (tf.CohereConfig, LLAMA_LIKE),
    "granite": (tf.GraniteConfig, LLAMA_LIKE),
    "smollm3": (tf.SmolLM3Config, dict(LLAMA_LIKE, no_rope_layers=[1, 0])),
    "glm4": (tf.Glm4Config, dict(LLAMA_LIKE, head_dim=16)),
}
MULTIMODAL = ("gemma3",)  # Gemma3ForConditionalGeneration: the language model inside is quantized
FAMILIES = tuple(DENSE) + MOE_FAMILIES + MULTIMODAL
LABELS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
          "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "phi": "Phi", "phi3": "Phi-3", "gpt_neox": "GPT-NeoX",
          "opt": "OPT", "falcon": "Falcon", "gpt2": "GPT-2", "stablelm": "StableLM", "olmo": "OLMo", "olmo2": "OLMo 2",
          "cohere": "Cohere", "granite": "Granite", "smollm3": "SmolLM3", "glm4": "GLM-4", "qwen3_moe": "Qwen3-MoE",
          "qwen2_moe": "Qwen2-MoE", "mixtral": "Mixtral", "deepseek_v3": "DeepSeek-V3", "gpt_oss": "gpt-oss",
          "gemma3": "Gemma 3 (image-text)"}


def _gemma3_conditional():
    cfg = tf.Gemma3Config(
        text_config=dict(LLAMA_LIKE, head_dim=16, vocab_size=300, **HYBRID),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    return tf.Gemma3ForConditionalGeneration(cfg)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `family` in eval mode, weights widened so quantization error is visible."""
    if family in MOE_FAMILIES:
        return tiny_moe_model(family, seed=seed)
    torch.manual_seed(seed)
    if family == "gemma3":
        model = _gemma3_conditional()
    else:
        config_class, kwargs = DENSE[family]
        model = tf.AutoModelForCausalLM.from_config(config_class(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model.eval()


def auto_class(family: str):
    return tf.AutoModelForImageTextToText if family in MULTIMODAL else tf.AutoModelForCausalLM


# ---- the checks the family matrix runs (tests/test_families.py asserts them; benchmarks/family_matrix.py
# ---- writes them into the README's supported-families table)

TRANSFORMS = ("rotate", "scale", "adaptive")


def block_list(model):
    from hf_astroquant.blocks import find_blocks

    name, blocks = find_blocks(model)
    return name, list(blocks)


@torch.no_grad()
def own_block_outputs(model, ids) -> list[torch.Tensor]:
    """What each block returns when the model itself runs on `ids` (forward hooks on the blocks)."""
    outs, handles = [], []
    for block in block_list(model)[1]:
        handles.append(block.register_forward_hook(
            lambda m, a, out: outs.append((out[0] if isinstance(out, tuple) else out).detach().clone())))
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return outs


def relative_deviation(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max over blocks of max|got − want| / max|want|."""
    assert len(got) == len(want), (len(got), len(want))
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))


@torch.no_grad()
def replay_deviation(model, ids) -> float:
    """The pipeline's block inputs and per-block keyword arguments (capture_block_inputs), replayed
    block after block with _run_block, against the model's own block outputs."""
    from hf_astroquant.stream import capture_block_inputs, run_block

    blocks = block_list(model)[1]
    inputs, kwargs = capture_block_inputs(model, blocks, [ids])
    x, got = inputs[0], []
    for block, kw in zip(blocks, kwargs):
        x = run_block(block, x, kw[0])
        got.append(x)
    return relative_deviation(got, own_block_outputs(model, ids))


@torch.no_grad()
def fold_outcome(family: str, transform: str, ids) -> str:
    """'exact <deviation>' when every fold of `transform` keeps the model's logits (fp32), else
    'refused: <the pipeline's reason>'. The blocks are prepared as the pipeline prepares them
    (Conv1D as Linear, experts split); every 1-D parameter (norms' γ and β, biases) is perturbed so
    that folding them matters; scales are random at every site where they fold."""
    from hf_astroquant import folding as pc
    from hf_astroquant.experts import split_all
    from hf_astroquant.linear_like import convert_conv1d

    model = tiny_model(family)
    g = torch.Generator().manual_seed(2)
    for p in model.parameters():  # norms' γ and β, biases: not at their initial ones and zeros
        if p.dim() == 1 and p.is_floating_point():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    name, blocks = block_list(model)
    names = [f"{name}.{i}" for i in range(len(blocks))]
    for n, block in zip(names, blocks):
        convert_conv1d(block, n, lambda _: True)
        split_all(block, n, lambda _: True)
    try:
        sites = pc.check_foldable(model, blocks, names, transform)
    except pc.TransformError as exc:
        return f"refused: {exc}"
    ref = model(input_ids=ids).logits
    if transform in ("rotate", "adaptive"):
        pc.rotate_residual(model, sites, seed=0)
    if transform in ("scale", "adaptive"):
        g = torch.Generator().manual_seed(1)
        for bs in sites:
            for site in pc.scale_sites(bs):
                pc.apply_scales(model, bs, site, torch.rand(pc.site_width(bs, site), generator=g) + 0.5)
    out = model(input_ids=ids).logits
    assert not torch.equal(out, ref), "nothing was folded"
    return f"exact {float((out - ref).abs().max() / ref.abs().max()):.1e}"


def quantize_checked(family: str, method: str, fp_dir, out_dir, dataset) -> dict:
    """Quantize the saved tiny model of `family` with `method` and measure what the matrix asserts:
    the block parameters left in full precision (walking the parameters) and the routers, the
    full-precision stream against the model's own block outputs (gptaq), and the reload's logits."""
    import hf_astroquant.pipeline as pipeline
    from hf_astroquant import AstroQuantConfig
    from hf_astroquant.full_precision import full_precision_weights
    from hf_astroquant.experts import router_names
    from hf_astroquant.modules import QUANTIZED_LAYERS

    auto = auto_class(family)
    fp_model = auto.from_pretrained(fp_dir).eval()
    own = own_block_outputs(fp_model, dataset)
    stream = []

    class FullPrecisionOutputs(pipeline.BlockListener):
        def after_block(self, i, name, result):
            if result.fp_outputs is not None:
                stream.append(torch.cat(result.fp_outputs))

    with pipeline.listening(FullPrecisionOutputs()):
        q = auto.from_pretrained(fp_dir, quantization_config=AstroQuantConfig(
            bits=4, group_size=16, method=method, dataset=dataset)).eval()
    name, blocks = block_list(q)
    left = full_precision_weights({f"{name}.{i}": b for i, b in enumerate(blocks)}, QUANTIZED_LAYERS)
    ids = dataset[:2, :16]
    with torch.no_grad():
        logits = q(input_ids=ids).logits
    q.save_pretrained(out_dir)
    back = auto.from_pretrained(out_dir).eval()
    with torch.no_grad():
        reload_identical = torch.equal(back(input_ids=ids).logits, logits)
    return dict(
        model_class=type(q).__name__,
        packed=sum(isinstance(m, QUANTIZED_LAYERS) for m in q.modules()),
        full_precision={n for shares in left.values() for n in shares},
        routers=router_names(q),
        fp_stream_deviation=relative_deviation(stream, own) if stream else None,
        reload_identical=reload_identical,
    )
