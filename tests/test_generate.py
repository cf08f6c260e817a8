"""KV-cache decoding against transformers' generate, EOS handling, sampling, errors."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jpeft
from conftest import FAMILIES, OPT_350M, SHARP, jit_logits, make_hf_model, make_t5, perturb, save_hf_model
from jpeft import tree as T
from jpeft.generate import _decode, _decoder, _prefill, generate, generate_text, greedy

PROMPTS = [[5, 17, 33, 8, 61], [12, 40, 3, 77, 9, 26, 50, 14, 88], [70, 2, 45]]
PAD, NEW = 0, 12


def hf_generate(ref_model, prompts, max_new_tokens, eos_token_id):
    """transformers' greedy generate on left-padded prompts, new tokens cut before the first EOS."""
    width = max(map(len, prompts))
    ids = np.array([[PAD] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos_token_id)
    rows = out[:, width:].tolist()
    return [row[:row.index(eos_token_id)] if eos_token_id in row else row for row in rows]


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),  # biases, MQA, tied head
    ("mistral", dict(sliding_window=4)),  # the window must hold across the cache
    ("qwen3", dict(head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                   rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})),
    ("gemma", dict(head_dim=8)),
    ("gemma2", dict(head_dim=8, query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=1.0,
                    final_logit_softcapping=2.0)),  # alternating windows, soft-capped scores and logits
    ("gemma3_text", dict(head_dim=8, sliding_window=4, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})),
    ("gpt2", dict(n_inner=64)),  # learned positions of left-padded rows
    ("granite", dict(embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0)),
    ("olmo2", dict(num_key_value_heads=1)),  # q/k norms over the whole projections of the cached tokens
    ("olmo3", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    ("phi3", dict(partial_rotary_factor=0.5, sliding_window=4)),  # fused projections
    ("smollm3", dict(num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4)),
    ("ministral", dict(head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    ("ministral3", FAMILIES["ministral3"]),  # each new token's query scaled at its own position
    ("exaone", FAMILIES["exaone"]),  # its hub names, a Llama's biased projections
    ("ernie4_5", dict(head_dim=8, use_bias=True)),  # neighbouring dimensions rotated together, cached
    ("helium", dict(head_dim=8)),
    ("exaone4", dict(num_hidden_layers=4, sliding_window=4, sliding_window_pattern=2)),  # full layers without RoPE
    ("seed_oss", dict(head_dim=8)),
    ("arcee", {}),
    ("glm", dict(head_dim=16)),
    ("glm4", dict(head_dim=16, num_key_value_heads=1)),
    ("olmo", dict(clip_qkv=0.5)),
    # a parallel block, neighbouring dimensions rotated, each cached head's keys normalised with its own scale
    ("cohere", dict(logit_scale=0.5, num_key_value_heads=1, use_qk_norm=True)),
    ("cohere2", dict(num_hidden_layers=4, sliding_window=4, sliding_window_pattern=2)),  # full layers without RoPE
    ("stablelm", dict(use_qkv_bias=True, partial_rotary_factor=0.5)),  # RoPE on part of each cached head
    ("gpt_neox", dict(num_key_value_heads=None)),  # keys and values of each head out of one fused projection
    ("phi", dict(qk_layernorm=True, num_key_value_heads=1)),  # each cached key head's own LayerNorm; a biased head
    ("gptj", dict(num_key_value_heads=None, rotary_dim=4)),  # neighbouring dimensions of part of each head rotated
    ("codegen", dict(FAMILIES["codegen"], num_attention_heads=8, hidden_size=64)),  # keys of a shard's two heads cached
    ("opt", dict(num_key_value_heads=None, ffn_dim=64)),  # learned positions counted over the mask, no RoPE
    ("opt", OPT_350M),  # narrower embeddings projected in and out, LayerNorms after each residual sum
    ("bloom", dict(num_key_value_heads=None, num_attention_heads=6, hidden_size=48)),  # ALiBi over the cache's keys
    ("falcon", dict(num_key_value_heads=None, ffn_hidden_size=64)),  # one KV head cached, a parallel block
    ("falcon", dict(num_key_value_heads=None, ffn_hidden_size=64, new_decoder_architecture=True, num_kv_heads=2)),
    ("falcon", dict(num_key_value_heads=None, ffn_hidden_size=64, alibi=True, multi_query=False)),  # Falcon-RW's
    ("starcoder2", dict(sliding_window=4)),  # a window across the cache
    ("mpt", dict(FAMILIES["mpt"], num_attention_heads=6, hidden_size=48)),  # ALiBi over the cache's keys, clipped
    ("mixtral", dict(num_local_experts=4, sliding_window=4)),  # each new token routed on its own
    ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24)),
    ("gpt_oss", dict(head_dim=8, num_local_experts=4, sliding_window=4)),  # attention sinks over the cache
    # GraniteMoE's multipliers and experts, and the shared MLP beside them
    ("granitemoeshared", dict(num_local_experts=4, embedding_multiplier=6.0, residual_multiplier=0.5, logits_scaling=2.0,
                              shared_intermediate_size=24)),
])
def test_greedy_matches_transformers(model_type, overrides, tmp_path):
    ref_model = make_hf_model(model_type, **SHARP, **overrides)
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    unstopped = hf_generate(ref_model, PROMPTS, NEW, eos_token_id=None)
    assert generate(model, params, PROMPTS, NEW, eos_token_id=None) == unstopped
    eos = unstopped[1][4]  # a token greedy decoding emits, so stopping is exercised
    assert generate(model, params, PROMPTS, NEW, eos_token_id=eos) == hf_generate(ref_model, PROMPTS, NEW, eos)


