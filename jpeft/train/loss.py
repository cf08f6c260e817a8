"""Next-token cross-entropy that never materialises the [tokens, vocab] logits at once.

The LM head runs chunk by chunk under `lax.scan`, and each chunk's gradient (softmax
minus one-hot) is folded into d(hidden) and d(head) right there in the forward pass, so
the backward pass only scales stored results: no logits are kept or recomputed. On CPU
this is faster than autodiff through a rematerialised scan (DESIGN.md §6). d(head) is
only computed when the head is being differentiated (full fine-tuning).
"""
from functools import partial

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden, head, labels, weights, chunk: int = 512):
    """(sum of weighted token losses, sum of weights) for hidden [B,T,D], head [D,V]."""
    d = hidden.shape[-1]
    x, y, w = hidden.reshape(-1, d), labels.reshape(-1), weights.reshape(-1).astype(jnp.float32)
    n = x.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    x, y, w = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, y, w))
    total = _weighted_nll(chunk, x, head, y, w)
    return total, jnp.sum(w)


def _matmul(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _scan(chunk, x, head, y, w, grads: bool, head_grad: bool):
    """sum(w * nll), per-token nll, and (when asked for) d/dx and d/dhead of the sum."""
    d = x.shape[-1]
    head_c = head.astype(x.dtype)

    def body(dhead, xs):
        h, t, wt = xs
        logits = _matmul(h, head_c).astype(x.dtype).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        if not grads:
            return dhead, (nll, None)
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t[:, None]
        dlogits = ((jnp.exp(logits - lse[:, None]) - onehot) * wt[:, None]).astype(x.dtype)
        if head_grad:
            dhead = dhead + _matmul(h.T, dlogits)
        return dhead, (nll, _matmul(dlogits, head_c.T).astype(x.dtype))

    chunks = (x.reshape(-1, chunk, d), y.reshape(-1, chunk), w.reshape(-1, chunk))
    dhead0 = jnp.zeros(head.shape if head_grad else (), jnp.float32)
    dhead, (nll, dx) = jax.lax.scan(body, dhead0, chunks)
    nll = nll.reshape(-1)
    return jnp.sum(nll * w), nll, None if dx is None else dx.reshape(x.shape), dhead


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_nll(chunk, x, head, y, w):
    return _scan(chunk, x, head, y, w, grads=False, head_grad=False)[0]


def _fwd(chunk, x, head, y, w):
    total, nll, dx, dhead = _scan(chunk, x.value, head.value, y.value, w.value, grads=True,
                                  head_grad=head.perturbed)
    return total, (nll, dx, dhead.astype(head.value.dtype) if head.perturbed else None)


def _bwd(chunk, res, g):
    nll, dx, dhead = res
    scale = lambda a: None if a is None else (g * a).astype(a.dtype)
    return scale(dx), scale(dhead), None, g * nll


_weighted_nll.defvjp(_fwd, _bwd, symbolic_zeros=True)
