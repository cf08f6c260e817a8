"""Shared layers and the insertion points where adapter leaves act: the layer scan, dropout, dense,
norms, embedding, LM head, activations (attention is `attention`, the KV cache `kv_cache`).

Every model family builds from these. An insertion point reads whatever adapter
leaves the parameter tree holds beside its weight and applies them; the math of
each method lives in `jpeft.peft`.
"""
from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jpeft.models.config import ModelConfig
from jpeft.models.kv_cache import empty_cache
from jpeft.peft import sites

init_normal = nn.initializers.normal(0.02)


# The residual stream [B, T, D] is split over the batch only, whatever its weights' layout; under a
# mesh and `jpeft.parallel.RULES` this keeps GSPMD from resharding activations like the weights
# (outside them it is a no-op).
ACTIVATION_AXES = ("batch", None, None)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(block, cfg: ModelConfig, length: int):
    """`block` under nn.scan: its params stacked on a leading `layers` axis, compiled once whatever the
    depth, carry in and out, context broadcast; rematerialised as `cfg.remat` says. With `cfg.unrolled`
    the same stack runs layer by layer over per-layer params (`Unrolled`)."""
    if cfg.unrolled:
        return lambda *args, name: Unrolled(block, args, length, name=name)
    if cfg.remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,), length=length, metadata_params={nn.PARTITION_NAME: "layers"})


class Unrolled(nn.Module):
    """A scanned stack's layers in turn, each over its own params (`{stack}/{i}/...`, `tree.unstack`) and,
    where the carry's cache holds them (`unstack_cache`), its own keys/values arrays.

    What decoding runs on CPU: inside a loop XLA:CPU copies a layer's slice out of a stacked weight (or
    cache) before every matmul, every step; per-layer arrays are read in place (decoding 1.2-2.7x faster
    at hidden 512-1024, docs/design.md §8).
    The carry is (x, cache, layer counter), as every family's stack has it.
    """
    block: type
    args: tuple
    length: int

    @nn.compact
    def __call__(self, carry, context):
        x, cache, layer = carry
        for i in range(self.length):
            own = jax.tree.map(lambda rows: rows[i] if isinstance(rows, list) else rows, cache, is_leaf=_per_layer)
            (x, own, layer), _ = self.block(*self.args, name=str(i))((x, own, layer), context)
            cache = jax.tree.map(lambda rows, new: [*rows[:i], new, *rows[i + 1:]] if isinstance(rows, list) else new,
                                 cache, own, is_leaf=_per_layer)
        return (x, cache, layer), None


def _per_layer(node) -> bool:
    return isinstance(node, list)


def per_device_rows(f, rows: tuple, shared: tuple):
    """f(*rows, *shared) with each device computing on its own rows: the `rows` arrays split on their leading
    (batch) axis over the mesh axes `batch` maps to, each `shared` tree whole on every device (an fsdp-split
    weight gathered, as a layer gathers it), the result split as `rows`. Outside a mesh, or where its batch
    axes do not divide the rows, f itself."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in jax.tree.leaves(tuple(nn.logical_to_mesh_axes(("batch",))))
                                       if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or rows[0].shape[0] % math.prod(mesh.shape[a] for a in axes):
        return f(*rows, *shared)
    split = P(axes)
    return jax.shard_map(f, mesh=mesh, in_specs=(*[split] * len(rows), *[P()] * len(shared)), out_specs=split,
                         axis_names=set(axes))(*rows, *shared)


def module_leaves(module: nn.Module) -> dict:
    """Every leaf the module holds in `params`, adapter leaves included (what the insertion points read)."""
    return nn.meta.unbox(dict(module.variables.get("params", {})))


def dropout_rng(module: nn.Module, rate: float = 1.0):
    """The module's dropout key in a call that has one (a train step) where something drops (rate > 0), else None."""
    return module.make_rng("dropout") if rate > 0 and module.has_rng("dropout") else None


def dropout(module: nn.Module, x, rate: float):
    """Inverted dropout of `x` at `rate` where the call has a dropout key (a train step), as torch's in
    training: each value kept with probability 1 - rate and scaled by 1 / (1 - rate) in float32 before
    rounding (in bf16 the scale itself would round, 1 / 0.9 to 1.109); `x` itself otherwise."""
    rng = dropout_rng(module, rate)
    return x if rng is None else dropped(x, jax.random.bernoulli(rng, 1 - rate, x.shape), rate)


def dropped(x, keep, rate: float):
    """x where `keep`, scaled by 1 / (1 - rate) in float32, and 0 elsewhere, in x's dtype."""
    return jnp.where(keep, x.astype(jnp.float32) / (1 - rate), 0).astype(x.dtype)


class Dense(nn.Module):
    """The dense insertion point: y = x·W + b, with every adapter whose leaves are present applied."""
    features: int
    axes: tuple[str, str]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        if self.is_initializing():
            self.param("kernel", nn.with_logical_partitioning(init_normal, self.axes),
                       (x.shape[-1], self.features), jnp.float32)
            if self.use_bias:
                self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                           (self.features,), jnp.float32)
        return sites.dense(module_leaves(self), x, dropout_rng(self))


