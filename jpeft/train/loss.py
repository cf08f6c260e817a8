"""Next-token cross-entropy that never materialises the [tokens, vocab] logits at once.

The LM head runs chunk by chunk under `lax.scan`, and each chunk's gradient (softmax
minus one-hot) is pulled back through the head right there in the forward pass, so the
backward pass only scales stored results: no logits are kept or recomputed. On CPU this
is faster than autodiff through a rematerialised scan (docs/design.md). The head is the
LM head's leaves applied by the model (`model.logits`: the dense insertion point, then any
soft-capping, whose backward the pullback includes), so an adapter on it (LoRA, IA3, a
quantized head) stays factored; gradients are computed only for the head leaves
being differentiated (the kernel under full fine-tuning, the factors under LoRA).
"""
from functools import partial

import jax
import jax.numpy as jnp

from jpeft.peft import sites


CHUNK = 512  # tokens of the batch per loss chunk: [CHUNK, vocab] float32 logits live at a time


def dense_logits(head: dict, hidden, rng=None):
    """The plain LM head: hidden states through the dense insertion point, as float32 logits."""
    return sites.dense(head, hidden, rng).astype(jnp.float32)


def chunked_cross_entropy(hidden, head: dict, labels, weights, chunk: int = CHUNK, logits=dense_logits, rng=None):
    """(sum of weighted token losses, sum of weights) for hidden [B,T,D] and the head's leaves;
    `logits(head, h, rng)` applies the head (a model's `model.logits`). With a dropout key `rng` the head's
    adapter drops its input (LoRA dropout on `lm_head`), chunk i with key `fold_in(rng, i)`.

    Chunks run along time, about `chunk` tokens of the batch at a time, and never across
    sequences, so a batch axis sharded over devices stays sharded.
    """
    b, t, _ = hidden.shape
    span = max(1, min(t, chunk // b))
    pad = [(0, 0), (0, -t % span)]
    x = jnp.pad(hidden, pad + [(0, 0)])
    y, w = jnp.pad(labels, pad), jnp.pad(weights.astype(jnp.float32), pad)
    return _weighted_nll(span, logits, x, head, y, w, rng), jnp.sum(w)


def _scan(span, apply_head, x, head, y, w, rng, differentiated: frozenset | None):
    """sum(w * nll), per-token nll, and (when `differentiated` is given) d/dx and d/d(those head leaves)."""
    b, t, d = x.shape
    trained = {k: v for k, v in head.items() if differentiated and k in differentiated}
    fixed = {k: v for k, v in head.items() if k not in trained}

    def body(dhead, xs):
        i, xs = xs
        h, target, wt = (a.reshape(b * span, *a.shape[2:]) for a in xs)  # 2-D matmuls: XLA's fastest
        key = None if rng is None else jax.random.fold_in(rng, i)
        logits_of = lambda h, leaves: apply_head({**fixed, **leaves}, h, key)
        if differentiated is None:
            logits = logits_of(h, trained)
        else:
            logits, pullback = jax.vjp(logits_of, h, trained)
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
        if differentiated is None:
            return dhead, (nll.reshape(b, span), None)
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == target[:, None]
        dlogits = ((jnp.exp(logits - lse[:, None]) - onehot) * wt[:, None]).astype(x.dtype).astype(jnp.float32)
        dh, dleaves = pullback(dlogits)
        dhead = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), dhead, dleaves)
        return dhead, (nll.reshape(b, span), dh.astype(x.dtype).reshape(b, span, d))

    def by_time(a):  # [B, T, ...] -> [T / span, B, span, ...]
        return a.reshape(b, t // span, span, *a.shape[2:]).swapaxes(0, 1)

    def back(a):
        return a.swapaxes(0, 1).reshape(b, t, *a.shape[3:])

    dhead0 = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), trained)
    dhead, (nll, dx) = jax.lax.scan(body, dhead0, (jnp.arange(t // span), (by_time(x), by_time(y), by_time(w))))
    nll = back(nll)
    return jnp.sum(nll * w), nll, None if dx is None else back(dx), dhead


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _weighted_nll(span, apply_head, x, head, y, w, rng):
    return _scan(span, apply_head, x, head, y, w, rng, None)[0]


def _fwd(span, apply_head, x, head, y, w, rng):
    values = {k: v.value for k, v in head.items()}
    perturbed = frozenset(k for k, v in head.items() if v.perturbed)
    key = None if rng is None else rng.value
    total, nll, dx, dhead = _scan(span, apply_head, x.value, values, y.value, w.value, key, perturbed)
    dhead = {k: dhead[k].astype(v.dtype) if k in dhead else None for k, v in values.items()}
    return total, (nll, dx, dhead)


def _bwd(span, apply_head, res, g):
    nll, dx, dhead = res
    scale = lambda a: None if a is None else (g * a).astype(a.dtype)
    return scale(dx), {k: scale(v) for k, v in dhead.items()}, None, g * nll, None


_weighted_nll.defvjp(_fwd, _bwd, symbolic_zeros=True)
