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


def test_remat_really_saves_less_for_the_backward_pass():
    """Would pass unchanged if remat did nothing, were it not for this: the compiled gradient's scratch
    memory shrinks with every policy that saves less (full < dots < none)."""
    from jpeft.models.config import ModelConfig
    from jpeft.models.llama import CausalLM, init_params

    temp = {}
    for policy in ("none", "dots", "full"):
        cfg = ModelConfig(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=4,
                          num_heads=4, num_kv_heads=2, head_dim=16, remat=policy)
        model = CausalLM(cfg)
        params = init_params(model, jax.random.key(0))
        ids = jnp.zeros((4, 64), jnp.int32)
        grad = jax.jit(jax.grad(lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, ids))[..., 0])))
        temp[policy] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < temp["dots"] < temp["none"] / 2, temp
