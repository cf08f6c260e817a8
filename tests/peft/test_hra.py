"""HRA's invariants and refusals (chains and the Gram–Schmidt form against PEFT both ways: test_peft_parity.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import tree as T
from conftest import check_merges_and_trains, edit_adapter_config, jit_logits, make_hf_model, perturb, save_hf_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 10))
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path_factory.mktemp("base")))


def logits(model, params):
    return jit_logits(model, params, IDS)


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
    check_merges_and_trains(model, params, perturb(adapted, ("hra_u",), scale=0.3), jnp.asarray(IDS))


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
