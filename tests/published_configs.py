"""config.json of seven released MoE models, key for key as published, with where each was read,
and the parameter counts their authors publish (test_plan_sizes.py checks the size model
against them). The architecture keys are what matters; bookkeeping keys are kept as found."""

from __future__ import annotations

# Read from https://huggingface.co/Gokuldaskumar/mistral-8x7b-instruct/blob/main/config.json, a
# "Duplicate from mistralai/Mixtral-8x7B-Instruct-v0.1" (the base Mixtral-8x7B-v0.1 has the same shapes).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

# Read from https://huggingface.co/MaziyarPanahi/Qwen1.5-MoE-A2.7B-Wikihow/blob/main/config.json,
# a fine-tune whose "_name_or_path" is Qwen/Qwen1.5-MoE-A2.7B and whose shapes are the base model's
# (the same keys appear in RichardErkhov/Qwen_-_Qwen1.5-MoE-A2.7B-8bits, beside its own quantization).
QWEN15_MOE_A27B = {
    "_name_or_path": "Qwen/Qwen1.5-MoE-A2.7B",
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "decoder_sparse_step": 1,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Read from github.com/citsjtu2020/LLM-Prof, sglang/Model_Config.md, which lists the released
# config.json of several Qwen models; this is its "Qwen3-30B-A3B" entry.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Read from https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/fba02cfdd0fb5b8d8b843154a3aee75c02abd4a5/config.json
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "clip_qkv": None,
    "eos_token_id": 50279,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 1024,
    "max_position_embeddings": 4096,
    "model_type": "olmoe",
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 16,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "pad_token_id": 1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 50304,
}

# Read from https://huggingface.co/nicoboss/DeepSeek-V2-Lite-Chat-Uncensored/blame/081e605737b63fda52ccd69b5629ae9ece927fcb/config.json
# (a fine-tune of deepseek-ai/DeepSeek-V2-Lite-Chat, same architecture as DeepSeek-V2-Lite; the same
# keys in https://huggingface.co/ModelCloud/DeepSeek-V2-Lite-gptq-4bit/blob/main/config.json, whose
# "_name_or_path" is DeepSeek-V2-Lite). Its tail, v_head_dim and vocab_size, as in deepseek-ai's
# inference config of this shape: https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/refs%2Fpr%2F49/inference/configs/config_16B.json
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 102400,
}

# Read from https://huggingface.co/JPAdams12th/dormant-model-2/blob/main/config.json, a copy of
# deepseek-ai/DeepSeek-V3's config.json with its FP8 quantization_config (the same keys, without it,
# in https://gitcode.com/cann/cann-recipes-train/blob/master/llm_rl/deepseek/verl_patches/config.json).
# Its tail, v_head_dim and vocab_size, as DeepseekV3Config's defaults ("similar to DeepSeek-V3"):
# https://docs.vllm.ai/en/v0.11.0/api/vllm/transformers_utils/configs/deepseek_v3.html
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 129280,
}

# Read from github.com/EchoCog/gpt-oss-20b, config.json (a copy of openai/gpt-oss-20b). That copy's
# quantization_config says "gptq"; the release's says "mxfp4" (the same repository's
# docs/gpt-oss-20b-architecture.md, and the layout of every gpt_oss fine-tune's config.json, e.g.
# https://huggingface.co/cryptonaut/AltiMind-sft/blob/main/config.json), which is what is kept here.
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}

# name -> (config, published total, published active, whether the active count includes the input
# embedding table). Mistral, Qwen and AI2 count every parameter a token uses, the embedding table
# included; DeepSeek and OpenAI leave the input embedding out of "activated" (DeepSeek-V3's
# README_WEIGHTS: 36.6B activated "including 0.9B for the output Head").
PUBLISHED = {
    # "46.7B total parameters but only uses 12.9B parameters per token": the model card, as in
    # github.com/Azure/azureml-assets, assets/models/system/mistralai-Mixtral-8x7B-Instruct-v01/description.md
    "Mixtral-8x7B": (MIXTRAL_8X7B, 46.7e9, 12.9e9, True),
    # "14.3B parameters in total and 2.7B activated parameters during runtime": the model card, as in
    # github.com/YinanWusoymilk/hf-readme, training_and_application/readme_files/Qwen_Qwen1.5-MoE-A2.7B-Chat.md
    "Qwen1.5-MoE-A2.7B": (QWEN15_MOE_A27B, 14.3e9, 2.7e9, True),
    # "Number of Parameters: 30.5B in total and 3.3B activated": the model card, as in
    # https://hf-p-cfw.fyan.top/gtkunit/Qwen3-30B-A3B-6.0bpw-h6-exl2
    "Qwen3-30B-A3B": (QWEN3_30B_A3B, 30.5e9, 3.3e9, True),
    # "6.9B total / 1.3B active per token" (OLMoE paper, arXiv:2409.02060), as in https://labindex.ai/outputs/ai2/olmoe
    "OLMoE-1B-7B": (OLMOE_1B_7B, 6.9e9, 1.3e9, True),
    # "15.7B total parameters, 2.4B activated" (DeepSeek-V2 paper, arXiv:2405.04434), as in
    # https://promptlayer.com/models/deepseek-v2-lite-fa0e
    "DeepSeek-V2-Lite": (DEEPSEEK_V2_LITE, 15.7e9, 2.4e9, False),
    # "Total parameters: 671B; Activation parameters: 36.6B (including 0.9B for the output Head)", the
    # main model without its multi-token-prediction module:
    # https://huggingface.co/deepseek-ai/DeepSeek-V3-Base/blame/main/README_WEIGHTS.md
    "DeepSeek-V3": (DEEPSEEK_V3, 671e9, 36.6e9, False),
    # "gpt-oss-20b consists of 20.9 billion total parameters" (the gpt-oss model card, as in
    # https://askpandi.com/pandipedia/fast-facts-gpt-oss-model-architecture); "~21B total parameters,
    # ~3.6B active per token": https://docs.studio.nebius.com/cookbook/models/gpt-oss
    "gpt-oss-20b": (GPT_OSS_20B, 20.9e9, 3.6e9, False),
}
