"""Rematerialisation is a memory knob only: same values, same gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_gradients(tiny_llama, policy):
    model, params = jpeft.from_pretrained(tiny_llama[1])
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 8)))

    def loss(m, p):
        return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, ids))[..., 0])

    rematted = model.clone(config=model.config.replace(remat=policy))
    g_plain = jax.grad(lambda p: loss(model, p))(params)
    g_remat = jax.grad(lambda p: loss(rematted, p))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)
