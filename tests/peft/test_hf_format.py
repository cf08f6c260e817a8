"""HF PEFT adapter directories both ways, against PyTorch PEFT itself."""
import json

import jax
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft import tree as T
from conftest import jit_logits, make_hf_model, save_hf_model
from test_lora import randomize_b

IDS = np.random.RandomState(0).randint(0, 97, (2, 10))
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def jax_logits(model, params):
    return jit_logits(model, params, IDS)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL + ["lm_head"]])
def test_save_adapter_loads_in_peft(tiny_llama, tmp_path, targets):
    torch_model, path = tiny_llama
    model, params = jpeft.from_pretrained(path)
    adapted = randomize_b(jpeft.LoRA(rank=4, alpha=12, targets=targets).init(jax.random.key(0), params),
                          jax.random.key(1))
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    np.testing.assert_allclose(jax_logits(model, adapted), torch_logits(peft_model), atol=2e-4, rtol=0)
    assert np.abs(jax_logits(model, adapted) - jax_logits(model, params)).max() > 1e-2


@pytest.mark.parametrize("rslora", [False, True])
def test_load_adapter_written_by_peft(tmp_path, rslora):
    torch_model = make_hf_model("qwen2", tie_word_embeddings=True)
    path = save_hf_model(torch_model, tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                             rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 6}, use_rslora=rslora,
                             init_lora_weights=False)  # PEFT's own random non-zero B
    peft_model = peft.get_peft_model(torch_model, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model, params = jpeft.from_pretrained(path)
    adapted = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(jax_logits(model, adapted), torch_logits(peft_model), atol=2e-4, rtol=0)
    assert adapted["model"]["layers"]["mlp"]["up_proj"]["lora_a"].shape[-1] == 2


def test_round_trip_is_exact(tiny_llama, tmp_path):
    _, path = tiny_llama
    _, params = jpeft.from_pretrained(path)
    adapted = randomize_b(jpeft.LoRA(rank=3, alpha=5, targets=ALL).init(jax.random.key(0), params), jax.random.key(1))
    jpeft.save_adapter(str(tmp_path / "a"), adapted)
    loaded = jpeft.load_adapter(str(tmp_path / "a"), params)
    flat, back = T.flatten(adapted), T.flatten(loaded)
    assert flat.keys() == back.keys()
    for key in flat:
        np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(back[key]), err_msg=key)


@pytest.fixture
def adapter_dir(tiny_llama, tmp_path):
    _, path = tiny_llama
    _, params = jpeft.from_pretrained(path)
    jpeft.save_adapter(str(tmp_path / "a"), jpeft.LoRA(rank=2).init(jax.random.key(0), params))
    return tmp_path / "a", params


def edit_config(adapter, **changes):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def edit_weights(adapter, fn):
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(fn(tensors), adapter / "adapter_model.safetensors")


def test_keys_of_a_headless_base_or_of_t5s_per_stack_embeddings_are_named(adapter_dir):
    adapter, params = adapter_dir
    original = load_file(adapter / "adapter_model.safetensors")
    edit_weights(adapter, lambda t: {k.replace("base_model.model.model.", "base_model.model."): v for k, v in t.items()})
    with pytest.raises(jpeft.AdapterError, match="named without 'model.'.*headless base"):
        jpeft.load_adapter(str(adapter), params)
    edit_weights(adapter, lambda t: {**original, "base_model.model.encoder.embed_tokens.lora_embedding_A": np.ones(2)})
    with pytest.raises(jpeft.AdapterError, match="each T5 stack's embed_tokens"):
        jpeft.load_adapter(str(adapter), params)


def test_an_adapted_tree_or_a_named_adapters_parent_dir_is_refused(adapter_dir, tmp_path):
    """Loaded into a tree that holds an adapter, both would stay active; PEFT saves a named adapter one level down."""
    adapter, params = adapter_dir
    adapted = jpeft.LoRA(rank=2, targets=["v_proj"]).init(jax.random.key(1), params)
    with pytest.raises(jpeft.AdapterError, match="already holds adapter leaves \\(lora_a, lora_b, lora_scale\\)"):
        jpeft.load_adapter(str(adapter), adapted)
    (tmp_path / "named").mkdir()
    adapter.rename(tmp_path / "named" / "mine")
    with pytest.raises(jpeft.AdapterError, match="named adapter in a subfolder: mine; pass that folder"):
        jpeft.load_adapter(str(tmp_path / "named"), params)
    jpeft.load_adapter(str(tmp_path / "named" / "mine"), params)


