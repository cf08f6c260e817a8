"""VeRA's invariants and refusals (its logits against PEFT both ways, on Llama, Qwen3, Gemma 2/3, GPT-2 and
T5: test_peft_parity.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import tree as T
from conftest import edit_adapter_config, jit_logits, make_hf_model, perturb, save_hf_model

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 10)))
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # outputs 32, 16, 64, 32 wide; inputs 32 and 64


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path_factory.mktemp("base")))


def test_init_leaves_the_model_unchanged_with_one_shared_pair(base):
    model, params = base
    adapted = jpeft.VeRA(rank=8, targets=TARGETS).init(jax.random.key(0), params)
    np.testing.assert_array_equal(jit_logits(model, adapted, IDS), jit_logits(model, params, IDS))
    modules = {p: m for p, m in T.modules(adapted).items() if "vera_a" in m}
    assert len(modules) == len(TARGETS)
    a = max((m["vera_a"] for m in modules.values()), key=lambda a: a.shape[-2])[0]   # [max_in, r]
    b = max((m["vera_b"] for m in modules.values()), key=lambda b: b.shape[-1])[0]   # [r, max_out]
    assert a.shape == (64, 8) and b.shape == (8, 64)
    for m in modules.values():  # every layer of every module reads slices of the one pair
        d_in, d_out = m["kernel"].shape[-2:]
        np.testing.assert_array_equal(m["vera_a"], np.broadcast_to(a[:d_in], m["vera_a"].shape))
        np.testing.assert_array_equal(m["vera_b"], np.broadcast_to(b[:, :d_out], m["vera_b"].shape))
        np.testing.assert_array_equal(m["vera_lambda_d"], np.float32(0.1))
    # PEFT's kaiming-uniform bounds: fan-in max_in for A, r for B (torch's [r, max_in] and [max_out, r])
    assert math.sqrt(6 / 64) * 0.9 < np.abs(a).max() <= math.sqrt(6 / 64)
    assert math.sqrt(6 / 8) * 0.9 < np.abs(b).max() <= math.sqrt(6 / 8)


def test_only_the_vectors_train_and_count_as_peft_counts(base):
    _, params = base
    adapted = jpeft.VeRA(rank=8, targets=TARGETS).init(jax.random.key(0), params)
    trained = {T.leaf_name(p) for p, on in T.flatten(jpeft.trainable_mask(adapted)).items() if on}
    assert trained == {"vera_lambda_d", "vera_lambda_b"}
    layers = 2
    want = layers * sum(8 + out for out in (32, 16, 64, 32))  # r + out per adapted layer
    assert jpeft.count_parameters(adapted)[0] == want
    assert jpeft.count_parameters(adapted)[1] == jpeft.count_parameters(params)[1] + want


def test_merged_equals_unmerged(base):
    model, params = base
    adapted = perturb(jpeft.VeRA(rank=8, targets=TARGETS).init(jax.random.key(0), params), ("vera_lambda_d", "vera_lambda_b"), scale=1.0)
    out = jit_logits(model, adapted, IDS)
    assert np.abs(np.asarray(out - jit_logits(model, params, IDS))).max() > 1e-3
    merged = jpeft.merge(adapted)
    assert set(T.flatten(merged)) == set(T.flatten(params))
    np.testing.assert_allclose(jit_logits(model, merged, IDS), out, atol=1e-5, rtol=0)


def test_dropout_drops_the_adapters_input_in_a_train_step_only(base):
    model, params = base
    adapted = perturb(jpeft.VeRA(rank=8, targets=TARGETS, dropout=0.5).init(jax.random.key(0), params), ("vera_lambda_d", "vera_lambda_b"), scale=1.0)
    plain = perturb(jpeft.VeRA(rank=8, targets=TARGETS).init(jax.random.key(0), params), ("vera_lambda_d", "vera_lambda_b"), scale=1.0)
    np.testing.assert_array_equal(jit_logits(model, adapted, IDS), jit_logits(model, plain, IDS))
    dropped = model.apply({"params": adapted}, IDS, rngs={"dropout": jax.random.key(3)})
    assert np.abs(np.asarray(dropped - jit_logits(model, plain, IDS))).max() > 1e-3


def test_a_tree_of_two_inits_is_refused_at_save(base, tmp_path):
    _, params = base
    one = jpeft.VeRA(rank=4, targets=["q_proj"]).init(jax.random.key(0), params)
    two = jpeft.VeRA(rank=4, targets=["v_proj"]).init(jax.random.key(1), params)
    mixed = T.unflatten({**T.flatten(one), **{p: v for p, v in T.flatten(two).items() if "/v_proj/" in p}})
    with pytest.raises(jpeft.AdapterError, match="not slices of the pair the other modules share"):
        jpeft.save_adapter(str(tmp_path / "adapter"), mixed)


@pytest.mark.parametrize("field,value,match", [
    ("save_projection", False, "save_projection=False.*save it with save_projection=True"),
    ("layers_to_transform", [0], "VeRA adapters with layers_to_transform are not supported"),
    ("r", 2, r"'base_model.vera_A' has shape \(4, 64\).*expected \(2, 64\)"),
])
def test_adapters_jpeft_cannot_read_exactly_are_refused(base, tmp_path, field, value, match):
    _, params = base
    jpeft.save_adapter(str(tmp_path), jpeft.VeRA(rank=4, targets=TARGETS).init(jax.random.key(0), params))
    edit_adapter_config(tmp_path, **{field: value})
    with pytest.raises(jpeft.AdapterError, match=match):
        jpeft.load_adapter(str(tmp_path), params)


@pytest.mark.parametrize("options,match", [
    (dict(targets=r"model\.layers\.0\.self_attn\.q_proj"), "pick only some layers of model.layers.self_attn.q_proj"),
    (dict(targets=["q"]), "match no dense layer; the dense layers: lm_head, model.layers.mlp.down_proj"),
    (dict(targets=["embed_tokens", "q_proj"]), "pick model.embed_tokens, but it is an embedding"),
    (dict(rank=0), "VeRA rank must be >= 1"),
    (dict(dropout=1.0), r"VeRA dropout must be in \[0, 1\)"),
])
def test_bad_options_are_refused(base, options, match):
    _, params = base
    with pytest.raises(jpeft.JpeftError, match=match):
        jpeft.VeRA(**options).init(jax.random.key(0), params)


def test_a_quantized_base_is_refused_naming_qlora(base):
    _, params = base
    quantized = jpeft.QLoRA(rank=4, targets=["q_proj"]).init(jax.random.key(0), params)
    with pytest.raises(jpeft.JpeftError, match="pick model.layers.self_attn.q_proj, but its weight is quantized"):
        jpeft.VeRA(rank=4, targets=["q_proj"]).init(jax.random.key(0), quantized)


def test_a_second_init_is_refused(base):
    _, params = base
    adapted = jpeft.VeRA(rank=4).init(jax.random.key(0), params)
    with pytest.raises(jpeft.JpeftError, match="already holds a VeRA adapter"):
        jpeft.VeRA(rank=4).init(jax.random.key(1), adapted)
