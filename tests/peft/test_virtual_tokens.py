"""Prompt tuning, P-tuning, prefix tuning and LLaMA-Adapter against PyTorch PEFT, both ways: the logits of the
input tokens (virtual-token positions dropped) and greedy generation, from the same adapter dir."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from jpeft.generate import generate, generate_text
from conftest import jit_logits, make_hf_model, perturb, save_hf_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 9))
N = 5
PEFT_CONFIGS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "adaption": lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2),
}
METHODS = {"prompt": lambda: jpeft.PromptTuning(N), "p_tuning": lambda: jpeft.PTuning(N, projection=16),
           "prefix": lambda: jpeft.PrefixTuning(N), "adaption": lambda: jpeft.LlamaAdapter(4, 2)}
TRAINED = {"prompt": ("soft_prompt",), "p_tuning": jpeft.PTuning.trainable, "prefix": ("prefix_k", "prefix_v"),
           "adaption": ("adaption_prompt", "adaption_gate")}
SIZE = dict(num_hidden_layers=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch_model = make_hf_model("llama", **SIZE)
    return save_hf_model(torch_model, tmp_path_factory.mktemp("base") / "llama")


def torch_base(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def peft_logits(peft_model, name):
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor(IDS)).logits.numpy()
    return logits[:, N:] if name in ("prompt", "p_tuning") else logits  # PEFT returns a soft prompt's positions too


def jax_logits(model, params):
    return jit_logits(model, params, IDS)


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_peft_written_adapter_gives_peft_logits(tmp_path, base, name):
    peft_model = peft.get_peft_model(torch_base(base), PEFT_CONFIGS[name]()).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(base)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(jax_logits(model, adapted), peft_logits(peft_model, name), atol=2e-4, rtol=0)
    assert np.abs(jax_logits(model, adapted) - jax_logits(model, params)).max() > 1e-2


def test_p_tuning_encodes_its_prompt_as_pefts_encoder_does(tmp_path, base):
    """PEFT's MLP encoder in training mode, given jpeft's encoder weights: the same logits (the saved dirs of the
    tests around this one hold only the encoded prompt)."""
    model, params = jpeft.from_pretrained(base)
    adapted = jpeft.PTuning(N, projection=16).init(jax.random.key(1), params)
    peft_model = peft.get_peft_model(torch_base(base), PEFT_CONFIGS["p_tuning"]()).eval()
    leaves = {k.removeprefix("p_tuning_"): np.asarray(v) for k, v in T.modules(adapted)["model/embed_tokens"].items()}
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(torch.from_numpy(leaves["embedding"]))
        for i, layer in zip((0, 2, 4), ("in", "mid", "out")):
            encoder.mlp_head[i].weight.copy_(torch.from_numpy(leaves[f"{layer}_kernel"].T))
            encoder.mlp_head[i].bias.copy_(torch.from_numpy(leaves[f"{layer}_bias"]))
    np.testing.assert_allclose(jax_logits(model, adapted), peft_logits(peft_model, "p_tuning"), atol=2e-4, rtol=0)
    d, h = 32, 16  # PEFT's count of the encoder it trains: n·D + (D+1)·H + (H+1)·H + (H+1)·D
    assert jpeft.count_parameters(adapted)[0] == N * d + (d + 1) * h + (h + 1) * h + (h + 1) * d
    assert jpeft.count_parameters(adapted)[0] == peft_model.get_nb_trainable_parameters()[0]


def test_an_lstm_encoders_dir_loads_as_the_prompt_it_encoded(tmp_path, base):
    """PEFT saves P-tuning's encoded prompt whatever the encoder (here its bidirectional LSTM, which jpeft
    does not train), and reads it back as that prompt at inference: so does jpeft."""
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=8,
                                      encoder_reparameterization_type="LSTM")
    peft_model = peft.get_peft_model(torch_base(base), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(base)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(jax_logits(model, adapted), peft_logits(peft_model, "p_tuning"), atol=2e-4, rtol=0)
    reread = peft.PeftModel.from_pretrained(torch_base(base), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(peft_logits(reread, "p_tuning"), peft_logits(peft_model, "p_tuning"), atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_a_soft_prompt_is_scaled_where_the_family_scales_its_input(tmp_path, family):
    """Gemma scales its token embeddings by sqrt(hidden) inside the embedding module, and PEFT prepends the soft
    prompt to that module's output: the prompt itself stays unscaled, both ways. Granite multiplies the whole
    input (`embedding_multiplier`), the prompt PEFT prepends too."""
    from conftest import FAMILIES
    path = save_hf_model(make_hf_model(family, **FAMILIES[family]), tmp_path / family)
    model, params = jpeft.from_pretrained(path)
    adapted = perturb(jpeft.PromptTuning(N).init(jax.random.key(1), params), TRAINED["prompt"], jax.random.key(2), 0.5)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(peft_logits(peft_model, "prompt"), jax_logits(model, adapted), atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_jpeft_written_adapter_gives_the_same_logits_in_peft(tmp_path, base, name):
    model, params = jpeft.from_pretrained(base)
    adapted = perturb(METHODS[name]().init(jax.random.key(1), params), TRAINED[name], jax.random.key(2), 0.5)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_base(base), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(peft_logits(peft_model, name), jax_logits(model, adapted), atol=2e-4, rtol=0)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(jax_logits(model, reloaded), jax_logits(model, adapted), atol=1e-6, rtol=0)


def test_a_gqa_prefix_loads_in_peft_where_config_json_has_no_head_dim(tmp_path):
    """Qwen2 files give no head_dim: PEFT derives it from the adapter's token_dim and the model's heads."""
    import json
    path = save_hf_model(make_hf_model("qwen2"), tmp_path / "qwen2")  # 4 heads, 2 of keys/values
    assert "head_dim" not in json.loads((tmp_path / "qwen2" / "config.json").read_text())
    model, params = jpeft.from_pretrained(path)
    adapted = perturb(METHODS["prefix"]().init(jax.random.key(1), params), TRAINED["prefix"], jax.random.key(2), 0.5)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(peft_logits(peft_model, "prefix"), jax_logits(model, adapted), atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_greedy_generation_is_token_identical_to_peft(tmp_path, base, name):
    """The reference is greedy decoding through PeftModel's forward pass. PeftModel.generate with its KV
    cache is not: with peft 0.21 and transformers 5 it re-injects the soft prompt at every step and never
    puts the prefix in the cache (transformers now passes the cache as `cache`, PEFT looks for
    `past_key_values`); without the cache it agrees for prompt tuning and adaption prompts (for prefix tuning,
    peft 0.22's fails with a shape error in the attention's output projection)."""
    model, params = jpeft.from_pretrained(base)
    adapted = perturb(METHODS[name]().init(jax.random.key(3), params), TRAINED[name], jax.random.key(4), 0.5)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_base(base), str(tmp_path / "adapter")).eval()
    prompt = IDS[0].tolist()
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            sequence.append(int(peft_model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    got = generate(model, adapted, [prompt, prompt[3:]], max_new_tokens=12, eos_token_id=None)
    assert got[0] == sequence[len(prompt):]
    if name != "prefix":
        with torch.no_grad():
            uncached = peft_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                           max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
        assert got[0] == uncached[0, len(prompt):].tolist()
    assert got[1] == generate(model, adapted, [prompt[3:]], max_new_tokens=12, eos_token_id=None)[0]  # left padding


def test_zero_gates_leave_the_model_unchanged_and_still_learn(base):
    model, params = jpeft.from_pretrained(base)
    adapted = jpeft.LlamaAdapter(4, 2).init(jax.random.key(0), params)
    np.testing.assert_allclose(jax_logits(model, adapted), jax_logits(model, params), atol=1e-6, rtol=0)
    trainable, frozen = T.partition(adapted, jpeft.trainable_mask(adapted))
    grads = jax.grad(lambda tr: model.apply({"params": T.combine(tr, frozen)}, jnp.asarray(IDS)).std())(trainable)
    gate = np.asarray(T.flatten(grads)["model/layers/self_attn/adaption_gate"])[:, 0]
    assert gate[0] == 0 and np.all(gate[1:] != 0)  # only the top two layers are adapted


def test_each_row_gets_the_prompt_of_its_task(tmp_path, base):
    model, params = jpeft.from_pretrained(base)
    tasks = jpeft.PromptTuning(N, tasks=3).init(jax.random.key(0), params)
    with pytest.raises(jpeft.JpeftError, match="select_task"):
        jax_logits(model, tasks)
    alone = {t: jax_logits(model, jpeft.select_task(tasks, t)) for t in (0, 2)}
    per_row = jax_logits(model, jpeft.select_task(tasks, [2, 0]))
    np.testing.assert_allclose(per_row[0], alone[2][0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(per_row[1], alone[0][1], atol=1e-6, rtol=0)
    assert np.abs(alone[2] - alone[0]).max() > 1e-3
    with pytest.raises(jpeft.JpeftError, match="3 task ids for a batch of 2 rows"):
        jax_logits(model, jpeft.select_task(tasks, [2, 0, 1]))
    # generate_text cuts per-row ids with its batches: each prompt decodes with its own task's prompt
    prompts, ids = [IDS[0].tolist(), IDS[1].tolist(), IDS[0, :5].tolist()], [2, 0, 1]
    ids_as_text = type("Tokenizer", (), {"eos_token_id": None, "pad_token_id": 0,  # the new ids, spelled out
                                         "batch_decode": lambda self, rows, **_: [str(r) for r in rows]})()
    text = lambda p, t, size: generate_text(model, jpeft.select_task(p, t), ids_as_text, prompts, 4, batch_size=size)
    assert text(tasks, ids, 2) == text(tasks, ids, 3) == [text(tasks, t, 3)[i] for i, t in enumerate(ids)]
    with pytest.raises(jpeft.AdapterError, match="select_task"):
        jpeft.save_adapter(str(tmp_path / "all"), tasks)
    jpeft.save_adapter(str(tmp_path / "two"), jpeft.select_task(tasks, 2))  # one task, in PEFT's layout
    np.testing.assert_allclose(jax_logits(model, jpeft.load_adapter(str(tmp_path / "two"), params)), alone[2],
                               atol=1e-6, rtol=0)


def test_prompt_from_text_starts_at_the_texts_embeddings(base, tokenizer):
    _, params = jpeft.from_pretrained(base)
    ids = tokenizer("the cat sat")["input_ids"]  # <s> the cat sat: 4 tokens, repeated to fill N
    prompt = jpeft.PromptTuning(N, init_text="the cat sat", tokenizer=tokenizer).init(jax.random.key(0), params)
    table = np.asarray(params["model"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(np.asarray(prompt["model"]["embed_tokens"]["soft_prompt"])[0],
                                  table[(ids * 2)[:N]])
    with pytest.raises(jpeft.JpeftError, match="needs tokenizer"):
        jpeft.PromptTuning(N, init_text="the cat")


def test_projection_folds_into_plain_prefixes(tmp_path, base):
    """Trained through PEFT's MLP, saved as the prefixes it gives: the same logits in jpeft and PEFT."""
    model, params = jpeft.from_pretrained(base)
    projected = jpeft.PrefixTuning(N, projection=8).init(jax.random.key(0), params)  # random, non-zero throughout
    jpeft.save_adapter(str(tmp_path / "adapter"), projected)
    folded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    assert "prefix_encoder" not in folded["model"]
    np.testing.assert_allclose(jax_logits(model, folded), jax_logits(model, projected), atol=1e-5, rtol=0)
    peft_model = peft.PeftModel.from_pretrained(torch_base(base), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(peft_logits(peft_model, "prefix"), jax_logits(model, projected), atol=2e-4, rtol=0)


def test_an_adapter_for_another_base_is_refused(tmp_path, base):
    model, params = jpeft.from_pretrained(base)
    jpeft.save_adapter(str(tmp_path / "prefix"), jpeft.PrefixTuning(N).init(jax.random.key(0), params))
    _, two_layers = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "other"))
    with pytest.raises(jpeft.AdapterError, match=r"'prompt_embeddings' has shape \(5, 96\).*expected \(5, 64\)"):
        jpeft.load_adapter(str(tmp_path / "prefix"), two_layers)


