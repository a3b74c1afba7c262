"""Tiny random mixture-of-experts models of the five transformers 5 families whose experts are fused
3-D parameters (hidden 64, 2 layers, 4 experts, top-2), built in the test."""

import torch
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, GptOssConfig, GptOssForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              max_position_embeddings=128)


def _config(family: str, experts: int):
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM, Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                                   num_experts=experts, num_experts_per_tok=2, head_dim=16,
                                                   decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen2_moe":
        return Qwen2MoeForCausalLM, Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                                   num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1,
                                                   shared_expert_intermediate_size=64, mlp_only_layers=[])
    if family == "mixtral":
        return MixtralForCausalLM, MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=experts,
                                                 num_experts_per_tok=2)
    if family == "deepseek_v3":  # layer 0 dense, layer 1 MoE with a shared expert
        return DeepseekV3ForCausalLM, DeepseekV3Config(
            **COMMON, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=experts, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rope_scaling=None)
    if family == "gpt_oss":  # transposed, interleaved experts with biases; sliding + full attention
        return GptOssForCausalLM, GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=experts,
                                               num_experts_per_tok=2, head_dim=16, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"])
    raise ValueError(family)


FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss")


def tiny_moe_model(family: str, experts: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cls, config = _config(family, experts)
    model = cls(config).eval()
    with torch.no_grad():  # transformers initialises the 3-D expert tensors to zero-mean N(0, 0.02): widen them
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.05 if "bias" in name else 0.2)
    return model
