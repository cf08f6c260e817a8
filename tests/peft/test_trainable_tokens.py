"""Trainable tokens against PEFT both ways (a tied head reads the rows too), alone and as LoRA's
trainable_token_indices, and their invariants and refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open

import jpeft
from jpeft import tree as T
from test_peft_parity import perturb_torch
from conftest import (GPT2, check_merges_and_trains, edit_adapter_config, jit_logits, make_hf_model, perturb,
                     save_hf_model)

IDS = np.random.RandomState(0).randint(0, 97, (2, 10))
IDS[0, :3] = [3, 7, 50]
CHOSEN = [3, 7, 50]


def logits(model, params):
    return jit_logits(model, params, IDS)


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def peft_dir(path, tied: bool, config):
    """A PEFT model of `config` whose token rows moved (as after training), saved at `path`."""
    peft_model = peft.get_peft_model(make_hf_model("llama", tie_word_embeddings=tied), config)
    perturb_torch(peft_model, ("trainable_tokens_delta",), 0.5)
    peft_model.eval().save_pretrained(path)
    return peft_model


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_peft_dirs_both_ways(tmp_path, tied):
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama", tie_word_embeddings=tied),
                                                        tmp_path / "base"))
    peft_model = peft_dir(tmp_path / "peft", tied, peft.TrainableTokensConfig(target_modules=["embed_tokens"],
                                                                           token_indices=CHOSEN))
    adapted = jpeft.load_adapter(str(tmp_path / "peft"), params)
    np.testing.assert_allclose(logits(model, adapted), torch_logits(peft_model), atol=2e-5, rtol=0)
    assert jpeft.count_parameters(adapted)[0] == peft_model.get_nb_trainable_parameters()[0] == 3 * 32
    ours = perturb(jpeft.TrainableTokens(CHOSEN).init(jax.random.key(0), params), ("trainable_tokens_delta",), scale=0.5)
    jpeft.save_adapter(str(tmp_path / "ours"), ours)
    back = peft.PeftModel.from_pretrained(make_hf_model("llama", tie_word_embeddings=tied), tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(back), logits(model, ours), atol=2e-5, rtol=0)
    np.testing.assert_array_equal(logits(model, jpeft.load_adapter(str(tmp_path / "ours"), params)), logits(model, ours))


def test_only_the_chosen_rows_change_at_init_none_and_they_merge(tmp_path):
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama", tie_word_embeddings=True),
                                                        tmp_path / "base"))
    adapted = jpeft.TrainableTokens(CHOSEN).init(jax.random.key(0), params)
    np.testing.assert_array_equal(logits(model, adapted), logits(model, params))
    adapted = perturb(adapted, ("trainable_tokens_delta",), scale=0.5)
    check_merges_and_trains(model, params, adapted, jnp.asarray(IDS))
    merged = T.modules(jpeft.merge(adapted))["model/embed_tokens"]["embedding"]
    table = T.modules(params)["model/embed_tokens"]["embedding"]
    changed = np.flatnonzero(np.abs(np.asarray(merged - table)).max(-1))
    assert changed.tolist() == CHOSEN


@pytest.mark.parametrize("options,match", [
    (dict(token_indices=[3, 3]), "one or more distinct token ids"),
    (dict(token_indices=[3, 97]), r"token ids \[3, 97\] do not all fit model.embed_tokens's 97 rows"),
    (dict(token_indices=[3], targets=["wte"]), "match no token embedding"),
])
def test_bad_options_are_refused(tmp_path, options, match):
    _, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "base"))
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.TrainableTokens(**options).init(jax.random.key(0), params)


def test_gpt2_trains_rows_of_its_wte_and_a_dict_of_ids_is_refused(tmp_path):
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("gpt2", **GPT2), tmp_path / "gpt2"))
    adapted = perturb(jpeft.TrainableTokens(CHOSEN, ["wte"]).init(jax.random.key(0), params),
                      ("trainable_tokens_delta",), scale=0.5)
    assert np.abs(logits(model, adapted) - logits(model, params)).max() > 1e-3
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    edit_adapter_config(tmp_path / "adapter", token_indices={"wte": CHOSEN})
    with pytest.raises(jpeft.AdapterError, match="token ids per module \\(a dict\\) are not supported"):
        jpeft.load_adapter(str(tmp_path / "adapter"), params)


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_lora_with_trainable_token_indices_both_ways(tmp_path, tied):
    """PEFT's LoraConfig(trainable_token_indices=...): the rows go in the LoRA dir under `token_adapter`, a tied
    head reads them unsaved; jpeft reads, counts and writes the pair as PEFT does."""
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama", tie_word_embeddings=tied),
                                                        tmp_path / "base"))
    peft_model = peft_dir(tmp_path / "peft", tied, peft.LoraConfig(
        r=2, target_modules=["q_proj"], trainable_token_indices=CHOSEN, init_lora_weights=False))
    adapted = jpeft.load_adapter(str(tmp_path / "peft"), params)
    np.testing.assert_allclose(logits(model, adapted), torch_logits(peft_model), atol=2e-5, rtol=0)
    assert jpeft.count_parameters(adapted) == peft_model.get_nb_trainable_parameters()
    lora = jpeft.LoRA(rank=2, targets=["q_proj"], trainable_token_indices=CHOSEN)
    ours = lora.init(jax.random.key(0), params)
    np.testing.assert_array_equal(logits(model, ours), logits(model, params))
    assert {T.leaf_name(p) for p, m in T.flatten(lora.mask(ours)).items() if m} == {
        "lora_a", "lora_b", "trainable_tokens_delta"}
    ours = perturb(ours, ("trainable_tokens_delta", "lora_b"), scale=0.5)
    jpeft.save_adapter(str(tmp_path / "ours"), ours)
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "np") as ours_file, \
            safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "np") as peft_file:
        assert set(ours_file.keys()) == set(peft_file.keys())
    back = peft.PeftModel.from_pretrained(make_hf_model("llama", tie_word_embeddings=tied), tmp_path / "ours").eval()
    assert back.peft_config["default"].trainable_token_indices == CHOSEN
    np.testing.assert_allclose(torch_logits(back), logits(model, ours), atol=2e-5, rtol=0)
    check_merges_and_trains(model, params, ours, jnp.asarray(IDS))


def test_lora_token_rows_refusals(tmp_path):
    _, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "base"))
    with pytest.raises(jpeft.JpeftError, match="model.embed_tokens holds a LoRA and would get trainable token rows"):
        jpeft.LoRA(targets=["q_proj", "embed_tokens"], trainable_token_indices=CHOSEN).init(jax.random.key(0), params)
    with pytest.raises(jpeft.JpeftError, match="one or more distinct token ids"):
        jpeft.LoRA(trainable_token_indices=[])
    adapted = jpeft.LoRA(targets=["q_proj"], trainable_token_indices=CHOSEN).init(jax.random.key(0), params)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    edit_adapter_config(tmp_path / "adapter", trainable_token_indices={"embed_tokens": CHOSEN, "lm_head": [1]})
    with pytest.raises(jpeft.AdapterError, match="token rows of the input embedding \\(model.embed_tokens\\) only"):
        jpeft.load_adapter(str(tmp_path / "adapter"), params)
    edit_adapter_config(tmp_path / "adapter", trainable_token_indices={"embed_tokens": CHOSEN})
    np.testing.assert_array_equal(
        T.flatten(jpeft.load_adapter(str(tmp_path / "adapter"), params))["model/embed_tokens/trainable_tokens_delta"],
        T.flatten(adapted)["model/embed_tokens/trainable_tokens_delta"])
