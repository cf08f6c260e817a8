"""Products in the compute dtype: autodiff's values and gradients in float32; in bfloat16 the
gradients are bfloat16 products too, and only the wanted ones are computed."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from jpeft.products import einsum, matmul
from conftest import dot_operand_types

SPECS = [("...qd,...sd->...qs", (2, 3, 5, 4), (2, 3, 6, 4)),  # attention scores
         ("...qs,...sd->...qd", (2, 3, 5, 6), (2, 3, 6, 4)),  # attention output
         ("bti,io->bto", (2, 5, 4), (4, 3))]


def _operands(shape_a, shape_b, dtype=jnp.float32):
    ka, kb = jax.random.split(jax.random.key(0))
    return jax.random.normal(ka, shape_a).astype(dtype), jax.random.normal(kb, shape_b).astype(dtype)


def _loss(product):
    return lambda a, b: jnp.sum(jnp.sin(product(a, b).astype(jnp.float32)))


@pytest.mark.parametrize("spec,shape_a,shape_b", SPECS)
def test_einsum_is_autodiff_in_float32(spec, shape_a, shape_b):
    a, b = _operands(shape_a, shape_b)
    ours, ref = _loss(lambda a, b: einsum(spec, a, b)), _loss(lambda a, b: jnp.einsum(spec, a, b))
    np.testing.assert_allclose(ours(a, b), ref(a, b), rtol=1e-6)
    for got, want in zip(jax.grad(ours, (0, 1))(a, b), jax.grad(ref, (0, 1))(a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("w_shape", [(4, 3), (4, 6)], ids=["narrow", "wide"])
def test_matmul_is_autodiff_in_float32(w_shape):
    """Both ways of the weight's gradient (a narrow weight's as (gᵀ·x)ᵀ) are autodiff's."""
    x, w = _operands((2, 5, 4), w_shape)
    ours, ref = _loss(matmul), _loss(lambda x, w: x @ w)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-6)
    for got, want in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _dots(fn, *args):
    """(operand dtypes) of every dot_general in fn's jaxpr, nested ones included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(v.aval.dtype.name for v in eqn.invars))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("spec,shape_a,shape_b", SPECS)
def test_bfloat16_gradients_are_bfloat16_products(spec, shape_a, shape_b):
    a, b = _operands(shape_a, shape_b, jnp.bfloat16)
    out = jnp.float32 if spec.endswith("qs") else None
    loss = _loss(lambda a, b: einsum(spec, a, b, out))
    dots = _dots(jax.grad(loss, (0, 1)), a, b)
    assert dots == [("bfloat16", "bfloat16")] * 3  # the product and both gradients
    ref = _loss(lambda a, b: jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32)))
    for got, want in zip(jax.grad(loss, (0, 1))(a, b), jax.grad(ref, (0, 1))(a, b)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.05)


def left_operands_contracted_minor(hlo: str) -> list[bool]:
    """For every dot in compiled HLO text: is its left operand contracted along its minor-most axis?"""
    layouts = dict(re.findall(r"%([\w.-]+) = \w+\[[\d,]*\]\{(\d+)", hlo) + re.findall(r"([\w.-]+): \w+\[[\d,]*\]\{(\d+)", hlo))
    return [layouts[lhs] == dims for lhs, dims in re.findall(r" dot\(%([\w.-]+), .*?lhs_contracting_dims=\{(\d+)\}", hlo)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="how XLA:CPU compiles a product")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_attention_gradients_stay_on_the_fast_path(dtype):
    """XLA:CPU runs a product whose left operand is contracted along another axis off its fast path (bf16 in
    float32, float32 as a generic loop); the key's and value's gradients (gᵀ·q, pᵀ·g) get their transposed
    operand materialised first, and bf16 products stay bf16."""
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 2, 64, 32)).astype(dtype) for key in keys)

    def attention(q, k, v):
        p = jax.nn.softmax(einsum("...qd,...sd->...qs", q, k, jnp.float32), axis=-1).astype(v.dtype)
        return jnp.sum(einsum("...qs,...sd->...qd", p, v).astype(jnp.float32))

    hlo = jax.jit(jax.grad(attention, (0, 1, 2))).lower(q, k, v).compile().as_text()
    minor = left_operands_contracted_minor(hlo)
    assert len(minor) >= 5 and all(minor), minor
    if dtype == jnp.bfloat16:
        operands = dot_operand_types(hlo)
        assert {t for pair in operands for t in pair} == {"bf16"}, operands
    ref = jax.grad(lambda q, k, v: attention(*(x.astype(jnp.float32) for x in (q, k, v))), (0, 1, 2))(q, k, v)
    for got, want in zip(jax.grad(attention, (0, 1, 2))(q, k, v), ref):
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.05)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="how XLA:CPU compiles a bf16 product")
@pytest.mark.parametrize("w_shape", [(64, 8), (64, 96)], ids=["narrow", "wide"])
def test_compiled_bfloat16_matmul_gradients_stay_bfloat16_products(w_shape):
    x, w = _operands((4, 32, 64), w_shape, jnp.bfloat16)
    c = jax.random.normal(jax.random.key(1), (4, 32, w_shape[1]))
    loss = lambda product: lambda x, w: jnp.sum(product(x, w).astype(jnp.float32) * c)
    grad = jax.grad(loss(matmul), (0, 1))
    operands = dot_operand_types(jax.jit(grad).lower(x, w).compile().as_text())
    assert len(operands) == 2 and {t for pair in operands for t in pair} == {"bf16"}, operands  # x's and w's
    ref = jax.grad(loss(lambda x, w: x.astype(jnp.float32) @ w.astype(jnp.float32)), (0, 1))(x, w)
    for got, want in zip(grad(x, w), ref):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.05)


def test_frozen_operand_gets_no_gradient_product():
    x, w = _operands((2, 5, 4), (4, 3), jnp.bfloat16)
    loss = _loss(matmul)
    assert len(_dots(jax.grad(loss, 0), x, w)) == 2  # the product and x's gradient: none for w
    assert len(_dots(jax.grad(loss, 1), x, w)) == 2
    assert len(_dots(jax.grad(_loss(lambda a, b: einsum("bti,io->bto", a, b)), 0), x, w)) == 2