class RMSNorm(nn.Module):
    """Llama's RMSNorm (w · x, cast first), OLMo2's (`float32_scale`: w · x in float32, then cast), or Gemma's
    (`plus_one`: (1 + w) · x in float32, w born zero)."""
    eps: float
    plus_one: bool = False
    axes: tuple[str] = ("embed",)
    float32_scale: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, self.axes), (x.shape[-1],), jnp.float32)
        return sites.norm(module_leaves(self), _rms_normed(x, scale, self.eps, self.plus_one, self.float32_scale))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis: mean and variance in float32, then w · x + b (GPT-2's), w · x (Cohere's: no
    `use_bias`) or neither (OLMo 1's: no `use_scale`, no `use_bias`). Its leaves span the trailing axes `axes` names
    (Cohere's queries: a scale per head and dimension)."""
    eps: float
    use_scale: bool = True
    use_bias: bool = True
    axes: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, x):
        def param(name, init):
            shape = x.shape[x.ndim - len(self.axes):]
            return self.param(name, nn.with_logical_partitioning(init, self.axes), shape, jnp.float32)
        scale = param("scale", nn.initializers.ones) if self.use_scale else None
        bias = param("bias", nn.initializers.zeros) if self.use_bias else None
        return sites.norm(module_leaves(self), _layer_normed(x, scale, bias, self.eps))


def recomputed(*static_argnums: int):
    """A function that autodiff keeps only the inputs of, recomputing it in the backward pass. For the
    float32 math the layers do on bf16 inputs (activation, norms): its float32 intermediates would
    otherwise be saved, and stacked for every layer by the layer scan (the bench's bf16 LoRA step: the
    scan's temporaries 869 -> 485 MB, ~10% faster; docs/design.md §8)."""
    return partial(jax.checkpoint, static_argnums=static_argnums, prevent_cse=False)


@recomputed(2, 3, 4)
def _rms_normed(x, scale, eps: float, plus_one: bool, float32_scale: bool):
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    if plus_one or float32_scale:
        return (h * (plus_one + scale.astype(jnp.float32))).astype(x.dtype)
    # Llama's w · x, x cast first: the product in float32, rounded once, as torch promotes a float32 w (a bf16 w's
    # product is exact there too), so the scale's gradient sums its tokens in float32
    return (scale.astype(jnp.float32) * h.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


@recomputed(3)
def _layer_normed(x, scale, bias, eps: float):
    h = x.astype(jnp.float32)
    h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + eps)
    h = h if scale is None else h * scale
    return (h if bias is None else h + bias).astype(x.dtype)


class Embed(nn.Module):
    """The input-embedding insertion point."""
    vocab_size: int
    features: int

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(init_normal, ("vocab", "embed")),
                                    (self.vocab_size, self.features), jnp.float32)

    def __call__(self, ids, dtype, prepend: bool = True, scale: float | None = None):
        self.embedding  # noqa: B018 - creates the table at init
        leaves = module_leaves(self)
        # gathered over fsdp for the lookup, as a layer gathers its weights: each device then reads its own
        # tokens' rows, where a table split by width left XLA to gather every device's rows to each
        leaves["embedding"] = nn.with_logical_constraint(leaves["embedding"], ("vocab", None))
        return sites.embed(leaves, ids, dtype, prepend, scale)


class LMHead:
    """The top every family shares, and the model protocol beside `apply` (`jpeft.models`) that training and
    decoding use knowing no family: `head_leaves`, `logits`, `init_cache`. A family sets `config` and
    `embedding_path`, and its compact `__call__` ends in `self.outputs(...)`."""

    def outputs(self, hidden, return_hidden: bool):
        """The hidden states, or their logits; at init, the head's own kernel (and Phi's and GPT-J's bias) where the
        head is not tied."""
        if not self.config.tie_word_embeddings and self.is_initializing():
            Dense(self.config.vocab_size, ("embed", "vocab"), self.config.head_bias, name="lm_head")(hidden)
        if return_hidden:
            return hidden
        return self.logits(self.head_leaves(module_leaves(self)), hidden, dropout_rng(self))

    @nn.nowrap
    def head_leaves(self, params) -> dict:
        """The LM head's leaves for the dense insertion point: the token embedding at `embedding_path`,
        transposed, where the head is tied to it; else the model's own `lm_head` (with any adapter leaves)."""
        if not self.config.tie_word_embeddings:
            return dict(params["lm_head"])
        leaves = params
        for key in self.embedding_path.split("/")[:-1]:
            leaves = leaves[key]
        return {"kernel": sites.embed_table(leaves).T}

    @nn.nowrap
    def logits(self, head: dict, hidden, rng=None):
        """float32 logits of hidden states [..., D] through the head's leaves, divided by Granite's
        `logits_scaling`, times Cohere's `logit_scale`, soft-capped where the family does (Gemma 2); `rng` drops an
        adapter's input as on any dense layer (LoRA dropout on `lm_head`)."""
        logits = sites.dense(head, hidden, rng).astype(jnp.float32)
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        return softcap(logits, self.config.final_softcap)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """An empty KV cache (`kv_cache.empty_cache`)."""
        return empty_cache(self.config, batch, max_len, dtype)


def scaled(x, multiplier: float):
    """x times a config's multiplier (Granite's), computed in float32 and rounded once, as torch multiplies a
    tensor by a Python float; x itself where the multiplier is 1."""
    return x if multiplier == 1.0 else (x.astype(jnp.float32) * multiplier).astype(x.dtype)


def softcap(x, cap: float | None):
    """Gemma's tanh soft-capping: cap · tanh(x / cap), or x when there is no cap."""
    return x if cap is None else cap * jnp.tanh(x / cap)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # Arcee's
}


@recomputed(0)
def activate(name: str, x, up=None):
    """The MLP's act(x), or its gated act(x) · up, computed in float32 and rounded once to x's dtype (torch
    computes each in float32 and rounds twice). XLA:CPU runs bf16 exp and divide slowly: silu(x) · up on
    bf16 [2048, 1408] takes ~8 ms in bf16 and ~1.6 ms through float32."""
    h = ACTIVATIONS[name](x.astype(jnp.float32))
    return (h if up is None else h * up.astype(jnp.float32)).astype(x.dtype)
