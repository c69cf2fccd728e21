"""Tiny seeded Hugging Face MoE checkpoints for tests (needs torch + transformers).

    path = make_checkpoint("qwen2_moe", tmp / "q2")   # sharded bf16 safetensors + tokenizer
    ref = reference_model(path)                       # transformers, float32, eval

Every architecture uses hidden 64, GQA attention (4 query heads, 2 kv heads),
expert intermediate 128 (a multiple of every group size) and vocab 512.
Weights are drawn from one seeded generator, norms included (so a swapped
q_norm/k_norm or a dropped bias changes the logits).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ARCHS = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "phimoe",
    "granitemoe",
    "granitemoeshared",
    "gpt_oss",
)

VOCAB_SIZE = 512
BOS, EOS, PAD = "<s>", "</s>", "<pad>"  # token ids 0, 1, 2

# A few paragraphs so byte-level BPE learns real merges.
_TEXT = """\
Mixture-of-experts language models route every token to a few experts out of many.
The experts hold most of the weights, but only the chosen ones run for each token.
On a phone or a small board the experts stay on flash and are read into a cache.
A good cache keeps the experts the router will want next; a wrong guess costs time, never correctness.
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun.
Once upon a time there was a little robot who loved to read books about the sea.
Every morning the robot walked to the harbour and counted the boats, one, two, three, four, five.
def add(a, b):
    return a + b
for i in range(10):
    print(i, i * i)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2024.
"""


def _base_config(arch: str) -> dict:
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        num_experts_per_tok=2,
    )
    if arch == "mixtral":
        return dict(
            common,
            num_hidden_layers=2,
            intermediate_size=128,
            num_local_experts=4,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
    if arch == "qwen2_moe":
        # layer 1 is a dense MLP; MoE layers carry a shared expert with a sigmoid gate
        return dict(
            common,
            num_hidden_layers=3,
            intermediate_size=192,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
            num_experts=8,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            qkv_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
    if arch == "qwen3_moe":
        # head_dim 24 != hidden / heads (16); tied embeddings
        return dict(
            common,
            num_hidden_layers=2,
            intermediate_size=192,
            moe_intermediate_size=128,
            num_experts=8,
            norm_topk_prob=True,
            head_dim=24,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
    if arch == "olmoe":
        return dict(
            common,
            num_hidden_layers=2,
            intermediate_size=128,
            num_experts=8,
            norm_topk_prob=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        )
    if arch in ("deepseek_v2", "deepseek_v3"):
        # multi-head latent attention: K heads 16 + 8 (RoPE) wide, V heads 12; a dense first layer;
        # group-limited routing; YaRN past a 32-token original context
        mla = dict(
            common,
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=128,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_group=4,
            topk_group=2,
        )
        yarn = dict(rope_type="yarn", rope_theta=1e4, factor=8.0, original_max_position_embeddings=32)
        if arch == "deepseek_v2":  # V2-Lite's shape: q straight from the hidden state
            return dict(
                mla,
                q_lora_rank=None,
                n_group=2,  # the top 3 come from the one group with the highest single score
                topk_group=1,
                num_experts_per_tok=3,
                topk_method="group_limited_greedy",
                routed_scaling_factor=1.5,
                norm_topk_prob=False,
                rope_parameters=dict(yarn, mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),
            )
        # V3: q through a low-rank q_a/q_b, sigmoid scores with a selection bias (noaux_tc)
        return dict(
            mla,
            q_lora_rank=48,
            num_experts_per_tok=3,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_parameters=dict(yarn, mscale=1.0, mscale_all_dim=0.8),
        )
    if arch == "phimoe":
        # LayerNorms with biases, q/k/v/o and lm_head biases; LongRoPE over a 64-token original
        # context (prompt and generation stay within it) with a short_mscale that is not 1; a wide
        # sparse-mixer threshold so several experts share the softmax
        half = 8  # head_dim 16 / 2
        return dict(
            common,
            num_hidden_layers=2,
            intermediate_size=128,
            num_local_experts=6,
            rms_norm_eps=1e-5,
            attention_bias=True,
            lm_head_bias=True,
            router_jitter_noise=0.2,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=1e4,
                original_max_position_embeddings=64,
                short_factor=[1.0 + 0.15 * i for i in range(half)],
                long_factor=[2.0 + 0.5 * i for i in range(half)],
                short_mscale=1.1,
                long_mscale=1.3,
            ),
        )
    if arch in ("granitemoe", "granitemoeshared"):
        # all four multipliers away from 1; the shared variant adds a shared expert
        granite = dict(
            common,
            num_hidden_layers=2,
            intermediate_size=128,
            num_local_experts=6,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.4,
            logits_scaling=6.0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        )
        if arch == "granitemoeshared":
            return dict(granite, shared_intermediate_size=96, num_local_experts=5, num_experts_per_tok=1)
        return granite
    if arch == "gpt_oss":
        # head_dim 24 != hidden / heads; sliding windows of 5 tokens on even layers; top-3 of 6
        # experts; a SwiGLU limit low enough that the clamp bites on these weights; YaRN past 32 tokens
        return dict(
            common,
            num_hidden_layers=3,
            head_dim=24,
            intermediate_size=128,
            num_local_experts=6,
            num_experts_per_tok=3,
            sliding_window=5,
            swiglu_alpha=1.5,
            swiglu_limit=0.3,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=1e4,
                factor=8.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=32,
            ),
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """The transformers config of the tiny `arch` model, with `overrides` applied."""
    cfg = _base_config(arch)
    cfg.update(overrides)
    return transformers.AutoConfig.for_model(arch, **cfg)


def make_tokenizer(vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on a built-in text: <s>=0, </s>=1, <pad>=2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT.splitlines(), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif p.ndim == 1:  # biases, a LayerNorm's too
            p.copy_(0.1 * noise)
        else:
            p.copy_(std * noise)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias: zeros at init
            b.copy_(0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float32))


def make_checkpoint(
    arch: str, path, seed: int = 0, dtype=torch.bfloat16, shard_size="200KB", **config_overrides
) -> Path:
    """Write a tiny random `arch` checkpoint (sharded safetensors + tokenizer) to `path`."""
    path = Path(path)
    if arch == "switch_transformers":  # an encoder-decoder: SWITCH's "tied" settings unless a variant is named
        variant = config_overrides.pop("variant", "tied")
        return make_switch_checkpoint(variant, path, seed, dtype, shard_size, **config_overrides)
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed, config.initializer_range)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype).eval()
    model.save_pretrained(path, max_shard_size=shard_size)
    tokenizer = make_tokenizer()
    assert len(tokenizer) <= config.vocab_size, (len(tokenizer), config.vocab_size)
    tokenizer.save_pretrained(path)
    return path


def reference_model(path, **config_overrides) -> torch.nn.Module:
    """The checkpoint at `path` loaded by transformers in float32, eval mode (config values overridden)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **config_overrides)
    return model.eval()


