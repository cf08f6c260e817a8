"""The jit-compiled train step: gradients w.r.t. the trainable partition only.

`state = {"step", "trainable", "opt_state"}` is donated and updated in place; the frozen
partition is an input that is read, never differentiated, never copied into state.
Gradient accumulation scans over micro-batches inside the one compiled step. A step whose
loss or gradient is not finite leaves the weights and optimizer state as they were and says
so (`finite`), so the caller can stop or skip without a corrupted state (a `lax.cond`, so the
update of the donated state stays in place). The loss is the one the batch asks for
(`batch_loss`): next tokens, or one class per row for a classifier.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jpeft import tree as T
from jpeft.hardware import step_compiler_options
from jpeft.models import moe
from jpeft.parallel.mesh import activation_sharding, data_ways
from jpeft.peft.classifier import class_nll, classify
from jpeft.train.loss import CHUNK, chunked_cross_entropy


def token_loss(model, params, batch, dropout_rng=None, chunk: int = CHUNK, router_loss: bool = False):
    """(summed next-token NLL over loss_mask, number of loss tokens).

    A packed batch brings `positions`; one with `loss_index` [B, K] gets the LM head (and its
    backward) only at those K positions of each row, which hold all of its loss. With `router_loss`
    a mixture of experts whose config weighs it (`router_aux_loss_coef`) adds its routers' load-balancing
    loss to the mean, as transformers adds it in training: coefficient · loss · tokens to the sum; the
    result then has a third value, that loss unweighted (transformers' `aux_loss`; 0 where none is added).
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    coef = model.config.router_aux_loss_coef if router_loss else 0.0
    if "decoder_input_ids" in batch:  # an encoder-decoder: the loss is on its decoder's tokens
        hidden = model.apply({"params": params}, batch["input_ids"], batch["decoder_input_ids"],
                             batch["attention_mask"], return_hidden=True, rngs=rngs)
    else:
        hidden = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch.get("positions"),
                             return_hidden=True, rngs=rngs, mutable=["intermediates"] if coef else False)
    if coef:
        hidden, sown = hidden
    labels, weights = batch["labels"], batch["loss_mask"]
    if "loss_index" in batch:
        index = batch["loss_index"]
        hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
        labels, weights = (jnp.take_along_axis(a, index, axis=1) for a in (labels, weights))
    nll, count = chunked_cross_entropy(hidden, model.head_leaves(params), labels, weights, chunk, model.logits,
                                       dropout_rng)
    balance = jnp.zeros(())
    if coef:
        real = batch["attention_mask"].reshape(-1) > 0
        balance = moe.balance_loss(model.config, moe.router_logits(sown["intermediates"]), real)
        nll = nll + coef * count * balance
    return (nll, count, balance) if router_loss else (nll, count)


def class_loss(model, params, batch, dropout_rng=None):
    """(summed cross-entropy of each row's class `labels` [B], weighted by `loss_mask` [B]; the weight)."""
    logits = classify(model, params, batch["input_ids"], batch["attention_mask"], dropout_rng)
    nll = class_nll(logits, batch["labels"])
    weights = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def batch_loss(model, params, batch, dropout_rng=None, chunk: int = CHUNK, router_loss: bool = False):
    """(summed loss, count) of what the batch holds: a class per row (`labels` [B]) or next tokens ([B, T]),
    the latter with a mixture's load-balancing loss where `router_loss` (a train step's; then also that loss
    unweighted, as `token_loss`)."""
    if batch["labels"].ndim == 1:
        loss = class_loss(model, params, batch, dropout_rng)
        return (*loss, jnp.zeros(())) if router_loss else loss
    return token_loss(model, params, batch, dropout_rng, chunk, router_loss)


def init_state(trainable, optimizer) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}


def make_train_step(model, optimizer, seed: int, dropout: bool, state_shardings=None, tasks: int = 0):
    """step(state, frozen, batch) -> (state, metrics); batch leaves are [grad_accum, micro, T] (a
    classifier's `labels` and `loss_mask` [grad_accum, micro]).

    A mixture of `tasks` tasks numbers each row's task (`task` [grad_accum, micro]); the metrics then
    hold each task's summed loss and loss tokens (`task_loss`, `task_tokens` [tasks]). Each token's
    loss is the loss's gradient with respect to its weight in `loss_mask`, which the backward pass
    computes anyway, so this costs no second pass.

    With `state_shardings` the new state keeps exactly the layout of the old one (pjit style);
    the frozen partition and the batch keep whatever sharding they were placed with, and each
    device's loss chunks hold about CHUNK of its own tokens.
    """
    base_key = jax.random.key(seed)
    chunk = CHUNK * data_ways(None if state_shardings is None else state_shardings["step"].mesh)

    def step(state, frozen, batch):
        key = jax.random.fold_in(base_key, state["step"])

        def micro(carry, xs):
            grads, loss, count, balance, by_task = carry
            index, mb = xs
            rng = jax.random.fold_in(key, index) if dropout else None
            weights = mb["loss_mask"]

            def loss_of(tr, w):
                l, n, b = batch_loss(model, T.combine(tr, frozen), {**mb, "loss_mask": w}, rng, chunk,
                                     router_loss=True)
                return l, (n, b)

            (l, (n, b)), g = jax.value_and_grad(loss_of, argnums=(0, 1) if tasks else 0, has_aux=True)(
                state["trainable"], weights)
            if tasks:
                g, token_loss = g
                by_task = by_task + jnp.stack([
                    jax.ops.segment_sum(a.reshape(len(a), -1).sum(axis=1), mb["task"], num_segments=tasks)
                    for a in (token_loss * weights, weights)])
            return (jax.tree.map(jnp.add, grads, g), loss + l, count + n, balance + b, by_task), None

        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
        accum = jax.tree.leaves(batch)[0].shape[0]
        (grads, loss, count, balance, by_task), _ = jax.lax.scan(
            micro, (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), jnp.zeros((2, tasks))),
            (jnp.arange(accum), batch))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(trainable, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state

        # a cond, not a select: the update stays in place on the donated buffers
        trainable, opt_state = jax.lax.cond(finite, update, lambda *old: old, state["trainable"], state["opt_state"])
        new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}
        metrics = {"loss": loss / denom, "grad_norm": grad_norm, "finite": finite, "loss_tokens": count,
                   "tokens": jnp.sum(batch["attention_mask"] > 0)}
        if tasks:
            metrics["task_loss"], metrics["task_tokens"] = by_task
        if model.config.router_aux_loss_coef:  # the routers' load-balancing loss (in `loss`, weighted), per micro-batch
            metrics["aux_loss"] = balance / accum
        return new_state, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings, compiler_options=step_compiler_options())


def make_eval_step(model, mesh=None):
    """params, batch -> (summed loss, count): NLL and tokens, or cross-entropy and rows for a classifier. Under
    `mesh` its activations are laid out as the train step's (a mixture routes each device's own rows)."""
    step = jax.jit(lambda params, batch: batch_loss(model, params, batch), compiler_options=step_compiler_options())
    if mesh is None:
        return step

    def on_mesh(params, batch):
        with activation_sharding(mesh):
            return step(params, batch)

    return on_mesh
