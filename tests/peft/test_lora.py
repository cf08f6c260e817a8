"""LoRA invariants: a pure tree transform that starts as the identity and merges exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import tree as T
from conftest import jit_logits


@pytest.fixture
def base(tiny_llama):
    return jpeft.from_pretrained(tiny_llama[1])


def randomize_b(params, key, scale=0.1):
    """Non-zero B so the adapter changes the output (zero-init would hide bugs)."""
    flat = T.flatten(params)
    keys = iter(jax.random.split(key, len(flat)))
    return T.unflatten({p: scale * jax.random.normal(next(keys), v.shape) if p.endswith("lora_b") else v
                        for p, v in flat.items()})


IDS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 10)))


def test_zero_init_leaves_output_unchanged(base):
    model, params = base
    adapted = jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]).init(jax.random.key(0), params)
    np.testing.assert_array_equal(jit_logits(model, adapted, IDS), jit_logits(model, params, IDS))
    assert T.flatten(params).keys() < T.flatten(adapted).keys()  # pure: the input tree is untouched


def test_merged_equals_unmerged(base):
    model, params = base
    lora = jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj", "lm_head"])
    adapted = randomize_b(lora.init(jax.random.key(0), params), jax.random.key(1))
    unmerged = jit_logits(model, adapted, IDS)
    merged_params = jpeft.merge(adapted)
    assert T.flatten(merged_params).keys() == T.flatten(params).keys()
    merged = jit_logits(model, merged_params, IDS)
    assert np.abs(np.asarray(unmerged - jit_logits(model, params, IDS))).max() > 1e-2
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=0)


def test_mask_marks_exactly_adapter_leaves(base):
    _, params = base
    adapted = jpeft.LoRA(rank=2, targets=["q_proj", "v_proj"]).init(jax.random.key(0), params)
    mask = T.flatten(jpeft.trainable_mask(adapted))
    assert {p for p, m in mask.items() if m} == {
        f"model/layers/self_attn/{m}/{leaf}" for m in ("q_proj", "v_proj") for leaf in ("lora_a", "lora_b")}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["down_proj"], r".*mlp\.(gate|up)_proj"])
def test_count_matches_formula(base, targets):
    model, params = base
    cfg = model.config
    rank = 4
    adapted = jpeft.LoRA(rank=rank, targets=targets).init(jax.random.key(0), params)
    dims = {"q_proj": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
            "v_proj": (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim),
            "down_proj": (cfg.intermediate_size, cfg.hidden_size),
            "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
            "up_proj": (cfg.hidden_size, cfg.intermediate_size)}
    names = targets if isinstance(targets, list) else ["gate_proj", "up_proj"]
    expected = sum(cfg.num_layers * rank * (dims[n][0] + dims[n][1]) for n in names)
    trainable, total = jpeft.count_parameters(adapted)
    assert trainable == expected
    assert total == T.count(params) + expected
    assert jpeft.parameter_report(adapted).startswith(f"trainable params: {expected:,d} || all params: {total:,d}")


def test_peft_init_distribution(base):
    _, params = base
    adapted = jpeft.LoRA(rank=8, targets=["down_proj"]).init(jax.random.key(0), params)
    a = adapted["model"]["layers"]["mlp"]["down_proj"]["lora_a"]
    bound = 1 / np.sqrt(a.shape[-2])  # kaiming-uniform(a=sqrt(5)) on fan_in, as PEFT
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert not np.any(adapted["model"]["layers"]["mlp"]["down_proj"]["lora_b"])


def test_dropout_only_with_rng(base):
    model, params = base
    adapted = randomize_b(jpeft.LoRA(rank=4, dropout=0.5).init(jax.random.key(0), params), jax.random.key(1))
    deterministic = jit_logits(model, adapted, IDS)
    np.testing.assert_array_equal(deterministic, jit_logits(model, adapted, IDS))
    dropped = model.apply({"params": adapted}, IDS, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(dropped - deterministic)).max() > 1e-4


def test_bad_targets_and_rank(base):
    _, params = base
    with pytest.raises(jpeft.JpeftError, match="match no dense layer; available: .*q_proj"):
        jpeft.LoRA(targets=["qkv"]).init(jax.random.key(0), params)
    with pytest.raises(jpeft.JpeftError, match="rank must be >= 1"):
        jpeft.LoRA(rank=0)