@pytest.fixture(scope="module")
def phi3_and_llama(tmp_path_factory):
    """A Phi-3 checkpoint (whole-head RoPE, no window) and the Llama checkpoint of its weights, q/k/v and gate/up
    split out of its fused projections: the same model, one with PEFT's adapters for everything."""
    from transformers import AutoConfig, AutoModelForCausalLM
    root = tmp_path_factory.mktemp("fused")
    phi3 = make_hf_model("phi3", **SIZE)
    config = AutoConfig.for_model("llama", **{k: getattr(phi3.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")})
    kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    weights = {}
    for name, w in phi3.state_dict().items():
        if "qkv_proj" in name:
            weights.update(zip((name.replace("qkv", p) for p in "qkv"), w.split([config.hidden_size, kv, kv])))
        elif "gate_up_proj" in name:
            weights.update(zip((name.replace("gate_up", "gate"), name.replace("gate_up", "up")), w.chunk(2)))
        else:
            weights[name] = w
    llama = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    llama.load_state_dict(weights)
    return save_hf_model(phi3, root / "phi3"), save_hf_model(llama, root / "llama")


@pytest.mark.parametrize("name", ["prefix", "adaption"])
def test_phi3s_fused_projections_carry_a_method_as_llamas_three_do(phi3_and_llama, name):
    """PEFT has no adaption prompt for Phi-3, and its prefix keys/values come from outside the projections: on the
    same weights, fused or split, jpeft's prefix and LLaMA-Adapter give the same logits (Llama's are PEFT's)."""
    (phi3, params), (llama, llama_params) = (jpeft.from_pretrained(path) for path in phi3_and_llama)
    np.testing.assert_allclose(jax_logits(phi3, params), jax_logits(llama, llama_params), atol=1e-5, rtol=0)
    adapted = [perturb(METHODS[name]().init(jax.random.key(1), p), TRAINED[name], jax.random.key(2), 0.5)
               for p in (params, llama_params)]
    fused, split = jax_logits(phi3, adapted[0]), jax_logits(llama, adapted[1])
    assert np.abs(fused - jax_logits(phi3, params)).max() > 1e-2
    np.testing.assert_allclose(fused, split, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["prompt", "p_tuning", "prefix"])
def test_a_phi3_adapter_gives_the_same_logits_in_peft_both_ways(tmp_path, phi3_and_llama, name):
    model, params = jpeft.from_pretrained(phi3_and_llama[0])
    adapted = perturb(METHODS[name]().init(jax.random.key(1), params), TRAINED[name], jax.random.key(2), 0.5)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_base(phi3_and_llama[0]), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(peft_logits(peft_model, name), jax_logits(model, adapted), atol=2e-4, rtol=0)
    peft_model.save_pretrained(tmp_path / "from_peft")
    reloaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    np.testing.assert_allclose(jax_logits(model, reloaded), jax_logits(model, adapted), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_a_gpt_neox_adapter_gives_the_same_logits_in_peft_both_ways(tmp_path, name):
    """GPT-NeoX's prefix keys and values join each head after its fused projection's split (past keys, unrotated),
    and its soft prompt joins the input before the embedding dropout: as PEFT's."""
    from conftest import FAMILIES
    path = save_hf_model(make_hf_model("gpt_neox", **FAMILIES["gpt_neox"], initializer_range=0.2), tmp_path / "base")
    model, params = jpeft.from_pretrained(path)
    adapted = perturb(METHODS[name]().init(jax.random.key(1), params), TRAINED[name], jax.random.key(2), 0.5)
    assert np.abs(jax_logits(model, adapted) - jax_logits(model, params)).max() > 1e-2
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(peft_logits(peft_model, name), jax_logits(model, adapted), atol=2e-4, rtol=0)
    peft_model.save_pretrained(tmp_path / "from_peft")
    reloaded = jpeft.load_adapter(str(tmp_path / "from_peft"), params)
    np.testing.assert_allclose(jax_logits(model, reloaded), jax_logits(model, adapted), atol=1e-5, rtol=0)


def test_llama_adapters_prompt_reads_gpt_neoxs_projection_by_heads():
    """PEFT has no adaption prompt for GPT-NeoX: its prompt's keys and values out of query_key_value (each head's
    query, key and value side by side) are those of the same weights laid out as Phi-3's qkv_proj (all queries,
    then keys, then values), whose LLaMA-Adapter equals Llama's three projections' above."""
    from jpeft.peft.llama_adapter import _through_attention
    heads, dim, width, n = 4, 8, 32, 5
    kernel, bias = jax.random.normal(jax.random.key(0), (width, heads * 3 * dim)), jnp.arange(heads * 3 * dim) / 9.0
    blocks = lambda a: a.reshape(*a.shape[:-1], heads, 3, dim).swapaxes(-3, -2).reshape(a.shape)
    prompt = jax.random.normal(jax.random.key(1), (n, width))
    by_heads = _through_attention({"query_key_value": {"kernel": kernel, "bias": bias}, "dense": {}}, prompt,
                                  heads, dim, "heads")
    by_blocks = _through_attention({"qkv_proj": {"kernel": blocks(kernel), "bias": blocks(bias)}, "o_proj": {}},
                                   prompt, heads, dim, "blocks")
    assert by_heads[2] == "dense" and by_blocks[2] == "o_proj"
    for ours, phi3 in zip(by_heads[:2], by_blocks[:2]):
        np.testing.assert_allclose(ours, phi3, atol=1e-5, rtol=0)
    assert np.abs(by_heads[0] - by_heads[1]).max() > 1e-2  # keys and values differ


@pytest.mark.parametrize("family", ["phi", "gpt_neox", "bloom", "falcon", "mpt"])
def test_llama_adapter_passes_its_gated_prompt_through_the_dense_weight_alone(tmp_path, family):
    """Phi's, GPT-NeoX's, BLOOM's and Falcon's attention output projection is `dense`, MPT's `out_proj` (PEFT has no
    adaption prompt for any of them; Falcon's prompt keys and values out of its multi-query query_key_value): zero
    gates leave the model as it was (dense's bias is not added twice), trained ones change it, through dense's
    weight (zeroed, it leaves the gated prompt nothing to add)."""
    from conftest import FAMILIES
    torch_model = make_hf_model(family, **FAMILIES[family], initializer_range=0.2)
    model, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / family))
    adapted = METHODS["adaption"]().init(jax.random.key(1), params)
    np.testing.assert_allclose(jax_logits(model, adapted), jax_logits(model, params), atol=1e-5, rtol=0)
    gated = perturb(adapted, TRAINED["adaption"], jax.random.key(2), 0.5)
    assert np.abs(jax_logits(model, gated) - jax_logits(model, params)).max() > 1e-2
    dense = f"/{model.config.module_name('self_attn')}/{model.config.module_name('o_proj')}/kernel"
    without = lambda tree: T.unflatten({p: v * 0 if dense in p else v for p, v in T.flatten(tree).items()})
    np.testing.assert_allclose(jax_logits(model, without(gated)), jax_logits(model, without(params)), atol=1e-5,
                               rtol=0)


def test_codegens_llama_adapter_is_gptjs_on_its_weights_split(tmp_path):
    """CodeGen is GPT-J with q/k/v in one qkv_proj, laid out in 4 model-parallel shards (each its queries, values,
    keys): its weights split so are a GPT-J with CodeGen's logits, and LLaMA-Adapter's prompt through the fused
    projection gives what it gives through GPT-J's three (two heads to a shard: a split by heads or blocks differs)."""
    from conftest import FAMILIES
    sizes = dict(FAMILIES["codegen"], num_attention_heads=8, hidden_size=64, initializer_range=0.2)
    codegen, params = jpeft.from_pretrained(save_hf_model(make_hf_model("codegen", **sizes), tmp_path / "codegen"))
    gptj, _ = jpeft.from_pretrained(save_hf_model(make_hf_model("gptj", **sizes), tmp_path / "gptj"))
    flat = T.flatten(params)
    kernel = flat.pop("transformer/h/attn/qkv_proj/kernel")  # [layers, D, 3·D]
    q, v, k = np.split(np.asarray(kernel).reshape(*kernel.shape[:2], 4, -1), 3, axis=-1)
    flat.update({f"transformer/h/attn/{name}/kernel": a.reshape(*kernel.shape[:2], -1)
                 for name, a in (("q_proj", q), ("k_proj", k), ("v_proj", v))})
    split = T.unflatten(flat)
    np.testing.assert_allclose(jax_logits(gptj, split), jax_logits(codegen, params), atol=1e-5, rtol=0)
    adapted = [perturb(METHODS["adaption"]().init(jax.random.key(1), tree), ("adaption_gate",), jax.random.key(2), 0.5)
               for tree in (params, split)]
    ours = jax_logits(codegen, adapted[0])
    assert np.abs(ours - jax_logits(codegen, params)).max() > 1e-2
    np.testing.assert_allclose(ours, jax_logits(gptj, adapted[1]), atol=1e-5, rtol=0)
