"""The insertion points for attention keys/values, residuals and norms, driven by toy methods:
a method acts at a site exactly when its leaves are in that module's parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import tree as T
from jpeft.models.config import ModelConfig
from jpeft.models.llama import CausalLM, init_params
from jpeft.peft import sites
from jpeft.peft.base import Method
from conftest import jit_logits


class ToyPrefix(Method):
    """Per-layer keys/values prepended to every sequence (prefix tuning's mechanism)."""
    trainable = ("toy_k", "toy_v")

    @staticmethod
    def attention_kv(leaves, k, v):
        batch = lambda p: jnp.broadcast_to(p, (k.shape[0], *p.shape)).astype(k.dtype)
        return jnp.concatenate([batch(leaves["toy_k"]), k], 1), jnp.concatenate([batch(leaves["toy_v"]), v], 1)

    @staticmethod
    def virtual_tokens(leaves):
        return 0, leaves["toy_k"].shape[-3] if "toy_k" in leaves else 0


class ToyShift(Method):
    """A learned vector added to the MLP block's output (where a bottleneck adapter acts)."""
    trainable = ("toy_shift",)

    @staticmethod
    def residual(leaves, h, where, x):
        return h + leaves["toy_shift"] if where == "mlp" else h


class ToyGain(Method):
    trainable = ("toy_gain",)

    @staticmethod
    def norm_output(leaves, y):
        return y * leaves["toy_gain"]


@pytest.fixture
def model(monkeypatch):
    monkeypatch.setattr(sites, "METHODS", (*sites.METHODS, ToyPrefix, ToyShift, ToyGain))
    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    m = CausalLM(cfg)
    return m, init_params(m, jax.random.key(0))


IDS = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 7)))


def with_leaves(params, **leaves):
    flat = T.flatten(params)
    flat.update(leaves)
    return T.unflatten(flat)


def test_prepended_keys_values_act_as_a_cached_prefix(model):
    """Keys/values of a first chunk, prepended at the site, give exactly the logits of the full sequence
    (the model places the real tokens after the prefix's positions itself)."""
    m, params = model
    ids = IDS.at[1, :3].set(IDS[0, :3])  # one prefix for the whole batch, as prefix tuning has
    cache = m.init_cache(2, 3)
    _, cache = m.apply({"params": params}, ids[:, :3], cache=cache)
    row = lambda c: c[:, :m.config.num_kv_heads].transpose(0, 2, 1, 3)  # noqa: E731 - batch row 0's [L, S, KV, D]
    prefixed = with_leaves(params, **{"model/layers/self_attn/toy_k": row(cache["k"]),
                                      "model/layers/self_attn/toy_v": row(cache["v"])})
    rest = jit_logits(m, prefixed, ids[:, 3:])
    full = jit_logits(m, params, ids)
    np.testing.assert_allclose(rest, full[:, 3:], atol=1e-5, rtol=0)
    assert np.abs(np.asarray(rest - jit_logits(m, params, ids[:, 3:]))).max() > 1e-3


def test_residual_and_norm_sites_act_exactly_when_their_leaves_are_present(model):
    m, params = model
    base = jit_logits(m, params, IDS)
    zero = with_leaves(params, **{"model/layers/toy_shift": jnp.zeros((2, 32))})
    np.testing.assert_array_equal(jit_logits(m, zero, IDS), base)
    shifted = with_leaves(params, **{"model/layers/toy_shift": jnp.full((2, 32), 0.5)})
    assert np.abs(np.asarray(m.apply({"params": shifted}, IDS) - base)).max() > 1e-2
    gain = with_leaves(params, **{"model/norm/toy_gain": jnp.full((32,), 2.0)})
    doubled = with_leaves(params, **{"model/norm/scale": 2.0 * params["model"]["norm"]["scale"]})
    np.testing.assert_allclose(jit_logits(m, gain, IDS), jit_logits(m, doubled, IDS), atol=1e-6)
