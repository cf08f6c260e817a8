"""Logit parity of jpeft's Flax models with the transformers PyTorch models."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jpeft
from conftest import FAMILIES, GPT2, OPT_350M, jit_logits, make_hf_model, save_hf_model
from jpeft.models.config import ModelConfig

# Qwen3's long-context setting, with an original length these 12-token rows span, so that the ramp, the
# interpolation and the temperature all change the logits.
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# Small caps, windows and query scalars, so that each changes these tiny models' logits.
GEMMA2 = dict(head_dim=8, query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=0.02,
              final_logit_softcapping=0.1)
GEMMA3 = dict(head_dim=8, query_pre_attn_scalar=16, sliding_window=4, num_hidden_layers=3,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                               "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
OLMO3 = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                              "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
# LongRoPE: its own factor per rotated pair; the 12-token rows reach past an original length of 8 (the long
# factors) and stay within one of 16 (the short ones). Phi-3 reads that length from config.json's top level (a
# rope_scaling's own is overwritten by it).
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 0.7, 2.0], "long_factor": [3.0, 0.5, 8.0, 20.0]}
CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-mha-bias-headdim": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, head_dim=16)),
    "llama3-rope-scaling": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=50000.0)),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rms_norm_eps=1e-5)),
    "qwen3-yarn": ("qwen3", dict(head_dim=16, rope_scaling=YARN_ROPE)),
    "llama-yarn-mscale-betas-untruncated": ("llama", dict(head_dim=16, rope_scaling=dict(
        YARN_ROPE, mscale=0.8, mscale_all_dim=0.3, beta_fast=8, beta_slow=0.5, truncate=False))),
    "mistral-yarn-attention-factor-length-ratio": ("mistral", dict(max_position_embeddings=96, rope_scaling=dict(
        YARN_ROPE, factor=None, attention_factor=1.3))),
    "mistral-sliding": ("mistral", dict(sliding_window=5)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-sliding-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=16)),
    "qwen3-tied-sliding-layers": ("qwen3", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
                                                max_window_layers=1)),
    "gemma": ("gemma", dict(head_dim=8)),
    "gemma2-softcaps-alternating": ("gemma2", GEMMA2),
    "gemma2-untied-no-caps": ("gemma2", dict(GEMMA2, tie_word_embeddings=False, attn_logit_softcapping=None,
                                             final_logit_softcapping=None, num_key_value_heads=1)),
    "gemma3-local-rope": ("gemma3_text", GEMMA3),
    "gemma3-yarn-global-rope": ("gemma3_text", dict(GEMMA3, rope_parameters=dict(
        GEMMA3["rope_parameters"], full_attention=dict(YARN_ROPE, rope_theta=1e6)))),
    "gemma3-legacy-rope-fields": ("gemma3_text", dict(GEMMA3, rope_parameters=None, rope_theta=50000.0,
                                                      rope_local_base_freq=100.0)),
    # Granite's multipliers, none of them neutral (a residual multiplier that bf16 cannot hold exactly)
    "granite-multipliers-bias": ("granite", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                                 attention_multiplier=2.0, logits_scaling=8.0, attention_bias=True,
                                                 mlp_bias=True)),
    "granite-tied-defaults": ("granite", dict(tie_word_embeddings=True)),
    # OLMo2: norms after each block only, q/k norms over the whole projection, w · x in float32
    "olmo2": ("olmo2", {}),
    "olmo2-bias-tied": ("olmo2", dict(attention_bias=True, tie_word_embeddings=True, num_key_value_heads=1)),
    # OLMo 3: OLMo 2's blocks with sliding-window layers, each kind of layer with its own RoPE
    "olmo3-sliding-local-rope": ("olmo3", OLMO3),
    # Phi-3: fused qkv_proj and gate_up_proj, RoPE on part of each head, a dropout-free residual (resid_pdrop)
    "phi3-fused-partial-rotary-sliding": ("phi3", dict(partial_rotary_factor=0.5, sliding_window=5)),
    "phi3-tied-mha": ("phi3", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "phi3-longrope-long": ("phi3", dict(max_position_embeddings=128, original_max_position_embeddings=8,
                                        rope_scaling=LONGROPE)),
    "phi3-longrope-short-partial-attention-factor": ("phi3", dict(
        partial_rotary_factor=0.5, max_position_embeddings=128, original_max_position_embeddings=16,
        rope_scaling=dict(LONGROPE, short_factor=[1.5, 0.5], long_factor=[4.0, 9.0], attention_factor=1.2))),
    "llama-longrope-long": ("llama", dict(max_position_embeddings=128, rope_parameters=dict(
        LONGROPE, rope_theta=1e4, original_max_position_embeddings=8))),
    # SmolLM3: no RoPE in every fourth layer by default (or where no_rope_layers says), sliding layers where asked
    "smollm3-nope-layers-tied": ("smollm3", dict(num_hidden_layers=4)),
    "smollm3-sliding-nope-every-other": ("smollm3", dict(num_hidden_layers=4, no_rope_layer_interval=2,
                                                         use_sliding_window=True, sliding_window=4)),
    "smollm3-untied-bias-own-layers": ("smollm3", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                                       no_rope_layers=[0, 1])),
    "exaone-hub-names": ("exaone", dict(initializer_range=0.2)),
    "exaone-biases-llama3": ("exaone", dict(FAMILIES["exaone"], initializer_range=0.2, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "ministral3-yarn-query-scale": ("ministral3", dict(FAMILIES["ministral3"], initializer_range=0.2)),
    "ministral3-window": ("ministral3", dict(FAMILIES["ministral3"], sliding_window=4, initializer_range=0.2)),
    "ministral-alternating-windows": ("ministral", dict(head_dim=8, sliding_window=4,
                                                        layer_types=["sliding_attention", "full_attention"])),
    # ERNIE 4.5 and Helium rotate neighbouring dimensions together; ERNIE's use_bias is every projection's, Helium's
    # attention_bias q/k/v's alone, and Helium's RMSNorm scales in float32
    "ernie4_5-interleaved-rope-tied": ("ernie4_5", dict(head_dim=8)),
    "ernie4_5-biases-untied": ("ernie4_5", dict(head_dim=8, use_bias=True, tie_word_embeddings=False)),
    "helium-qkv-biases": ("helium", dict(head_dim=8, attention_bias=True, mlp_bias=True)),
    # EXAONE 4: norms after each block only, per-head q/k norms, RoPE in its sliding layers alone
    "exaone4-sliding-rope-local-only": ("exaone4", dict(num_hidden_layers=4, sliding_window=4,
                                                        sliding_window_pattern=2)),
    "exaone4-no-window-tied": ("exaone4", dict(sliding_window=None, layer_types=["full_attention"] * 2,
                                               tie_word_embeddings=True)),
    # Seed-OSS: q/k/v biases by default, o_proj's its own (attention_out_bias); Arcee: an ungated relu² MLP
    "seed_oss-qkv-biases": ("seed_oss", dict(head_dim=8)),
    "seed_oss-out-and-mlp-biases": ("seed_oss", dict(head_dim=8, attention_bias=False, attention_out_bias=True,
                                                     mlp_bias=True)),
    "arcee-ungated-relu2": ("arcee", {}),
    "arcee-biases-tied": ("arcee", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    # GLM: Phi-3's fused gate_up_proj beside plain q/k/v (biased), RoPE over neighbouring dimensions of half a head
    "glm-fused-mlp-partial-interleaved-rope": ("glm", dict(head_dim=16)),
    "glm-no-bias-mqa-tied": ("glm", dict(head_dim=16, attention_bias=False, num_key_value_heads=1,
                                         tie_word_embeddings=True)),
    # GLM-4 (0414): GLM's blocks with norms after attention and the MLP too, named its own way
    "glm4-sandwich-norms": ("glm4", dict(head_dim=16)),
    "glm4-no-bias-tied": ("glm4", dict(head_dim=16, attention_bias=False, tie_word_embeddings=True)),
    # OLMo 1: LayerNorms that learn nothing, q/k/v clipped
    "olmo-parameterless-norms-clip": ("olmo", dict(clip_qkv=0.1)),
    "olmo-bias-tied-mha": ("olmo", dict(attention_bias=True, tie_word_embeddings=True, num_key_value_heads=4)),
    # Cohere: a LayerNorm learning a scale, attention and MLP from one normed input, RoPE over neighbouring
    # dimensions, logits times logit_scale; Cohere 2: RoPE in its sliding layers alone
    "cohere-parallel-block-tied": ("cohere", dict(logit_scale=0.25, layer_norm_eps=1e-3, initializer_range=0.2)),
    "cohere-bias-untied": ("cohere", dict(attention_bias=True, tie_word_embeddings=False)),
    # Command R+'s LayerNorm of the queries and keys over each head, a scale per head and dimension
    "cohere-qk-norm-gqa": ("cohere", dict(use_qk_norm=True, initializer_range=0.2)),
    "cohere2-sliding-rope-local-only": ("cohere2", dict(num_hidden_layers=4, sliding_window=4, sliding_window_pattern=2,
                                                        logit_scale=0.5)),
    # StableLM: LayerNorms with a bias, RoPE on a quarter of each head, q/k/v biases; its parallel block on request
    "stablelm-partial-rope-qkv-bias": ("stablelm", dict(use_qkv_bias=True, layer_norm_eps=1e-3)),
    "stablelm-parallel-residual-tied": ("stablelm", dict(use_parallel_residual=True, tie_word_embeddings=True,
                                                         partial_rotary_factor=0.5)),
    # GPT-NeoX (Pythia): q/k/v fused by heads, biased LayerNorms, partial RoPE over halves, an ungated GELU MLP; a
    # parallel block with a norm for each branch, or the sequential one; its head `embed_out` in the files
    "gpt_neox-parallel-two-norms": ("gpt_neox", dict(num_key_value_heads=None, initializer_range=0.2)),
    "gpt_neox-sequential-tied-half-rope": ("gpt_neox", dict(num_key_value_heads=None, use_parallel_residual=False,
                                                            tie_word_embeddings=True, rotary_pct=0.5,
                                                            rotary_emb_base=100, layer_norm_eps=1e-3)),
    # Phi: biases on every projection and the head, a parallel block on one LayerNorm, partial RoPE, an ungated MLP;
    # LayerNorms over each head's queries and keys (qk_layernorm)
    "phi-parallel-biased-head": ("phi", {}),
    "phi-qk-layernorm-quarter-rope": ("phi", dict(qk_layernorm=True, partial_rotary_factor=0.25, layer_norm_eps=1e-3,
                                                  initializer_range=0.2)),
    # GPT-J: Phi's parallel block without attention biases, RoPE over neighbouring dimensions of part of each head
    # (rotary_dim) or all of it, a biased head, GPT-2's top names and config fields
    "gptj-partial-interleaved-rope": ("gptj", dict(num_key_value_heads=None, rotary_dim=4)),
    "gptj-whole-head-rope-eps": ("gptj", dict(num_key_value_heads=None, rotary_dim=8, layer_norm_epsilon=1e-3,
                                              initializer_range=0.2)),
    # CodeGen: GPT-J's block with q/k/v in one projection laid out in 4 shards (each its queries, values, keys: a
    # head to a shard; two heads to a shard; a head and a half)
    "codegen-shards": ("codegen", FAMILIES["codegen"]),
    "codegen-two-heads-a-shard": ("codegen", dict(FAMILIES["codegen"], num_attention_heads=8, hidden_size=64,
                                                  initializer_range=0.2)),
    "codegen-six-heads": ("codegen", dict(FAMILIES["codegen"], num_attention_heads=6, hidden_size=48,
                                          rotary_dim=8, initializer_range=0.2)),
    # OPT: learned positions two rows into their table, no RoPE, biased LayerNorms, an ungated ReLU MLP in the layer;
    # OPT-350m's narrower embeddings projected in and out, a LayerNorm after each residual sum and none at the end;
    # LayerNorms that learn nothing and no biases
    "opt-pre-norm": ("opt", FAMILIES["opt"]),
    "opt-350m-post-norm-projected": ("opt", dict(OPT_350M, initializer_range=0.2)),
    "opt-plain-norms-no-biases": ("opt", dict(FAMILIES["opt"], layer_norm_elementwise_affine=False, enable_bias=False,
                                              _remove_final_layer_norm=True, initializer_range=0.2)),
    # BLOOM: ALiBi (slopes of a power-of-two head count, and of six heads: the odd powers past four), its embeddings
    # normalised, q/k/v fused by heads, biases everywhere, an ungated tanh-GELU MLP, GPT-2's top names
    "bloom-alibi-embedding-norm": ("bloom", FAMILIES["bloom"]),
    "bloom-six-heads-eps": ("bloom", dict(FAMILIES["bloom"], num_attention_heads=6, hidden_size=48,
                                          layer_norm_epsilon=1e-3, initializer_range=0.2)),
    # Falcon: multi-query attention and a parallel block on one LayerNorm (Falcon-7B's); heads of their own, biases
    # and a sequential block; the new decoder's KV groups in query_key_value under two LayerNorms (ln_attn, ln_mlp)
    # or one (Falcon-40B's, Falcon-11B's)
    "falcon-multi-query-parallel": ("falcon", dict(FAMILIES["falcon"], initializer_range=0.2)),
    "falcon-sequential-biased": ("falcon", dict(FAMILIES["falcon"], multi_query=False, parallel_attn=False, bias=True,
                                                initializer_range=0.2)),
    "falcon-new-decoder-kv-groups": ("falcon", dict(FAMILIES["falcon"], new_decoder_architecture=True, num_kv_heads=2,
                                                    initializer_range=0.2)),
    # Falcon-RW: ALiBi (its slopes and positions rounded to bfloat16, divided by √head_dim), heads of their own,
    # biases, a sequential block
    "falcon-rw-alibi-sequential": ("falcon", dict(FAMILIES["falcon"], alibi=True, multi_query=False,
                                                  parallel_attn=False, bias=True, initializer_range=0.2)),
    "falcon-new-decoder-one-norm": ("falcon", dict(FAMILIES["falcon"], new_decoder_architecture=True, num_kv_heads=2,
                                                   num_ln_in_parallel_attn=1, activation="relu")),
    # StarCoder2: biased LayerNorms and projections, an ungated tanh-GELU MLP (c_fc, c_proj), GQA; a sliding window
    # without biases
    "starcoder2-biased": ("starcoder2", dict(FAMILIES["starcoder2"], initializer_range=0.2)),
    "starcoder2-sliding-no-bias": ("starcoder2", dict(FAMILIES["starcoder2"], sliding_window=4, use_bias=False,
                                                      initializer_range=0.2)),
    # MPT: ALiBi (BLOOM's slopes, which MPT computes its own way: of four heads; of six, past a power of two), q/k/v
    # fused in blocks, its clip and attention scale, LayerNorms that learn a scale, an ungated GELU MLP, no biases
    "mpt-alibi-clip-scale": ("mpt", dict(FAMILIES["mpt"], initializer_range=0.2)),
    "mpt-six-heads-eps": ("mpt", dict(num_key_value_heads=None, num_attention_heads=6, hidden_size=48,
                                      layer_norm_epsilon=1e-3, initializer_range=0.2)),
    "gpt2": ("gpt2", GPT2),
    "gpt2-default-inner-eps": ("gpt2", dict(layer_norm_epsilon=1e-3)),
    "gpt2-untied": ("gpt2", dict(GPT2, tie_word_embeddings=False)),
}


def torch_logits(model, ids, mask=None, positions=None):
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if positions is not None:
        kw["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    ref_model = make_hf_model(model_type, **overrides)
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    ids = np.random.RandomState(0).randint(0, 97, (2, 12))
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out), torch_logits(ref_model, ids), atol=2e-4, rtol=0)


# (Falcon-RW's positions past 256: bfloat16 rounds them)
@pytest.mark.parametrize("case", ["llama-gqa-untied", "gemma2-softcaps-alternating", "bloom-six-heads-eps",
                                  "falcon-rw-alibi-sequential", "mpt-six-heads-eps"])
def test_rows_longer_than_an_attention_block_match_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    ref_model = make_hf_model(model_type, **overrides)
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    ids = np.random.RandomState(1).randint(0, 97, (1, 300))  # query blocks of 128: two whole, one ragged
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out), torch_logits(ref_model, ids), atol=2e-4, rtol=0)


# config.json fields as older or foreign files write them (None: the field left out), each read as the family's
# transformers model reads it: fields its model ignores, its defaults, legacy values.
FILE_FIELDS = {
    "llama-ignores-other-families-fields": ("llama", {}, dict(
        sliding_window=3, final_logit_softcapping=0.1, attn_logit_softcapping=0.05, query_pre_attn_scalar=1,
        pretraining_tp=2)),
    "mistral-ignores-attention-bias": ("mistral", {}, dict(attention_bias=True)),
    "gemma-legacy-gelu": ("gemma", dict(head_dim=8), dict(hidden_act="gelu", sliding_window=3, query_pre_attn_scalar=1)),
    "gemma2-default-activation": ("gemma2", GEMMA2, dict(hidden_activation=None, hidden_act="silu")),
    "gemma3-default-ropes-no-attention-cap": ("gemma3_text", GEMMA3, dict(
        rope_parameters=None, attn_logit_softcapping=0.02)),
    "gemma3-legacy-rope-no-local-base": ("gemma3_text", GEMMA3, dict(
        rope_parameters=None, rope_theta=50000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})),
    # a model card's rope_scaling added to a transformers-5 file: transformers reads it before rope_parameters
    "llama-rope-scaling-over-rope-parameters": ("llama", {}, dict(rope_scaling={"type": "linear", "factor": 4.0})),
    "llama3-original-length-from-max-positions": ("llama", dict(max_position_embeddings=16), dict(
        rope_parameters=None, rope_scaling=dict(LLAMA3_ROPE, original_max_position_embeddings=None))),
    "gemma2-family-defaults": ("gemma2", GEMMA2, dict(
        query_pre_attn_scalar=None, attn_logit_softcapping=None, final_logit_softcapping=None)),
    "gemma3-default-query-scalar": ("gemma3_text", GEMMA3, dict(query_pre_attn_scalar=None)),
    "mistral-ignores-local-rope-and-use-sliding-window": ("mistral", dict(sliding_window=4), dict(
        rope_local_base_freq=100.0, use_sliding_window=False)),
    "gemma2-ignores-use-sliding-window-and-local-rope": ("gemma2", GEMMA2, dict(
        use_sliding_window=False, rope_local_base_freq=100.0)),
    "llama-swish-and-gelu-new-names": ("llama", {}, dict(hidden_act="swish")),
    # a file without layer_types: OLMo 3's every fourth layer full, the others sliding, as its config derives them
    "olmo3-default-layer-types": ("olmo3", dict(num_hidden_layers=4, sliding_window=3), dict(layer_types=None)),
    # SmolLM3's defaults: a tied head, RoPE left out of every fourth layer
    "smollm3-default-tie-and-nope-layers": ("smollm3", dict(num_hidden_layers=4), dict(
        tie_word_embeddings=None, no_rope_layers=None, no_rope_layer_interval=None)),
    "ministral-default-layer-types": ("ministral", dict(head_dim=8, sliding_window=4), dict(layer_types=None)),
    # a head_dim the file leaves out is the family's default, not hidden / heads (Gemma's and ERNIE 4.5's 256, 128)
    "gemma-default-head-dim": ("gemma", {}, dict(head_dim=None)),
    "ernie4_5-default-head-dim": ("ernie4_5", {}, dict(head_dim=None)),
}


@pytest.mark.parametrize("case", FILE_FIELDS)
def test_config_fields_read_as_transformers_reads_them(case, tmp_path):
    model_type, overrides, fields = FILE_FIELDS[case]
    path = save_hf_model(make_hf_model(model_type, **overrides), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.update(fields)
    hf = {k: {i: j for i, j in v.items() if j is not None} if isinstance(v, dict) else v for k, v in hf.items()}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, params = jpeft.from_pretrained(path)
    ids = np.random.RandomState(0).randint(0, 97, (2, 12))
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out), torch_logits(ref_model, ids), atol=2e-4, rtol=0)


def test_a_norm_eps_the_file_leaves_out_is_the_familys():
    """OLMo2's default is 1e-5, Llama's 1e-6 (too close on tiny weights for the logits tests to tell)."""
    for model_type, eps in (("olmo2", 1e-5), ("llama", 1e-6)):
        hf = make_hf_model(model_type).config.to_dict()
        del hf["rms_norm_eps"]
        assert ModelConfig.from_hf(hf).rms_norm_eps == eps


def test_gemma_legacy_gelu_is_the_tanh_gelu():
    """transformers reads Gemma 1's legacy hidden_act "gelu" as the tanh approximation (too close on tiny
    weights for the logits test above to tell)."""
    hf = dict(make_hf_model("gemma", head_dim=8).config.to_dict(), hidden_act="gelu")
    assert ModelConfig.from_hf(hf).hidden_act == "gelu_pytorch_tanh"
    assert ModelConfig.from_hf(dict(hf, model_type="llama")).hidden_act == "gelu"


def test_transformers_names_for_the_same_activations():
    hf = make_hf_model("llama").config.to_dict()
    assert ModelConfig.from_hf(dict(hf, hidden_act="gelu_new")).hidden_act == "gelu_pytorch_tanh"
    assert ModelConfig.from_hf(dict(hf, hidden_act="swish")).hidden_act == "silu"
    gpt2 = make_hf_model("gpt2", **GPT2).config.to_dict()
    assert ModelConfig.from_hf(dict(gpt2, activation_function="swish")).hidden_act == "silu"


def test_rope_scaling_transformers_reads_first_is_refused_where_unsupported():
    """A dynamic rope_scaling beside a default rope_parameters is what transformers runs, so it is refused
    (dynamic NTK rescales by the longest sequence a model has seen so far: state jpeft does not keep)."""
    hf = dict(make_hf_model("qwen2").config.to_dict(), rope_scaling={"type": "dynamic", "factor": 4.0})
    with pytest.raises(jpeft.CheckpointError, match="rope type 'dynamic' is not supported"):
        ModelConfig.from_hf(hf)


def test_sliding_window_changes_logits(tmp_path):
    """Guards the parity test above against a window that is silently ignored on both sides."""
    ref_model = make_hf_model("mistral", sliding_window=5)
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (1, 12)))
    windowed = jit_logits(model, params, ids)
    full = model.clone(config=model.config.replace(sliding_window=None)).apply({"params": params}, ids)
    assert np.abs(np.asarray(windowed - full))[:, 5:].max() > 1e-3


def test_left_padding_with_attention_mask(tmp_path):
    ref_model = make_hf_model("llama")
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    ids = np.random.RandomState(1).randint(3, 97, (2, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    ref = torch_logits(ref_model, ids, mask, positions)
    out = jit_logits(model, params, ids, mask, positions)
    np.testing.assert_allclose(out[mask == 1], ref[mask == 1], atol=2e-4, rtol=0)
    # The padded row's real tokens see exactly what an unpadded run of them sees.
    alone = jit_logits(model, params, ids[1:, 4:])
    np.testing.assert_allclose(out[1, 4:], alone[0], atol=2e-5, rtol=0)


def test_scan_compiles_once_for_any_depth(tmp_path):
    """Layers are stacked and scanned: the gradient's program is the same size and takes about as long
    to compile for 16 layers as for 2 (unrolled, 16 layers compiled 3-5x slower into a 3.5x larger
    program here), and calling it again with the same shapes compiles nothing."""
    import time

    def compile_gradient(layers):
        model, params = jpeft.from_pretrained(
            save_hf_model(make_hf_model("llama", num_hidden_layers=layers), tmp_path / str(layers)))
        assert all(leaf.shape[0] == layers for leaf in jax.tree.leaves(params["model"]["layers"]))
        seconds = []
        for seq in (8, 9):  # twice, a new sequence length each time so nothing compiled is reused; keep the min
            ids = jnp.zeros((2, seq), jnp.int32)
            grad = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, ids))))
            lowered = grad.lower(params)
            start = time.perf_counter()
            lowered.compile()
            seconds.append(time.perf_counter() - start)
            grad(params), grad(params)
            assert grad._cache_size() == 1  # one compilation for repeated calls
        return min(seconds), len(lowered.as_text())

    (two, two_size), (sixteen, sixteen_size) = compile_gradient(2), compile_gradient(16)
    assert sixteen_size < 1.05 * two_size, (two_size, sixteen_size)
    assert sixteen < 2.0 * two, (two, sixteen)


@pytest.mark.parametrize("case,feature", [
    ("gemma2-softcaps-alternating", dict(attn_softcap=None)),
    ("gemma2-softcaps-alternating", dict(final_softcap=None)),
    ("gemma2-softcaps-alternating", dict(layer_types=("full_attention",) * 2)),
    ("gemma2-softcaps-alternating", dict(query_pre_attn_scalar=None)),
    ("gemma", dict(embed_scale=False)),
    ("gemma3-local-rope", dict(local_rope=None)),
    ("gemma3-legacy-rope-fields", dict(local_rope=None)),
    ("qwen3-qk-norm", dict(qk_norm=None)),
    ("olmo2-bias-tied", dict(qk_norm=None)),
    ("olmo3-sliding-local-rope", dict(sliding_window=None)),
    ("olmo3-sliding-local-rope", dict(local_rope=None)),
    ("qwen3-tied-sliding-layers", dict(sliding_window=None)),
    ("qwen3-yarn", dict(rope=dict(type="default"))),
    ("qwen3-yarn", dict(rope=dict(attention_factor=1.0))),
    ("llama-yarn-mscale-betas-untruncated", dict(rope=dict(truncate=True))),
    ("llama-yarn-mscale-betas-untruncated", dict(rope=dict(beta_slow=1.0))),
    ("llama-yarn-mscale-betas-untruncated", dict(rope=dict(attention_factor=1.1))),
    ("gemma3-yarn-global-rope", dict(rope=dict(type="linear", attention_factor=1.0))),
    ("granite-multipliers-bias", dict(embedding_multiplier=1.0)),
    ("granite-multipliers-bias", dict(residual_multiplier=1.0)),
    ("granite-multipliers-bias", dict(attention_multiplier=50.0)),  # (its scores are small: 2 barely differs from None)
    ("granite-multipliers-bias", dict(logits_scaling=1.0)),
    ("olmo-parameterless-norms-clip", dict(clip_qkv=None)),
    ("cohere-parallel-block-tied", dict(logit_scale=1.0)),
    ("cohere-parallel-block-tied", dict(rope_interleaved=False)),
    ("cohere2-sliding-rope-local-only", dict(rope_layers=())),
    ("cohere-qk-norm-gqa", dict(qk_norm=None)),
    ("stablelm-partial-rope-qkv-bias", dict(partial_rotary_factor=1.0)),
    ("gpt_neox-parallel-two-norms", dict(parallel_norms=False)),
    ("gpt_neox-parallel-two-norms", dict(fused_qkv="blocks")),
    ("phi-qk-layernorm-quarter-rope", dict(partial_rotary_factor=1.0)),
    ("gptj-whole-head-rope-eps", dict(rope_interleaved=False)),
    ("codegen-two-heads-a-shard", dict(fused_qkv="blocks")),
    ("opt-350m-post-norm-projected", dict(norm_after_residual=False)),
    ("opt-pre-norm", dict(final_norm=False)),
    ("bloom-six-heads-eps", dict(alibi=None)),
    ("falcon-rw-alibi-sequential", dict(alibi="bloom")),
    ("bloom-six-heads-eps", dict(embed_norm=False)),
    ("falcon-new-decoder-kv-groups", dict(fused_qkv="blocks")),
    ("falcon-new-decoder-kv-groups", dict(parallel_norm_names=("ln_mlp", "ln_attn"))),
    ("starcoder2-sliding-no-bias", dict(sliding_window=None)),
    ("ministral3-yarn-query-scale", dict(rope=dict(query_scaling_beta=0.0))),
    ("mpt-six-heads-eps", dict(alibi=None)),
    ("mpt-alibi-clip-scale", dict(clip_qkv=None)),
    ("mpt-alibi-clip-scale", dict(attention_multiplier=None)),
])
def test_each_family_feature_changes_logits(case, feature, tmp_path):
    """Guards the parity cases above: a feature both sides silently ignored would pass them too (a dict
    changes fields of a RoPE)."""
    model_type, overrides = CASES[case]
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model(model_type, **overrides), tmp_path))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (1, 12)))
    feature = {k: dataclasses.replace(getattr(model.config, k), **v) if isinstance(v, dict) else v
               for k, v in feature.items()}
    changed = model.clone(config=model.config.replace(**feature)).apply({"params": params}, ids)
    assert np.abs(np.asarray(changed - jit_logits(model, params, ids))).max() > 1e-4
