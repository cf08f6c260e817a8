"""OFT's invariants and refusals (every variant of its config against PEFT both ways: test_peft_parity.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import tree as T
from jpeft.peft.oft import rotation
from conftest import check_merges_and_trains, edit_adapter_config, jit_logits, make_hf_model, perturb, save_hf_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 10))
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # input widths 32, 32, 32, 64


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path_factory.mktemp("base")))


def logits(model, params):
    return jit_logits(model, params, IDS)


def test_identity_at_init_merges_and_trains(base):
    model, params = base
    adapted = jpeft.OFT(block_size=8, targets=TARGETS).init(jax.random.key(0), params)
    np.testing.assert_array_equal(logits(model, adapted), logits(model, params))
    assert T.modules(adapted)["model/layers/mlp/down_proj"]["oft_R"].shape == (2, 8, 28)  # 64 / 8 blocks of 8·7/2
    check_merges_and_trains(model, params, perturb(adapted, ("oft_R",), scale=0.2), jnp.asarray(IDS))


def test_the_exact_cayley_transform_is_orthogonal_and_the_series_nearly(base):
    vectors = 0.01 * jax.random.normal(jax.random.key(0), (3, 28))
    for coefficients, tolerance in (([], 1e-6), ([1.0, 2, 2, 2, 1], 1e-4)):
        r = np.asarray(rotation(vectors, jnp.asarray(coefficients, jnp.float32)), np.float64)
        np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(8), r.shape), atol=tolerance)


@pytest.mark.parametrize("options,match", [
    (dict(block_size=8, rank=4), "a block size or a block count \\(rank\\), not both"),
    (dict(targets=["embed_tokens"]), "pick model.embed_tokens, but it is an embedding: jpeft's OFT adapts Linear"),
    (dict(targets=r"model\.layers\.0\.mlp\.up_proj"), "pick only some layers of model.layers.mlp.up_proj"),
])
def test_bad_options_are_refused(base, options, match):
    _, params = base
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.OFT(**options).init(jax.random.key(0), params)


@pytest.mark.parametrize("fields,match", [
    (dict(oft_block_size=None), "predates PEFT 0.14's OFT"),
    (dict(layers_to_transform=[1]), "OFT adapters with layers_to_transform are not supported"),
    (dict(oft_block_size=4), r"oft_R.weight' has shape \(4, 28\).*expected \(8, 6\)"),
])
def test_dirs_jpeft_cannot_read_exactly_are_refused(base, tmp_path, fields, match):
    _, params = base
    jpeft.save_adapter(str(tmp_path), jpeft.OFT(block_size=8, targets=["q_proj"]).init(jax.random.key(0), params))
    if fields.get("oft_block_size", 1) is None:
        import json
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        del config["oft_block_size"]
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    else:
        edit_adapter_config(tmp_path, **fields)
    with pytest.raises(jpeft.AdapterError, match=match):
        jpeft.load_adapter(str(tmp_path), params)
