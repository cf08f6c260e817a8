"""Causal attention in query blocks (each against only the keys up to its last query) equals the whole
score matrix: values and gradients, with grouped heads, a prefix of keys, soft-capping and segments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.models import attention as A
from jpeft.models import kv_cache as C


@pytest.mark.parametrize("prefix,cap,window", [(0, None, None), (3, 0.5, None), (2, None, 3)])
def test_blocked_causal_attention_equals_the_whole_score_matrix(prefix, cap, window):
    b, t, heads, kv, d = 2, 10, 4, 2, 8
    q, k, v = (jax.random.normal(key, (b, t + n, h, d)) for key, n, h in
               zip(jax.random.split(jax.random.key(0), 3), (0, prefix, prefix), (heads, kv, kv)))
    _, k, v = C.keys_values(None, k, v, 0, 0)  # as attention reads them: [B, KV, S, D]
    segments = jnp.asarray([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])
    k_segments = jnp.concatenate([jnp.full((b, prefix), -1), segments], 1)
    mask = A.attention_mask(prefix + jnp.arange(t), jnp.arange(prefix + t), segments, k_segments, window)

    def loss(q, k, v, causal_offset):
        out = A.attend(q, k, v, mask, 0.3, cap, causal_offset, block=4)
        out = jnp.where(segments[:, :, None, None] != 0, out, 0)  # a padding query sees nothing: its output is unused
        return (out * jnp.cos(out)).sum(), out

    value_and_grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
    (_, whole), grads_whole = value_and_grads(q, k, v, None)
    (_, blocked), grads_blocked = value_and_grads(q, k, v, prefix)
    np.testing.assert_allclose(blocked, whole, atol=1e-6, rtol=0)
    for a, b_ in zip(grads_blocked, grads_whole):
        np.testing.assert_allclose(a, b_, atol=1e-5, rtol=0)
    alone = A.attend(q[:, :4], k[:, :, :prefix + 4], v[:, :, :prefix + 4], mask[:, :4, :prefix + 4], 0.3, cap)
    np.testing.assert_allclose(blocked[0, :4], alone[0], atol=1e-6, rtol=0)  # segment 1 never sees segment 2
