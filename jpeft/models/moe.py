"""The mixture-of-experts MLP (Mixtral, Qwen2/3-MoE, OLMoE): a router scores every expert for each token, and
the token's output is the weighted sum of its top-k experts' gated MLPs.

The weights are transformers' own parameters, in its layout: the router `gate/weight` [E, D], and the experts
stacked as `experts/gate_up_proj` [E, 2I, D] (gate, then up) and `experts/down_proj` [E, D, I]. They are no
dense insertion points, as PEFT's `target_modules` cannot reach them either. A token's k assignments are
sorted by expert, each expert multiplies its contiguous run of rows (`lax.ragged_dot_general`: a grouped
matmul where the backend has one), and the weighted rows are summed back into their tokens.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft.models import layers as L
from jpeft.models.config import ModelConfig
from jpeft.products import matmul

# x [rows, in] against each group's w [out, in] (transformers' Linear layout), rows grouped by expert
_GROUPED = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def route(cfg: ModelConfig, logits):
    """(weights, experts) [N, k] of each token's top-k experts, as transformers' routers pick and weigh them: a
    float32 softmax over the router's logits, renormalised over the k where `norm_topk_prob`, rounded to the
    compute dtype unless `float32_expert_weights` (Mixtral's)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return (weights if cfg.float32_expert_weights else weights.astype(logits.dtype)), experts


def mix(cfg: ModelConfig, x, weights, experts, gate_up, down):
    """Σ_k weights[:, k] · expert_k(x) for x [N, D]: each assignment's row, sorted by expert, through its
    expert's act(gate) · up and down projections."""
    order = jnp.argsort(experts.reshape(-1), stable=True)
    tokens = order // cfg.experts_per_token
    sizes = jnp.bincount(experts.reshape(-1), length=cfg.num_experts)
    grouped = lambda rows, w: jax.lax.ragged_dot_general(rows, w.astype(rows.dtype), sizes, _GROUPED)
    h = L.activate(cfg.hidden_act, *jnp.split(grouped(x[tokens], gate_up), 2, axis=-1))
    y = grouped(h, down) * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[tokens].add(y.astype(x.dtype))


class Router(nn.Module):
    """transformers' TopKRouter: (weights, experts) [N, k] for the tokens x [N, D]."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        w = self.param("weight", nn.with_logical_partitioning(L.init_normal, ("experts", "embed")),
                       (cfg.num_experts, cfg.hidden_size), jnp.float32)
        return route(cfg, matmul(x, w.T))


class Experts(nn.Module):
    """transformers' stacked experts, weighed as the router chose: x [N, D] -> [N, D]."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, weights, experts):
        cfg = self.cfg
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        param = lambda name, shape, axes: self.param(name, nn.with_logical_partitioning(L.init_normal, axes), shape,
                                                     jnp.float32)
        return mix(cfg, x, weights, experts, param("gate_up_proj", (e, 2 * i, d), ("experts", "mlp", "embed")),
                   param("down_proj", (e, d, i), ("experts", "embed", "mlp")))