# Strong LongRoPE factors, an original length the prompts (9 wide) stay within and their new tokens pass
PHI3_LONGROPE = dict(max_position_embeddings=128, original_max_position_embeddings=14, rope_scaling={
    "rope_type": "longrope", "short_factor": [1.0, 1.0, 1.0, 1.0], "long_factor": [0.05, 0.1, 20.0, 50.0]})


def test_phi3_longrope_switches_mid_generation_as_transformers_does(tmp_path, monkeypatch):
    """Phi-3's generate drops its cache at the first step past the original length and reads the whole sequence
    again with the long factors: greedy tokens equal transformers', batched and row by row, and differ from a
    generate that only switched the new tokens' factors (so the re-read is what makes them equal)."""
    ref_model = make_hf_model("phi3", **SHARP, **PHI3_LONGROPE)
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    switched = hf_generate(ref_model, PROMPTS, NEW, eos_token_id=None)
    assert generate(model, params, PROMPTS, NEW, eos_token_id=None) == switched
    for prompt in PROMPTS:
        assert generate(model, params, [prompt], NEW, eos_token_id=None) == hf_generate(ref_model, [prompt], NEW, None)
    monkeypatch.setattr(type(ref_model), "prepare_inputs_for_generation",
                        transformers.GenerationMixin.prepare_inputs_for_generation)
    assert hf_generate(ref_model, PROMPTS, NEW, eos_token_id=None) != switched