# ---------------------------------------------------------------- encoder-decoders (Switch Transformers)

# T5's special tokens: <pad>=0 (also the decoder's start token), </s>=1, <unk>=2
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"

# Switch settings that differ where the code could go wrong: stack depths, sparse steps, expert
# counts, tied and untied heads, a d_kv shorter than d_model / heads, few relative buckets and a
# short max distance (so a short prompt reaches the logarithmic buckets), an expert capacity a
# prompt overflows, a router with a bias.
SWITCH = {
    "tied": dict(
        num_layers=3,
        num_sparse_encoder_layers=1,  # encoder step 3: block 1
        num_decoder_layers=2,
        num_sparse_decoder_layers=2,  # decoder step 1: every block
        num_experts=4,
        d_kv=8,
        tie_word_embeddings=True,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    ),
    "untied": dict(
        num_layers=2,
        num_sparse_encoder_layers=2,  # encoder step 1: every block
        num_decoder_layers=3,
        num_sparse_decoder_layers=1,  # decoder step 3: block 1
        num_experts=8,
        d_kv=16,
        tie_word_embeddings=False,
        expert_capacity=3,
        router_bias=True,
    ),
}


def switch_config(name: str, **overrides) -> transformers.PretrainedConfig:
    cfg = dict(
        vocab_size=VOCAB_SIZE,
        d_model=64,
        num_heads=4,
        d_ff=128,
        expert_capacity=64,
        dense_act_fn="relu",
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
    )
    cfg.update(SWITCH[name])
    cfg.update(overrides)
    return transformers.SwitchTransformersConfig(**cfg)


def make_t5_tokenizer(vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A T5-style tokenizer (Unigram over Metaspace pieces, </s> appended to every input)
    trained on the built-in text: <pad>=0, </s>=1, <unk>=2."""
    from tokenizers import processors

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[T5_PAD, T5_EOS, T5_UNK], unk_token=T5_UNK, show_progress=False
    )
    tok.train_from_iterator(_TEXT.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=T5_EOS, pad_token=T5_PAD, unk_token=T5_UNK
    )


def make_switch_checkpoint(
    name: str, path, seed: int = 0, dtype=torch.bfloat16, shard_size="200KB", **overrides
) -> Path:
    """Write a tiny random Switch Transformers checkpoint (SWITCH[name]) with a T5-style tokenizer."""
    path = Path(path)
    config = switch_config(name, **overrides)
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(config).to(torch.float32)
    _randomize(model, seed, 0.1)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype).eval()
    model.save_pretrained(path, max_shard_size=shard_size)
    tokenizer = make_t5_tokenizer()
    assert len(tokenizer) <= config.vocab_size, (len(tokenizer), config.vocab_size)
    tokenizer.save_pretrained(path)
    return path


def reference_seq2seq(path) -> torch.nn.Module:
    """The Switch checkpoint at `path` loaded by transformers in float32, eval mode."""
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()
