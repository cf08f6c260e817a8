"""LoHa's invariants and refusals (its logits against PEFT both ways on Llama and T5: test_peft_parity.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import tree as T
from conftest import (GPT2, check_merges_and_trains, edit_adapter_config, jit_logits, make_hf_model, perturb,
                     save_hf_model)

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 10)))
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # [in, out]: [32, 32], [32, 16], [32, 64], [64, 32]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path_factory.mktemp("base")))


def test_init_leaves_the_model_unchanged_with_pefts_bounds(base):
    model, params = base
    adapted = jpeft.LoHa(rank=8, alpha=4, targets=TARGETS).init(jax.random.key(0), params)
    np.testing.assert_array_equal(jit_logits(model, adapted, IDS), jit_logits(model, params, IDS))
    up = T.modules(adapted)["model/layers/mlp/up_proj"]
    assert up["hada_w1_b"].shape == (2, 32, 8) and up["hada_w1_a"].shape == (2, 8, 64)
    np.testing.assert_array_equal(up["hada_w2_b"], 0)
    np.testing.assert_array_equal(up["hada_scale"], np.float32(4 / 8))
    # kaiming-uniform (a=√5) on torch's [out, r] and [r, in]: U(±1/√r) and U(±1/√in)
    for leaf, bound in (("hada_w1_a", 8 ** -0.5), ("hada_w2_a", 8 ** -0.5), ("hada_w1_b", 32 ** -0.5)):
        assert 0.9 * bound < np.abs(up[leaf]).max() <= bound, leaf


def test_delta_is_the_scaled_hadamard_product_and_counts_as_peft_counts(base):
    model, params = base
    adapted = perturb(jpeft.LoHa(rank=2, alpha=3, targets=TARGETS).init(jax.random.key(0), params), jpeft.LoHa.trainable, scale=0.3)
    leaves = {k: np.asarray(v[1], np.float64) for k, v in T.modules(adapted)["model/layers/self_attn/v_proj"].items()}
    want = 1.5 * (leaves["hada_w1_b"] @ leaves["hada_w1_a"]) * (leaves["hada_w2_b"] @ leaves["hada_w2_a"])
    merged = T.modules(jpeft.merge(adapted))["model/layers/self_attn/v_proj"]["kernel"][1]
    np.testing.assert_allclose(np.asarray(merged) - leaves["kernel"], want, atol=1e-6, rtol=0)
    trained = {T.leaf_name(p) for p, on in T.flatten(jpeft.trainable_mask(adapted)).items() if on}
    assert trained == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    want_count = 2 * sum(2 * 2 * (i + o) for i, o in ((32, 32), (32, 16), (32, 64), (64, 32)))  # 2 layers, 2·r·(in+out)
    assert jpeft.count_parameters(adapted)[0] == want_count


def test_merged_equals_unmerged_and_gradients_reach_every_factor(base):
    model, params = base
    adapted = perturb(jpeft.LoHa(rank=4, targets=TARGETS).init(jax.random.key(0), params), jpeft.LoHa.trainable, scale=0.3)
    check_merges_and_trains(model, params, adapted, IDS)


@pytest.mark.parametrize("field,value,match", [
    ("rank_pattern", {"q_proj": 2}, "LoHa adapters with rank_pattern are not supported"),
    ("layers_to_transform", [0], "LoHa adapters with layers_to_transform are not supported"),
    ("r", 2, r"hada_w1_a' has shape \(32, 4\).*expected \(32, 2\)"),
])
def test_adapters_jpeft_cannot_read_exactly_are_refused(base, tmp_path, field, value, match):
    _, params = base
    jpeft.save_adapter(str(tmp_path), jpeft.LoHa(rank=4, targets=TARGETS).init(jax.random.key(0), params))
    edit_adapter_config(tmp_path, **{field: value})
    with pytest.raises(jpeft.AdapterError, match=match):
        jpeft.load_adapter(str(tmp_path), params)


def test_training_time_dropouts_load_with_a_warning(base, tmp_path, caplog):
    model, params = base
    adapted = perturb(jpeft.LoHa(rank=4, targets=TARGETS).init(jax.random.key(0), params), jpeft.LoHa.trainable, scale=0.3)
    jpeft.save_adapter(str(tmp_path), adapted)
    edit_adapter_config(tmp_path, rank_dropout=0.1, module_dropout=0.2)
    loaded = jpeft.load_adapter(str(tmp_path), params)
    assert "trained with rank_dropout/module_dropout, which jpeft does not implement" in caplog.text
    np.testing.assert_array_equal(jit_logits(model, loaded, IDS), jit_logits(model, adapted, IDS))


@pytest.mark.parametrize("options,match", [
    (dict(targets=r"model\.layers\.0\.self_attn\.q_proj"), "pick only some layers of model.layers.self_attn.q_proj"),
    (dict(targets=["q"]), "match no dense layer; the dense layers: lm_head, model.layers.mlp.down_proj"),
    (dict(targets=["embed_tokens", "q_proj"]), "pick model.embed_tokens, but it is an embedding"),
    (dict(rank=0), "LoHa rank must be >= 1"),
])
def test_bad_options_are_refused(base, options, match):
    _, params = base
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.LoHa(**options).init(jax.random.key(0), params)


def test_what_pefts_loha_cannot_adapt_is_refused(base, tmp_path):
    """A quantized weight, a second init, GPT-2's Conv1D projections (PEFT's LoHa takes torch Linear layers)."""
    _, params = base
    quantized = jpeft.QLoRA(rank=4, targets=["q_proj"]).init(jax.random.key(0), params)
    with pytest.raises(jpeft.JpeftError, match="pick model.layers.self_attn.q_proj, but its weight is quantized"):
        jpeft.LoHa(targets=["q_proj"]).init(jax.random.key(0), quantized)
    adapted = jpeft.LoHa().init(jax.random.key(0), params)
    with pytest.raises(jpeft.JpeftError, match="already holds a LoHa adapter"):
        jpeft.LoHa().init(jax.random.key(1), adapted)
    _, gpt2 = jpeft.from_pretrained(save_hf_model(make_hf_model("gpt2", **GPT2), tmp_path / "gpt2"))
    with pytest.raises(jpeft.JpeftError, match="pick transformer.h.attn.c_attn, but it is GPT-2's Conv1D"):
        jpeft.LoHa(targets=["c_attn"]).init(jax.random.key(0), gpt2)
