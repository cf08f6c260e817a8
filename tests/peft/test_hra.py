"""HRA against PEFT both ways (Householder chains and their Gram–Schmidt form), and its invariants and refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import tree as T
from conftest import edit_adapter_config, make_hf_model, perturb, save_hf_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 10))
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path_factory.mktemp("base")))


def logits(model, params):
    return np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


PEFT_CONFIGS = {
    "chain": dict(r=4, target_modules=["q_proj", "down_proj"]),
    "gram-schmidt": dict(r=3, target_modules=["v_proj", "up_proj"], apply_GS=True),
    "odd-head": dict(r=5, target_modules=["k_proj", "lm_head"]),
}


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_peft_written_adapter_loads_with_same_logits(base, tmp_path, name):
    model, params = base
    peft_model = peft.get_peft_model(make_hf_model("llama"), peft.HRAConfig(init_weights=False, **PEFT_CONFIGS[name]))
    peft_model.eval().save_pretrained(tmp_path)
    adapted = jpeft.load_adapter(str(tmp_path), params)
    np.testing.assert_allclose(logits(model, adapted), torch_logits(peft_model), atol=2e-5, rtol=0)
    assert np.abs(logits(model, adapted) - logits(model, params)).max() > 1e-3
    assert jpeft.count_parameters(adapted)[0] == peft_model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("method", [jpeft.HRA(4, targets="all-linear"), jpeft.HRA(2, TARGETS, gram_schmidt=True)],
                         ids=["all-linear", "gram-schmidt"])
def test_jpeft_written_adapter_loads_in_peft(base, tmp_path, method):
    model, params = base
    adapted = perturb(method.init(jax.random.key(0), params), ("hra_u",), scale=0.3)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted)
    peft_model = peft.PeftModel.from_pretrained(make_hf_model("llama"), tmp_path / "adapter").eval()
    np.testing.assert_allclose(logits(model, adapted), torch_logits(peft_model), atol=2e-5, rtol=0)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_array_equal(logits(model, reloaded), logits(model, adapted))


def test_paired_init_is_the_identity_and_it_merges_and_trains(base, caplog):
    model, params = base
    adapted = jpeft.HRA(4, TARGETS).init(jax.random.key(0), params)
    u = np.asarray(T.modules(adapted)["model/layers/mlp/down_proj"]["hra_u"])
    assert u.shape == (2, 64, 4) and np.array_equal(u[..., 0], u[..., 1]) and 0.9 * 2 ** -0.5 < np.abs(u).max() <= 2 ** -0.5
    np.testing.assert_allclose(logits(model, adapted), logits(model, params), atol=1e-5, rtol=0)
    jpeft.HRA(3, TARGETS).init(jax.random.key(0), params)
    assert "HRA rank 3 is odd" in caplog.text
    jpeft.HRA(2, TARGETS, gram_schmidt=True).init(jax.random.key(0), params)
    assert "which Gram–Schmidt cannot orthonormalise" in caplog.text
    adapted = perturb(adapted, ("hra_u",), scale=0.3)
    merged = jpeft.merge(adapted)
    assert set(T.flatten(merged)) == set(T.flatten(params))
    np.testing.assert_allclose(logits(model, merged), logits(model, adapted), atol=1e-5, rtol=0)
    trainable, frozen = T.partition(adapted, jpeft.trainable_mask(adapted))
    grads = jax.grad(lambda t: model.apply({"params": T.combine(t, frozen)}, jnp.asarray(IDS)).sum())(trainable)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))


def test_reflections_keep_the_weights_norms(base):
    """H is orthogonal, so each column of H·W keeps its norm."""
    _, params = base
    adapted = perturb(jpeft.HRA(3, ["q_proj"], gram_schmidt=True).init(jax.random.key(0), params), ("hra_u",), scale=1.0)
    for tree in (adapted, perturb(jpeft.HRA(3, ["q_proj"]).init(jax.random.key(0), params), ("hra_u",), scale=1.0)):
        before = T.modules(tree)["model/layers/self_attn/q_proj"]["kernel"]
        after = T.modules(jpeft.merge(tree))["model/layers/self_attn/q_proj"]["kernel"]
        assert np.abs(np.asarray(after - before)).max() > 1e-2
        np.testing.assert_allclose(np.linalg.norm(after, axis=-2), np.linalg.norm(before, axis=-2), rtol=1e-5)


@pytest.mark.parametrize("options,match", [
    (dict(rank=0), "HRA rank must be >= 1"),
    (dict(targets=["embed_tokens"]), "pick model.embed_tokens, but it is an embedding: jpeft's HRA adapts Linear"),
])
def test_bad_options_are_refused(base, options, match):
    _, params = base
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.HRA(**options).init(jax.random.key(0), params)


@pytest.mark.parametrize("fields,match", [
    (dict(layers_to_transform=[1]), "HRA adapters with layers_to_transform are not supported"),
    (dict(r=2), r"hra_u' has shape \(32, 4\).*expected \(32, 2\)"),
])
def test_dirs_jpeft_cannot_read_exactly_are_refused(base, tmp_path, fields, match):
    _, params = base
    jpeft.save_adapter(str(tmp_path), jpeft.HRA(4, targets=["q_proj"]).init(jax.random.key(0), params))
    edit_adapter_config(tmp_path, **fields)
    with pytest.raises(jpeft.AdapterError, match=match):
        jpeft.load_adapter(str(tmp_path), params)
