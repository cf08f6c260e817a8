"""Next-token cross-entropy that never materialises the [tokens, vocab] logits at once.

The LM head runs chunk by chunk under `lax.scan` with rematerialisation, so the
backward pass recomputes each chunk's logits instead of keeping them all.
"""
import jax
import jax.numpy as jnp

from jpeft.models.layers import matmul


def chunked_cross_entropy(hidden, head, labels, weights, chunk: int = 512):
    """(sum of weighted token losses, sum of weights) for hidden [B,T,D], head [D,V]."""
    d = hidden.shape[-1]
    x, y, w = hidden.reshape(-1, d), labels.reshape(-1), weights.reshape(-1).astype(jnp.float32)
    n = x.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    x, y, w = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, y, w))

    @jax.checkpoint
    def chunk_loss(total, xs):
        h, t, wt = xs
        logits = matmul(h, head).astype(jnp.float32)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return total + jnp.sum(nll * wt), None

    chunks = (x.reshape(-1, chunk, d), y.reshape(-1, chunk), w.reshape(-1, chunk))
    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32), chunks)
    return total, jnp.sum(w)
