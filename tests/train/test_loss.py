"""The chunked cross-entropy (custom VJP) against plain optax cross-entropy: value and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jpeft.train.loss import chunked_cross_entropy


def naive(hidden, head, labels, weights):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ head
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels.reshape(-1))
    w = weights.reshape(-1)
    return jnp.sum(nll * w), jnp.sum(w)


@pytest.mark.parametrize("chunk", [512, 7])  # one chunk; several chunks with padding (2*13 = 26 tokens)
def test_matches_naive_value_and_gradients(chunk):
    kh, kw, ky, km = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(kh, (2, 13, 16))
    head = jax.random.normal(kw, (16, 50)) * 0.5
    labels = jax.random.randint(ky, (2, 13), 0, 50)
    weights = (jax.random.uniform(km, (2, 13)) > 0.3).astype(jnp.float32)

    def loss(fn):
        return lambda h, w, m: fn(h, w, labels, m)[0]

    ours = loss(lambda h, w, *a: chunked_cross_entropy(h, {"kernel": w}, *a, chunk=chunk))
    ref = loss(naive)
    np.testing.assert_allclose(ours(hidden, head, weights), ref(hidden, head, weights), rtol=1e-5)
    np.testing.assert_allclose(chunked_cross_entropy(hidden, {"kernel": head}, labels, weights, chunk)[1],
                               weights.sum())
    for got, want in zip(jax.grad(ours, argnums=(0, 1, 2))(hidden, head, weights),
                         jax.grad(ref, argnums=(0, 1, 2))(hidden, head, weights)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Head frozen (LoRA): only d/dhidden is asked for, and it still matches.
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(hidden, head, weights),
                               jax.grad(ref)(hidden, head, weights), rtol=1e-5, atol=1e-5)
    # Under jit and scaled by an outer factor, as the train step uses it.
    scaled = lambda fn: jax.jit(jax.grad(lambda h, w: 3.0 * fn(h, w, weights), argnums=(0, 1)))
    for got, want in zip(scaled(ours)(hidden, head), scaled(ref)(hidden, head)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_hidden_stays_close():
    kh, kw, ky = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(kh, (2, 8, 16))
    head = jax.random.normal(kw, (16, 40)) * 0.5
    labels = jax.random.randint(ky, (2, 8), 0, 40)
    weights = jnp.ones((2, 8))
    f = lambda h, w: chunked_cross_entropy(h, {"kernel": w}, labels, weights, chunk=4)[0]
    g16 = jax.grad(f, argnums=(0, 1))(hidden.astype(jnp.bfloat16), head)
    g32 = jax.grad(f, argnums=(0, 1))(hidden, head)
    assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.float32
    for a, b in zip(g16, g32):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.05)


def test_lora_on_the_head_stays_factored_and_matches_the_merged_head():
    """A LoRA head is applied as x·W + s·(x·A)·B inside the chunks; its gradients equal the merged head's."""
    kh, kw, ka, kb, ky = jax.random.split(jax.random.key(2), 5)
    hidden = jax.random.normal(kh, (2, 9, 16))
    head = jax.random.normal(kw, (16, 30)) * 0.5
    a, b = jax.random.normal(ka, (16, 3)) * 0.3, jax.random.normal(kb, (3, 30)) * 0.3
    labels = jax.random.randint(ky, (2, 9), 0, 30)
    weights = jnp.ones((2, 9))
    ours = lambda h, a, b: chunked_cross_entropy(h, {"kernel": head, "lora_a": a, "lora_b": b,
                                                     "lora_scale": jnp.asarray(2.0)}, labels, weights, chunk=5)[0]
    ref = lambda h, a, b: naive(h, head + 2.0 * a @ b, labels, weights)[0]
    np.testing.assert_allclose(ours(hidden, a, b), ref(hidden, a, b), rtol=1e-5)
    for got, want in zip(jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(hidden, a, b),
                         jax.grad(ref, argnums=(0, 1, 2))(hidden, a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(jax.grad(ours, argnums=(1, 2)))(hidden, a, b))
    assert "16,30] = add" not in jaxpr.replace("f32[", "")  # W + s·A·B is never built


def test_lora_dropout_on_the_head_drops_each_chunks_input_with_its_own_key():
    """With a dropout key, a LoRA head drops its input as on any dense layer (PEFT's lora_dropout on lm_head), chunk i
    with fold_in(key, i): value and gradients equal a loop over the chunks through the dense insertion point."""
    from jpeft.train.loss import dense_logits
    kh, kw, ka, kb, ky = jax.random.split(jax.random.key(3), 5)
    hidden = jax.random.normal(kh, (2, 9, 16))
    head = jax.random.normal(kw, (16, 30)) * 0.5
    a, b = jax.random.normal(ka, (16, 3)) * 0.3, jax.random.normal(kb, (3, 30)) * 0.3
    labels = jax.random.randint(ky, (2, 9), 0, 30)
    weights = jnp.ones((2, 9)).at[1, 4].set(0.0)
    leaves = lambda a, b: {"kernel": head, "lora_a": a, "lora_b": b, "lora_scale": jnp.asarray(2.0),
                           "lora_dropout": jnp.asarray(0.5)}
    key = jax.random.key(7)
    ours = lambda h, a, b, key: chunked_cross_entropy(h, leaves(a, b), labels, weights, chunk=5, rng=key)[0]

    def ref(h, a, b):  # chunk=5 over 2 rows: spans of 2 steps, 9 padded to 10
        x, y, w = (jnp.pad(v, [(0, 0), (0, 1)] + [(0, 0)] * (v.ndim - 2)) for v in (h, labels, weights))
        total = 0.0
        for i in range(5):
            logits = dense_logits(leaves(a, b), x[:, 2 * i:2 * i + 2].reshape(4, 16), jax.random.fold_in(key, i))
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, y[:, 2 * i:2 * i + 2].reshape(4))
            total += jnp.sum(nll * w[:, 2 * i:2 * i + 2].reshape(4))
        return total

    assert abs(float(ours(hidden, a, b, key) - ours(hidden, a, b, None))) > 1e-2  # the dropout acts
    np.testing.assert_allclose(ours(hidden, a, b, key), ref(hidden, a, b), rtol=1e-5)
    for got, want in zip(jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(hidden, a, b, key),
                         jax.grad(ref, argnums=(0, 1, 2))(hidden, a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_soft_capped_head_matches_naive_value_and_gradients():
    """Gemma 2's cap · tanh(logits / cap) inside the chunks, forward and in the pulled-back gradient."""
    from jpeft.models.layers import softcap
    kh, kw, ky = jax.random.split(jax.random.key(2), 3)
    hidden = jax.random.normal(kh, (2, 9, 16))
    head = jax.random.normal(kw, (16, 30))
    labels = jax.random.randint(ky, (2, 9), 0, 30)
    weights = jnp.ones((2, 9))
    capped = lambda leaves, h, rng=None: softcap((h @ leaves["kernel"]).astype(jnp.float32), 2.0)
    ours = lambda h, w: chunked_cross_entropy(h, {"kernel": w}, labels, weights, 4, logits=capped)[0]
    ref = lambda h, w: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        softcap(h.reshape(-1, 16) @ w, 2.0), labels.reshape(-1)))
    uncapped = lambda h, w: naive(h, w, labels, weights)[0]
    np.testing.assert_allclose(ours(hidden, head), ref(hidden, head), rtol=1e-5)
    assert abs(float(ref(hidden, head) - uncapped(hidden, head))) > 1.0  # the cap matters at these logits
    for got, want in zip(jax.grad(ours, argnums=(0, 1))(hidden, head), jax.grad(ref, argnums=(0, 1))(hidden, head)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
