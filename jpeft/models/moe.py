"""The mixture-of-experts MLP (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, GraniteMoE): a router scores every expert for
each token, and the token's output is the weighted sum of its top-k experts' gated MLPs.

The weights are transformers' own parameters: the router `gate/weight` [E, D] (GPT-OSS's and GraniteMoE's `router`,
GPT-OSS's with a bias), and the experts stacked as `experts/gate_up_proj/weight` [E, 2I, D] (gate, then up;
GPT-OSS's interleaved, its file's [E, D, 2I] transposed on reading) and `experts/down_proj/weight` [E, D, I] (GPT-OSS:
biases beside them). None is a dense insertion point, as none is a module PEFT's `target_modules` reaches; the
experts are the `sites.experts` insertion point, where PEFT's `target_parameters` LoRA acts. A token's k assignments
are sorted by expert, each expert multiplies its contiguous run of rows (`products.grouped`), and the weighted rows
are summed back into their tokens. In training the routers' logits can also give the load-balancing loss
(`balance_loss`), which transformers adds where a config asks for it.
"""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import tree as T
from jpeft.models import layers as L
from jpeft.models.config import ModelConfig
from jpeft.peft import sites
from jpeft.peft.base import EXPERT_WEIGHTS
from jpeft.products import matmul

ROUTER_LOGITS = "router_logits"


def route(cfg: ModelConfig, logits):
    """(weights, experts) [N, k] of each token's top-k experts, as transformers' routers pick and weigh them: a
    float32 softmax over the router's logits, renormalised over the k where `norm_topk_prob`, rounded to the
    compute dtype unless `float32_expert_weights` (Mixtral's)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return (weights if cfg.float32_expert_weights else weights.astype(logits.dtype)), experts


def mix(cfg: ModelConfig, x, weights, experts, gate_up, down, biases=None):
    """Σ_k weights[:, k] · expert_k(x) for x [N, D]: each assignment's row, sorted by expert, through its
    expert's act(gate) · up and down projections (`gate_up`, `down`: functions of (rows, group sizes); `biases`:
    GPT-OSS's per-expert (gate_up [E, 2I], down [E, D]) added to them)."""
    chosen = experts.reshape(-1)
    order = jnp.argsort(chosen, stable=True)
    tokens = order // cfg.experts_per_token
    sizes = jnp.bincount(chosen, length=cfg.num_experts)
    biased = lambda y, which: y if biases is None else y + biases[which][chosen[order]].astype(y.dtype)  # noqa: E731
    h = activate(cfg, biased(gate_up(x[tokens], sizes), 0))
    y = biased(down(h, sizes), 1) * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[tokens].add(y.astype(x.dtype))


def activate(cfg: ModelConfig, gate_up):
    """An expert's hidden units from its gate/up rows: act(gate) · up of the halves, or GPT-OSS's clamped
    (up + 1) · gate · sigmoid(alpha · gate) of the interleaved columns (in float32, rounded once, as `L.activate`)."""
    if cfg.swiglu_limit is None:
        return L.activate(cfg.hidden_act, *jnp.split(gate_up, 2, axis=-1))
    limit, h = cfg.swiglu_limit, gate_up.astype(jnp.float32)
    gate, up = jnp.minimum(h[..., ::2], limit), jnp.clip(h[..., 1::2], -limit, limit)
    return ((up + 1) * (gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha))).astype(gate_up.dtype)


def balance_loss(cfg: ModelConfig, router_logits, real):
    """transformers' `load_balancing_loss_func` (Switch Transformer's eqs. 4-6): E · Σ_e f_e · P_e over every
    layer's real tokens together (`router_logits` [L, N, E], `real` [N] true where a token is no padding), f_e
    the tokens' top-k choices of expert e and P_e its summed router probability, each per real token and
    layer. Only P_e carries gradient."""
    probs = jax.nn.softmax(router_logits, axis=-1)  # in the logits' dtype, as there
    chosen = jax.lax.top_k(probs, cfg.experts_per_token)[1]
    weight = jnp.broadcast_to(real.astype(jnp.float32)[None, :, None], chosen.shape)
    choices = jnp.zeros(cfg.num_experts, jnp.float32).at[chosen.reshape(-1)].add(weight.reshape(-1))
    prob_sums = jnp.einsum("lne,n->e", probs.astype(jnp.float32), real.astype(jnp.float32))
    rows = router_logits.shape[0] * jnp.maximum(real.sum(), 1)
    return cfg.num_experts * jnp.sum(choices / rows * (prob_sums / rows))


def router_logits(intermediates) -> jax.Array:
    """The routers' logits [L, N, E] a call sowed (`Router`, applied with "intermediates" mutable), layer by
    layer whether the layers ran scanned (one [L, N, E] array) or unrolled (one [N, E] each)."""
    sown = [v for path, v in T.flatten(intermediates).items() if path.split("/")[-1] == ROUTER_LOGITS]
    return jnp.concatenate([a.reshape(-1, *a.shape[-2:]) for group in sown for a in group])


class Router(nn.Module):
    """transformers' TopKRouter: (weights, experts) [..., k] for the tokens x [..., D]. Its logits are sown into
    "intermediates" where the call collects them (`router_logits`): a train step's load-balancing loss."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        w = self.param("weight", nn.with_logical_partitioning(L.init_normal, ("experts", "embed")),
                       (cfg.num_experts, cfg.hidden_size), jnp.float32)
        logits = matmul(x, w.T)
        if cfg.router_bias:
            logits = logits + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("experts",)),
                                         (cfg.num_experts,), jnp.float32).astype(logits.dtype)
        self.sow("intermediates", ROUTER_LOGITS, logits.reshape(-1, cfg.num_experts))
        return route(cfg, logits)


class Experts(nn.Module):
    """transformers' stacked experts, weighed as the router chose: x [B, T, D] -> [B, T, D]. Each device
    sorts and multiplies its own rows (`layers.per_device_rows`): sorting all of a split batch's tokens
    together, XLA would gather every device's tokens to each and repeat the experts' work on all of them."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, weights, experts):
        cfg = self.cfg
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        gate_up = ExpertWeight((e, 2 * i, d), ("experts", "mlp", "embed"), name=EXPERT_WEIGHTS[0])()
        down = ExpertWeight((e, d, i), ("experts", "embed", "mlp"), name=EXPERT_WEIGHTS[1])()
        biases = tuple(self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                                  (e, width), jnp.float32)
                       for name, width, axes in ((EXPERT_WEIGHTS[0], 2 * i, ("experts", "mlp")),
                                                 (EXPERT_WEIGHTS[1], d, ("experts", "embed")))) if cfg.expert_bias else None

        def rows(x, weights, experts, gate_up, down, biases):
            tokens = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
            return mix(cfg, tokens(x), tokens(weights), tokens(experts), partial(sites.experts, gate_up),
                       partial(sites.experts, down), biases).reshape(x.shape)

        return L.per_device_rows(rows, (x, weights, experts), (gate_up, down, biases))


class ExpertWeight(nn.Module):
    """One stacked expert weight [E, out, in] (logical `axes`): the `sites.experts` insertion point, whose
    leaves (the weight, and any method's beside it) the call returns."""
    shape: tuple[int, int, int]
    axes: tuple[str, str, str]

    @nn.compact
    def __call__(self):
        if self.is_initializing():
            self.param("weight", nn.with_logical_partitioning(L.init_normal, self.axes), self.shape, jnp.float32)
        return L.module_leaves(self)
