"""Trainable tokens against PEFT both ways (a tied head reads the rows too), and their invariants and refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from conftest import GPT2, check_merges_and_trains, edit_adapter_config, make_hf_model, perturb, save_hf_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 10))
IDS[0, :3] = [3, 7, 50]
CHOSEN = [3, 7, 50]


def logits(model, params):
    return np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_peft_dirs_both_ways(tmp_path, tied):
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model("llama", tie_word_embeddings=tied),
                                                        tmp_path / "base"))
    peft_model = peft.get_peft_model(make_hf_model("llama", tie_word_embeddings=tied), peft.TrainableTokensConfig(
        target_modules=["embed_tokens"], token_indices=CHOSEN))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(0.5 * torch.randn_like(p))
    peft_model.eval().save_pretrained(tmp_path / "peft")
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