@pytest.mark.parametrize("family", ["gemma2", "qwen2-mqa", "gpt2", "t5"])
def test_unrolled_decoding_steps_equal_the_scanned_ones(family, tmp_path, monkeypatch):
    """On CPU the decoding steps run the layers one by one over per-layer weights and caches; accelerators
    run the scanned stack. Step by step both give the same logits, with a LoRA's stacked leaves and (T5)
    the cross-attention cache."""
    if family == "t5":
        model, base = jpeft.from_pretrained(make_t5(tmp_path)[1])
    else:
        model_type, overrides = {"gemma2": ("gemma2", dict(head_dim=8, sliding_window=4, attn_logit_softcapping=1.0)),
                                 "qwen2-mqa": ("qwen2", dict(num_key_value_heads=1)),
                                 "gpt2": ("gpt2", dict(n_inner=64))}[family]
        model, base = jpeft.from_pretrained(save_hf_model(make_hf_model(model_type, **SHARP, **overrides), tmp_path))
    targets = {"gpt2": ["c_attn"], "t5": ["q", "v"]}.get(family, ["q_proj", "v_proj"])
    params = jpeft.LoRA(rank=2, alpha=4, targets=targets).init(jax.random.key(0), base)
    params = T.map_with_path(lambda p, x: x + 0.2 if T.leaf_name(p) == "lora_b" else x, params)
    ids = jnp.asarray([[0, 0, 5, 17, 33], [12, 40, 3, 77, 9]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32).at[:, 2:].set(1)

    def steps(backend):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        _, cache, advance = _prefill(model, params, ids, mask, 4)
        tokens, out = ids[:, -1:], []
        for step in range(1, 4):
            logits, cache = advance(tokens, jnp.int32(step), cache)
            tokens = jnp.argmax(logits[:, -1], axis=-1)[:, None]
            out.append(logits)
        return np.stack(out)

    unrolled, scanned = steps("cpu"), steps("gpu")
    np.testing.assert_allclose(unrolled, scanned, atol=2e-5, rtol=0)
    assert np.abs(unrolled[1:] - unrolled[:-1]).max() > 1e-2  # the steps differ: the cache is read


def test_unmerged_lora_matches_merged_transformers(sharp_llama, tmp_path):
    model, base = sharp_llama
    params = jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]).init(jax.random.key(0), base)
    flat = T.flatten(params)
    paths = [p for p in flat if p.endswith("/lora_b")]
    for path, key in zip(paths, jax.random.split(jax.random.key(1), len(paths))):
        flat[path] = 0.1 * jax.random.normal(key, flat[path].shape)
    params = T.unflatten(flat)
    jpeft.save_pretrained(str(tmp_path), model, jpeft.merge(params))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()

    out = generate(model, params, PROMPTS, NEW, eos_token_id=None)
    assert out == hf_generate(merged, PROMPTS, NEW, eos_token_id=None)
    assert out != generate(model, base, PROMPTS, NEW, eos_token_id=None)  # the adapter matters


def test_eos_truncates_each_row(sharp_llama):
    model, params = sharp_llama
    full = generate(model, params, PROMPTS, NEW, eos_token_id=None)
    assert [len(row) for row in full] == [NEW] * len(PROMPTS)
    for eos in ([full[0][3]], [full[0][3], full[2][5]]):
        stopped = generate(model, params, PROMPTS, NEW, eos_token_id=eos)
        for row, ref in zip(stopped, full):
            cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
            assert row == ref[:cut]
        assert len(stopped[0]) <= 3


def test_same_shapes_and_top_k_do_not_recompile(sharp_llama):
    model, params = sharp_llama
    generate(model, params, PROMPTS, 4, eos_token_id=None, temperature=1.0, top_k=5)
    decode = _decoder(model.config.dtype)
    compiled = decode._cache_size()
    other = [[3, 4], [50] * 20, [7] * 11]  # same batch size and prompt bucket
    generate(model, params, other, 4, eos_token_id=[5, 6], temperature=0.5, top_k=5, top_p=0.9, seed=7)
    assert decode._cache_size() == compiled
    generate(model, params, other, 4, eos_token_id=None, temperature=0.5, top_k=6)  # top_k is static
    assert decode._cache_size() == compiled + 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's product kernels")
def test_float32_decoding_runs_in_xlas_own_products_bfloat16_in_ynnpack(sharp_llama):
    """The decoding loop's compiler options follow the compute dtype (`generate._decoder`): float32 without
    YNNPACK's kernels, bfloat16 with XLA's defaults (YNNPACK wherever it takes the products on this CPU); and
    the bf16 loop picks what the uncached bf16 forward ranks first."""
    model, params = sharp_llama
    ids = jnp.ones((2, 32), jnp.int32)
    defaults = jax.jit(_decode, static_argnums=(0, 1, 2))

    def ynn_kernels(decode, dtype):
        cast = model.clone(config=dataclasses.replace(model.config, dtype=dtype))
        hlo = decode.lower(cast, 4, None, params, ids, ids, jnp.full((8,), -1, jnp.int32), jnp.float32(1),
                           jnp.float32(1), jax.random.key(0), jnp.int32(0)).compile().as_text()
        return len(re.findall(r"__ynn_fusion", hlo))

    ours = {dtype: ynn_kernels(_decoder(dtype), dtype) for dtype in ("float32", "bfloat16")}
    default = {dtype: ynn_kernels(defaults, dtype) for dtype in ("float32", "bfloat16")}
    assert ours["float32"] == 0 and ours["bfloat16"] == default["bfloat16"]
    assert default["float32"] > 0 or not any(default.values())  # YNNPACK takes float32 products where it takes any
    cast = model.clone(config=dataclasses.replace(model.config, dtype="bfloat16"))
    prompts = [p[:3] for p in PROMPTS]
    new = jnp.asarray(generate(cast, params, prompts, 6, eos_token_id=None))
    logits = cast.apply({"params": params}, jnp.concatenate([jnp.asarray(prompts), new], 1))[:, 2:-1]
    picked = jnp.take_along_axis(logits, new[..., None], -1)[..., 0]
    # each token a maximum of the uncached logits up to bf16 rounding (this model's bf16 logits hold exact ties)
    assert (picked >= logits.max(-1) - 0.05).all() and len(set(new.ravel().tolist())) > 3


