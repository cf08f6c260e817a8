"""RoPE's cos/sin tables are computed once a call, before the layer scan, not in every layer (their values
against transformers: test_parity.py, every RoPE scaling and Gemma 3's local RoPE)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

import jpeft
from jpeft.models.rope import apply_rope


def test_rope_tables_are_computed_once_before_the_layer_scan(tiny_llama):
    """cos and sin of the positions are computed before the layer scan, never inside it: there each layer
    recomputed them, XLA fused them into every head's rotation, and the scan stacked them per layer."""
    model, params = jpeft.from_pretrained(tiny_llama[1])
    ids = jnp.zeros((2, 8), jnp.int32)

    def primitives(jaxpr, in_scan=False):
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name, in_scan
            for sub in jaxprs_in_params(eqn.params):
                yield from primitives(sub, in_scan or eqn.primitive.name == "scan")

    found = set(primitives(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(params).jaxpr))
    assert ("cos", False) in found and ("sin", False) in found
    assert ("cos", True) not in found and ("sin", True) not in found


def rotate_half_reference(x, cos, sin, interleaved=False):
    """HF's `apply_rotary_pos_emb`: x·cos + rotate_half(x)·sin with the tables repeated over both halves (Llama's),
    or each entry repeated for its neighbouring pair of dimensions (ERNIE 4.5's and Helium's `rotate_half`)."""
    if interleaved:
        cos, sin = (jnp.repeat(c, 2, axis=-1)[:, :, None, :] for c in (cos, sin))
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return x * cos + jnp.stack([-x2, x1], -1).reshape(x.shape) * sin
    cos, sin = (jnp.concatenate([c, c], -1)[:, :, None, :] for c in (cos, sin))
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_gradient_is_autodiffs(dtype, interleaved):
    """apply_rope's own backward (the inverse rotation) gives autodiff's gradient of HF's rotation, over halves and
    over neighbouring pairs."""
    kx, kg, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 6, 3, 16), dtype)
    g = jax.random.normal(kg, x.shape, dtype)
    angles = jax.random.uniform(kt, (2, 6, 8), jnp.float32, 0, 100)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    out, pullback = jax.vjp(lambda x: apply_rope(x, cos, sin, interleaved), x)
    ref, ref_pullback = jax.vjp(lambda x: rotate_half_reference(x.astype(jnp.float32), cos, sin, interleaved)
                                .astype(dtype), x)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(pullback(g)[0], np.float32), np.asarray(ref_pullback(g)[0], np.float32),
                               rtol=tol, atol=tol)
