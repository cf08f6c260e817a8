"""The model's own dropout, applied in training as transformers applies it: the same places and scales
(checked against transformers with every value kept, so each dropout is its 1 / (1 - rate) scale), an
exact gradient through dropped attention probabilities, masks drawn from the step's key, and none at all
outside a train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from conftest import GPT2, make_hf_model, make_t5, save_hf_model
from jpeft.errors import CheckpointError
from jpeft.models import attention as A
from jpeft.models import layers as L
from jpeft.models.config import ModelConfig

RATES = {"llama": dict(attention_dropout=0.3),
         "gpt2": dict(GPT2, embd_pdrop=0.1, attn_pdrop=0.2, resid_pdrop=0.3),  # a different scale at each kind of site
         "phi3": dict(attention_dropout=0.2, resid_pdrop=0.3, embd_pdrop=0.1),  # embd_pdrop: unused
         "seed_oss": dict(head_dim=8, attention_dropout=0.2, residual_dropout=0.3),
         # hidden_dropout on the embeddings and on each branch's output, before the residual sum
         "gpt_neox": dict(num_key_value_heads=None, attention_dropout=0.2, hidden_dropout=0.3),
         "phi": dict(attention_dropout=0.2, resid_pdrop=0.3, embd_pdrop=0.1),
         **{family: dict(num_key_value_heads=None, rotary_dim=4, attn_pdrop=0.2, resid_pdrop=0.3, embd_pdrop=0.1)
            for family in ("gptj", "codegen")},
         "opt": dict(num_key_value_heads=None, ffn_dim=64, attention_dropout=0.2, dropout=0.3),
         "bloom": dict(num_key_value_heads=None, attention_dropout=0.2, hidden_dropout=0.3),
         "falcon": dict(num_key_value_heads=None, ffn_hidden_size=64, attention_dropout=0.2),
         "starcoder2": dict(attention_dropout=0.2, residual_dropout=0.3, embedding_dropout=0.1)}


def keep_everything(monkeypatch):
    """Dropout that keeps every value, on both sides: each dropout becomes x / (1 - rate), so a dropout missing,
    misplaced or scaled otherwise changes the logits."""
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda x, p=0.5, training=True, inplace=False: x / (1 - p) if training and p > 0 else x)
    monkeypatch.setattr(jax.random, "bernoulli", lambda key, p, shape: jnp.ones(shape, bool))


def torch_train_logits(model, **inputs):
    model.set_attn_implementation("eager")  # sdpa drops inside its kernel, out of the patch's reach
    model.train()
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


@pytest.mark.parametrize("family", RATES)
def test_decoder_dropout_sits_where_transformers_puts_it(family, tmp_path, monkeypatch):
    ref = make_hf_model(family, **RATES[family])
    model, params = jpeft.from_pretrained(save_hf_model(ref, tmp_path))
    ids = np.random.RandomState(0).randint(0, 97, (2, 9))
    evaluated = np.asarray(model.apply({"params": params}, ids))
    keep_everything(monkeypatch)
    trained = np.asarray(model.apply({"params": params}, ids, rngs={"dropout": jax.random.key(0)}))
    assert np.abs(trained - evaluated).max() > 1e-2  # the scales change the logits
    np.testing.assert_allclose(trained, torch_train_logits(ref, input_ids=ids), atol=2e-4, rtol=0)


@pytest.mark.parametrize("variant", ["t5-v1.0", "flan-t5"])
def test_t5_dropout_sits_where_transformers_puts_it(variant, tmp_path, monkeypatch):
    """Embeddings, attention probabilities, every sublayer's output, the FF's hidden units, each stack's output."""
    ref, path = make_t5(tmp_path, variant, dropout_rate=0.25)
    model, params = jpeft.from_pretrained(path)
    rng = np.random.RandomState(0)
    ids, dec = rng.randint(2, 97, (2, 8)), rng.randint(2, 97, (2, 5))
    keep_everything(monkeypatch)
    trained = np.asarray(model.apply({"params": params}, ids, dec, rngs={"dropout": jax.random.key(0)}))
    np.testing.assert_allclose(trained, torch_train_logits(ref, input_ids=ids, decoder_input_ids=dec),
                               atol=2e-4, rtol=0)


def test_masks_come_from_the_key_and_only_in_a_train_step(tmp_path):
    ref = make_hf_model("gpt2", **RATES["gpt2"])
    model, params = jpeft.from_pretrained(save_hf_model(ref, tmp_path))
    ids = np.random.RandomState(0).randint(0, 97, (2, 9))
    run = lambda seed: np.asarray(model.apply({"params": params}, ids, rngs={"dropout": jax.random.key(seed)}))  # noqa: E731
    np.testing.assert_array_equal(run(0), run(0))
    assert np.abs(run(0) - run(1)).max() > 1e-3
    with torch.no_grad():  # no key: transformers' eval mode
        np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)),
                                   ref.eval()(torch.tensor(ids)).logits.numpy(), atol=2e-4, rtol=0)


def test_dropout_keeps_each_value_with_probability_one_minus_rate():
    import flax.linen as nn

    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x):
            return L.dropout(self, x, 0.3)

    x = jnp.ones((400, 500), jnp.bfloat16)
    y = np.asarray(Drop().apply({}, x, rngs={"dropout": jax.random.key(0)}), np.float32)
    assert set(np.unique(y)) == {0.0, np.float32(jnp.bfloat16(1 / 0.7))}  # scaled in float32, rounded once
    assert abs((y > 0).mean() - 0.7) < 0.005  # 200,000 draws: ~0.001 standard deviation
    np.testing.assert_array_equal(np.asarray(Drop().apply({}, x)), np.asarray(x))  # no key: no dropout


def test_gradient_through_dropped_attention_probabilities_is_autodiffs():
    """attention_values' own backward (softmax's row term from the output) against autodiff of the plain
    softmax, dropout and product, in float32."""
    keys = jax.random.split(jax.random.key(0), 4)
    scores = jax.random.normal(keys[0], (2, 3, 6, 7))
    v = jax.random.normal(keys[1], (2, 3, 7, 5))
    g = jax.random.normal(keys[2], (2, 3, 6, 5))
    keep = jax.random.bernoulli(keys[3], 0.6, scores.shape)

    def plain(scores, v):
        p = jnp.where(keep, jax.nn.softmax(scores, axis=-1) / 0.6, 0)
        return jnp.einsum("...qs,...sd->...qd", p, v)

    ours = jax.vjp(lambda s, v: A.attention_values(s, v, keep, 0.4), scores, v)
    theirs = jax.vjp(plain, scores, v)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-6)
    for a, b in zip(ours[1](g), theirs[1](g)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_rates_read_from_config_json():
    llama = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)
    assert ModelConfig.from_hf(llama).dropout_rates == {}
    assert ModelConfig.from_hf({**llama, "attention_dropout": 0.1}).dropout_rates == {"attention_dropout": 0.1}
    gpt2 = dict(model_type="gpt2", vocab_size=97, n_embd=32, n_layer=2, n_head=4)  # transformers' defaults: 0.1 each
    assert ModelConfig.from_hf(gpt2).dropout_rates == {"embed_dropout": 0.1, "attention_dropout": 0.1,
                                                       "residual_dropout": 0.1}
    assert ModelConfig.from_hf({**gpt2, "resid_pdrop": 0.0}).without_dropout().dropout_rates == {}
    with pytest.raises(CheckpointError, match="attn_pdrop must be a dropout rate in \\[0, 1\\), got 1.5"):
        ModelConfig.from_hf({**gpt2, "attn_pdrop": 1.5})