def test_missing_key(adapter_dir):
    adapter, params = adapter_dir
    edit_weights(adapter, lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.v_proj.lora_B" not in k})
    with pytest.raises(jpeft.AdapterError, match=r"missing key '.*layers\.1\.self_attn\.v_proj\.lora_B\.weight'"):
        jpeft.load_adapter(str(adapter), params)


def test_unexpected_key(adapter_dir):
    adapter, params = adapter_dir
    edit_weights(adapter, lambda t: {**t, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight":
                                     np.zeros((2, 32), np.float32)})
    with pytest.raises(jpeft.AdapterError, match=r"unexpected keys .*mlp\.up_proj\.lora_A"):
        jpeft.load_adapter(str(adapter), params)


def test_targets_matching_nothing_list_the_modules(adapter_dir):
    adapter, params = adapter_dir
    edit_config(adapter, target_modules=["embed_tokenz"])
    with pytest.raises(jpeft.AdapterError, match=r"\['embed_tokenz'\] match no module of the base model; its "
                                                 r"modules: .*model\.embed_tokens.*model\.layers\.self_attn\.q_proj"):
        jpeft.load_adapter(str(adapter), params)


def test_shape_mismatch(adapter_dir, tmp_path):
    adapter, _ = adapter_dir
    other = save_hf_model(make_hf_model("llama", hidden_size=48), tmp_path / "other")
    _, other_params = jpeft.from_pretrained(other)
    with pytest.raises(jpeft.AdapterError, match="does not fit the base weight.*different base model"):
        jpeft.load_adapter(str(adapter), other_params)


def test_unknown_peft_type_and_unhonoured_fields(adapter_dir):
    adapter, params = adapter_dir
    edit_config(adapter, peft_type="BOFT")
    with pytest.raises(jpeft.AdapterError, match="peft_type 'BOFT' is not supported"):
        jpeft.load_adapter(str(adapter), params)
    edit_config(adapter, peft_type="LORA")
    as_written = T.flatten(jpeft.load_adapter(str(adapter), params))
    edit_config(adapter, lora_bias=True)
    with pytest.raises(jpeft.AdapterError, match="lora_bias=True cannot be honoured"):
        jpeft.load_adapter(str(adapter), params)
    for field, value in (("use_bdlora", {"target_modules_bd_a": ["o_proj"]}), ("kasa_config", {"r": 2})):
        edit_config(adapter, lora_bias=False, **{field: value})  # variants whose leaves a plain LoRA file lacks
        with pytest.raises(jpeft.AdapterError, match=f"{field}=.* cannot be honoured"):
            jpeft.load_adapter(str(adapter), params)
        edit_config(adapter, **{field: None})
    edit_config(adapter, init_lora_weights="mica")
    with pytest.raises(jpeft.AdapterError, match="'mica' cannot be honoured.*retrain"):
        jpeft.load_adapter(str(adapter), params)
    edit_config(adapter, init_lora_weights=True, peft_type="PROMPT_TUNING", task_type="SEQ_CLS")
    with pytest.raises(jpeft.AdapterError, match="PROMPT_TUNING adapter for sequence classification"):
        jpeft.load_adapter(str(adapter), params)
    edit_config(adapter, peft_type="LORA", task_type="CAUSAL_LM")
    edit_config(adapter, lora_bias=False, fan_in_fan_out=True)  # the torch base's layout, not the adapter's math
    flagged = T.flatten(jpeft.load_adapter(str(adapter), params))
    assert flagged.keys() == as_written.keys() and "model/layers/self_attn/q_proj/lora_a" in flagged
    assert all(np.array_equal(flagged[k], as_written[k]) for k in flagged)


def test_missing_and_corrupt_files(adapter_dir, tmp_path):
    adapter, params = adapter_dir
    with pytest.raises(jpeft.AdapterError, match="no such adapter directory"):
        jpeft.load_adapter(str(tmp_path / "nope"), params)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(jpeft.AdapterError, match="unreadable safetensors"):
        jpeft.load_adapter(str(adapter), params)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(jpeft.AdapterError, match="adapter_config.json"):
        jpeft.load_adapter(str(adapter), params)


def test_save_without_adapter(tiny_llama, tmp_path):
    _, params = jpeft.from_pretrained(tiny_llama[1])
    with pytest.raises(jpeft.AdapterError, match="holds no adapter leaves"):
        jpeft.save_adapter(str(tmp_path / "x"), params)


def test_lm_head_of_a_tied_model_is_refused_not_skipped(tmp_path):
    """PEFT wraps a tied head as a module of its own; jpeft adapts it only through the embedding, so a target
    naming lm_head there is an error (at init, and loading PEFT's adapter), never silently left out."""
    torch_model = make_hf_model("qwen2", tie_word_embeddings=True)
    _, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    tied = "name lm_head, but this model's output layer is its token embedding"
    with pytest.raises(jpeft.JpeftError, match=tied):
        jpeft.LoRA(rank=2, alpha=4, targets=["q_proj", "lm_head"]).init(jax.random.key(0), params)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    peft.get_peft_model(torch_model, config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(jpeft.AdapterError, match=tied):
        jpeft.load_adapter(str(tmp_path / "adapter"), params)