def test_greedy_is_argmax_ties_and_nans_included():
    logits = jax.random.normal(jax.random.key(0), (6, 300))
    logits = logits.at[1, [7, 200]].set(9.0)  # a tie: the first wins
    logits = logits.at[2, [5, 90]].set(jnp.nan)  # a NaN wins, the first one
    logits = logits.at[3].set(-jnp.inf).at[4].set(1.0)  # all equal: index 0
    logits = logits.at[5, 299].set(jnp.inf)
    np.testing.assert_array_equal(greedy(logits), jnp.argmax(logits, axis=-1))
    np.testing.assert_array_equal(greedy(logits.astype(jnp.bfloat16)), jnp.argmax(logits.astype(jnp.bfloat16), -1))


def word_tokenizer():
    """Token i is the word `w{i}` (0-2: pad, BOS, EOS), so any token ids decode and encode back."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def test_generate_text_batches_and_decodes(sharp_llama):
    model, params = sharp_llama
    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{t}" for t in p if t > 2) for p in PROMPTS]
    out = generate_text(model, params, tokenizer, texts, max_new_tokens=6, batch_size=2)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert all(i[0] == 1 for i in ids)
    new = generate(model, params, ids[:2], 6, eos_token_id=2) + generate(model, params, ids[2:], 6, eos_token_id=2)
    expected = tokenizer.batch_decode(new, skip_special_tokens=True)
    assert out == expected and all(out)


@pytest.mark.parametrize("args,kwargs,match", [
    (([], 4), {}, "no prompts"),
    (([[5], []], 4), {}, "prompt 1 is empty"),
    (([[5]], 0), {}, "max_new_tokens must be >= 1"),
    (([[5] * 129], 4), {}, "prompt 0 has 129 tokens.*max_position_embeddings"),
    (([[5, 97]], 4), {}, "outside \\[0, 97\\)"),
    (([[5]], 4), dict(pad_token_id=-1), "pad_token_id -1"),
    (([[5]], 4), dict(top_p=0.0), "0 < top_p <= 1"),
    (([[5]], 4), dict(temperature=-1.0), "temperature >= 0"),
])
def test_user_errors(sharp_llama, args, kwargs, match):
    model, params = sharp_llama
    with pytest.raises(jpeft.JpeftError, match=match):
        generate(model, params, *args, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("method", [
    jpeft.Bottleneck("houlsby", 8), jpeft.LlamaAdapter(3, 1), jpeft.PromptTuning(4), jpeft.PTuning(4),
    jpeft.PrefixTuning(4),
    jpeft.LoHa(4, targets=["q_proj", "down_proj"]), jpeft.LoKr(2, targets=["v_proj", "up_proj"]),
    jpeft.OFT(4, targets=["k_proj", "gate_proj"]), jpeft.HRA(2, ["q_proj", "down_proj"]),
], ids=lambda m: m.name)
def test_every_method_decodes_what_its_forward_pass_predicts(sharp_llama, method):
    """Cached decoding with an adapter (bottleneck adapters in every step, prompts and prefixes from the
    cache, LoHa's, LoKr's, OFT's and HRA's rebuilt weights) equals re-running the whole sequence each step."""
    model, params = sharp_llama
    adapted = perturb(method.init(jax.random.key(0), params), method.trainable, scale=0.3)
    got = generate(model, adapted, [PROMPTS[1], PROMPTS[2]], max_new_tokens=8, eos_token_id=None)
    # The whole sequence re-run without a cache, in one causal forward pass: each decoded token is the
    # argmax after the prompt and the tokens decoded before it.
    logits = jit_logits(model, adapted, np.asarray([PROMPTS[1] + got[0][:-1]]))[0]
    assert len(got[0]) == 8 and np.argmax(logits[len(PROMPTS[1]) - 1:], axis=-1).tolist() == got[0]
    assert got[0] != generate(model, params, [PROMPTS[1]], max_new_tokens=8, eos_token_id=None)[0]


@pytest.mark.parametrize("family,sizes,field", [("gpt2", dict(n_inner=64), "n_positions"),
                                                ("opt", dict(num_key_value_heads=None, ffn_dim=64),
                                                 "max_position_embeddings")])
def test_learned_positions_are_never_read_past_the_table(tmp_path, family, sizes, field):
    """GPT-2's and OPT's tables of 64 positions: every token generate feeds back needs a row (a soft prompt's rows
    too); one past it is an error, not NaN logits, and so is a longer forward pass; RoPE models run on."""
    path = save_hf_model(make_hf_model(family, **sizes, max_position_embeddings=64), tmp_path / family)
    model, params = jpeft.from_pretrained(path)
    prompt = [list(range(5, 65))]  # 60 tokens: 5 new ones feed 4 back, at positions 60..63
    out = generate(model, params, prompt, 5, eos_token_id=None)[0]
    logits = jit_logits(model, params, [prompt[0] + out[:4]])
    assert np.isfinite(np.asarray(logits)).all() and out[4] == int(jnp.argmax(logits[0, -1]))
    with pytest.raises(jpeft.JpeftError, match="prompt 0 has 60 tokens; with max_new_tokens=6 .* 65 positions"):
        generate(model, params, prompt, 6, eos_token_id=None)
    prompted = jpeft.PromptTuning(2).init(jax.random.key(0), params)
    with pytest.raises(jpeft.JpeftError, match="60 tokens after 2 virtual ones; .* 65 positions but has 64"):
        generate(model, prompted, prompt, 4, eos_token_id=None)
    with pytest.raises(jpeft.JpeftError, match=f"65 tokens .* the model's table holds \\(64, {field}\\)"):
        jit_logits(model, params, jnp.ones((1, 65), jnp.int32))
    with pytest.raises(jpeft.JpeftError, match=f"prompt 0 has 65 tokens but the model reads at most 64 \\({field}\\)"):
        generate(model, params, [list(range(1, 66))], 1, eos_token_id=None)
    llama = dataclasses.replace(model.config, model_type="llama")
    assert not llama.learned_positions and model.config.learned_positions


def test_generate_text_stops_at_every_eos_of_the_generation_config(tmp_path):
    """An instruct checkpoint lists its end-of-turn token beside EOS in generation_config.json; transformers'
    generate stops at each, and so does generate_text (the tokenizer knows only one)."""
    ref_model = make_hf_model("llama", **SHARP, eos_token_id=2)
    path = save_hf_model(ref_model, tmp_path)
    tokenizer = word_tokenizer()
    prompt = [1, *PROMPTS[1]]
    model, params = jpeft.from_pretrained(path)
    free = generate(model, params, [prompt], NEW, eos_token_id=None)[0]
    turn_end = next(t for t in free[2:] if t > 2)  # a token greedy decoding emits after two others
    transformers.GenerationConfig(eos_token_id=[2, turn_end]).save_pretrained(path)
    model, params = jpeft.from_pretrained(path)
    assert model.config.eos_token_ids == (2, turn_end)
    text = " ".join(f"w{t}" for t in prompt[1:])
    [out] = generate_text(model, params, tokenizer, [text], NEW)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW)[0, len(prompt):]
    assert expected[-1] == turn_end and out == tokenizer.decode(expected[:-1]) != ""
