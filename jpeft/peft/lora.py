"""LoRA and its variants as one tree transform: `lora_a`/`lora_b` beside each targeted weight.

    y = x·W + s·(x·A)·B,   s = alpha/rank (alpha/sqrt(rank) with rsLoRA)
    DoRA:  y = m/‖W + s·A·B‖ ⊙ (x·W + s·(x·A)·B),  the norm per output unit and not differentiated
    embedding: e = table[ids] + s·A[ids]·B

Leaves per module: `lora_a` [..., in, r], `lora_b` [..., r, out], DoRA's `lora_magnitude`
[..., out] (trained); `lora_scale` [...] and optional `lora_dropout` (metadata). A stacked
module whose layers are only partly targeted (`layers=`, a regex naming layer indices)
holds factors for every layer and `lora_scale` 0 where it is not adapted: no delta, no
gradient, not counted, not saved. PiSSA and OLoRA move the top of W into A·B at init and
keep A₀, B₀ (`lora_init_a`/`lora_init_b`), so a saved adapter applies to the original base.
`trainable_token_indices` (PEFT's) also trains those ids' rows of the input embedding (`trainable_tokens.py`).
`target_parameters` (PEFT's) adapt a mixture's stacked expert weights, one pair per expert: `lora_a`
[..., E, in, r] and `lora_b` [..., E, r, out] beside `weight` [..., E, out, in], applied to each expert's rows.

Parameters per targeted layer: r·(in + out) (+ out for DoRA; times E for experts).
"""
from __future__ import annotations

import math
import operator
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import JpeftError
from jpeft.peft.base import (Method, dropped_input, expert_shape, hf_module, is_expert_weight, leading,
                             linear_uniform, module_layers, picked_layers, refuse_second_init, refuse_tied_head,
                             target_option, weight_name)
from jpeft.peft import trainable_tokens
from jpeft.peft.quant import is_quantized
from jpeft.peft.trainable_tokens import TrainableTokens
from jpeft.products import grouped, matmul

INITS = ("peft", "gaussian", "pissa", "olora")
# PEFT's `bias`: which of the base's own biases train beside the factors: none, every parameter PEFT names a bias
# ("bias" in its name: norms', heads', T5's relative-position table too), or those of the adapted modules
BIASES = ("none", "all", "lora_only")


def pattern_value(patterns: dict | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a dotted suffix of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class LoRA(Method):
    """Low-rank adapters on the dense (and embedding) weights whose HF module names match `targets`.

    `init`: "peft" (A kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r)), "pissa" or "olora"
    (A, B from the SVD / QR of W, which keeps the residual). `layers`: adapt only these layer
    indices (PEFT's layers_to_transform). `lr_ratio` ≠ 1 or an `lr_embedding` turns on LoRA+ as
    PEFT's `create_loraplus_optimizer` groups it: B (and any trainable vector) learns `lr_ratio` times faster
    than A, and both factors of a LoRA on an embedding learn at `lr_embedding` (its `loraplus_lr_embedding`,
    1e-6 unless given). `target_parameters`: a mixture's expert weights by PEFT's parameter names
    (`mlp.experts.gate_up_proj`, `down_proj`), matched as a dotted suffix of each layer's; as in PEFT, without
    dropout, DoRA or PiSSA/OLoRA there. `bias` (PEFT's): "all" also trains every base leaf PEFT calls a bias,
    "lora_only" the adapted modules' biases (`trained_biases`); the dir then carries them.
    """
    name = "lora"
    peft_type = "LORA"
    trainable = ("lora_a", "lora_b", "lora_magnitude")
    metadata = ("lora_scale", "lora_dropout", "lora_init_a", "lora_init_b", "adapter_ids")
    axes = {"lora_a": ("lead", "in", None), "lora_b": ("lead", None, "out"), "lora_magnitude": ("lead", "out"),
            "lora_scale": ("lead",), "lora_dropout": ("lead",),
            "lora_init_a": ("lead", "in", None), "lora_init_b": ("lead", None, "out")}

    def __init__(self, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | str = ("q_proj", "v_proj"),
                 dropout: float = 0.0, init: str = "peft", use_rslora: bool = False, use_dora: bool = False,
                 layers: Sequence[int] | None = None, rank_pattern: dict | None = None,
                 alpha_pattern: dict | None = None, lr_ratio: float = 1.0, lr_embedding: float | None = None,
                 trainable_token_indices: Sequence[int] | None = None,
                 target_parameters: Sequence[str] | None = None, bias: str = "none"):
        if rank < 1:
            raise JpeftError(f"LoRA rank must be >= 1, got {rank}")
        if init not in INITS:
            raise JpeftError(f"LoRA init must be one of {', '.join(INITS)}, got {init!r}")
        if not 0 <= dropout < 1:
            raise JpeftError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if bias not in BIASES:
            raise JpeftError(f"LoRA bias must be one of {', '.join(BIASES)} (PEFT's), got {bias!r}")
        if bias == "lora_only" and layers is not None:
            raise JpeftError("LoRA bias='lora_only' with layers: PEFT trains the biases of the adapted layers alone, "
                             "jpeft a module's bias across its layer stack; adapt every layer, or use bias='none'")
        if lr_ratio <= 0 or (lr_embedding is not None and lr_embedding <= 0):
            raise JpeftError(f"LoRA+ lr_ratio and lr_embedding must be > 0, got {lr_ratio} and {lr_embedding}")
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.targets = target_option(targets)
        self.init_scheme, self.use_rslora, self.use_dora = init, use_rslora, use_dora
        self.layers = None if layers is None else tuple(int(i) for i in layers)
        self.rank_pattern, self.alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
        self.lr_ratio, self.lr_embedding = float(lr_ratio), (
            None if lr_embedding is None else float(lr_embedding))
        self.trainable_token_indices = None if trainable_token_indices is None else TrainableTokens(
            trainable_token_indices).token_indices  # (checked as TrainableTokens checks them)
        self.target_parameters = tuple(target_parameters or ())
        self.bias = bias
        unfit = {"dropout": dropout > 0, "DoRA": use_dora, f"init {init!r}": init in ("pissa", "olora"),
                 "layers": layers is not None, f"bias {bias!r}": bias != "none"}
        if self.target_parameters and (unfit := [name for name, on in unfit.items() if on]):
            raise JpeftError(f"LoRA on target_parameters {list(self.target_parameters)} takes no {', '.join(unfit)} "
                             "(PEFT's LoRA on parameters has none of them)")

    def __repr__(self):
        options = {"use_dora": self.use_dora, "layers": self.layers, "rank_pattern": self.rank_pattern,
                   "alpha_pattern": self.alpha_pattern, "lr_ratio": self.lr_ratio, "lr_embedding": self.lr_embedding,
                   "trainable_token_indices": self.trainable_token_indices, "target_parameters": self.target_parameters,
                   "bias": self.bias}
        defaults = {"use_dora": False, "layers": None, "rank_pattern": {}, "alpha_pattern": {}, "lr_ratio": 1.0,
                    "lr_embedding": None, "trainable_token_indices": None, "target_parameters": (), "bias": "none"}
        extras = "".join(f", {k}={v!r}" for k, v in options.items() if v != defaults[k] or type(v) is not type(defaults[k]))
        return (f"{type(self).__name__}(rank={self.rank}, alpha={self.alpha}, targets={self.targets!r}, "
                f"dropout={self.dropout}, init={self.init_scheme!r}, use_rslora={self.use_rslora}{extras})")

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def targeted(self, path: str, leaves: dict) -> list[bool]:
        """Per layer of a module: is it adapted (targets + layers, as PEFT matches them)? `all-linear`: every
        dense layer but the output head (PEFT's shorthand)."""
        if weight_name(leaves) is None and not is_quantized(leaves):
            return []
        return picked_layers(path, leaves, self.targets, self.layers)

    def targeted_parameter(self, path: str, leaves: dict) -> list[bool]:
        """Per layer of a module: is it an expert weight `target_parameters` names?"""
        if not is_expert_weight(path, leaves):
            return []
        return [any(name == t or name.endswith(f".{t}") for t in self.target_parameters)
                for name in module_layers(path, leaves)]

    def available(self, grouped: dict) -> str:
        """The modules of a grouped tree LoRA can adapt, by HF name (for errors)."""
        return ", ".join(sorted(hf_module(p) for p, leaves in grouped.items() if self.targeted(p, leaves)))

    def init(self, key, params):
        """A new tree with LoRA leaves beside every targeted weight (PiSSA/OLoRA also rewrite W)."""
        grouped = T.modules(params)
        refuse_tied_head(self.targets, grouped)
        chosen = {path: picked for path, leaves in grouped.items() if any(picked := self.targeted(path, leaves))}
        experts = {path: picked for path, leaves in grouped.items()
                   if any(picked := self.targeted_parameter(path, leaves))}
        if self.target_parameters and not experts:
            names = sorted(hf_module(p) for p, leaves in grouped.items() if is_expert_weight(p, leaves))
            raise JpeftError(f"LoRA target_parameters {list(self.target_parameters)} match no expert weight; "
                             f"{'available: ' + ', '.join(names) if names else 'the model has no experts'}")
        if not chosen and (self.targets or not experts):
            raise JpeftError(f"{type(self).__name__} targets {self.targets!r}"
                             f"{f' in layers {list(self.layers)}' if self.layers is not None else ''} "
                             f"match no dense layer; available: {self.available(grouped)}")
        for (path, picked), k in zip({**chosen, **experts}.items(), jax.random.split(key, len(chosen) + len(experts))):
            refuse_second_init(self, path, grouped[path], ("lora_a",))
            init = self.init_experts if path in experts else self.init_module
            grouped[path] = init(k, path, grouped[path], picked)
        params = T.from_modules(grouped)
        return trainable_tokens.with_tokens(params, self.trainable_token_indices) if self.trainable_token_indices \
            else params

    def mask(self, params):
        """LoRA's factors, the token rows of `trainable_token_indices`, and the biases `bias` trains."""
        factors = T.named(params, self.trainable + (TrainableTokens.trainable if self.trainable_token_indices else ()))
        return jax.tree.map(operator.or_, factors, self.trained_biases(params))

    def trained_biases(self, params):
        """Bool tree: the base leaves `bias` trains ("all": those whose path names a bias, as PEFT picks parameters
        by name; "lora_only": the `bias` of each adapted module, every layer of which must then be adapted)."""
        modules = T.modules(params)

        def trained(path: str, _) -> bool:
            if self.bias == "all":
                return "bias" in path and T.leaf_name(path) not in (*self.trainable, *self.metadata)
            module = modules[path.rpartition("/")[0]]
            if self.bias == "none" or T.leaf_name(path) != "bias" or "lora_a" not in module:
                return False
            if not np.all(np.asarray(module["lora_scale"]) != 0):
                raise JpeftError(f"LoRA bias='lora_only' on {hf_module(path.rpartition('/')[0])}, adapted in only "
                                 "some of its layers: PEFT trains the adapted layers' biases alone, jpeft a module's "
                                 "bias across its layer stack")
            return True
        return T.map_with_path(trained, params)

    def init_module(self, key, path: str, leaves: dict, picked: list[bool]) -> dict:
        lead, rank, scale = self.layer_ranks(path, leaves, picked)
        embedding = "embedding" in leaves
        if is_quantized(leaves) and self.init_scheme in ("pissa", "olora"):
            raise JpeftError(f"{hf_module(path)}: {self.init_scheme} rewrites the base weight; it cannot start "
                             "from a quantized one")
        w = leaves["embedding"] if embedding else _weight(leaves)
        d_in, d_out = w.shape[-2:]
        out = dict(leaves)
        if embedding:  # PEFT: A zero, B normal for embeddings, whatever the dense layers' init (PiSSA, OLoRA)
            a = jnp.zeros((*lead, d_in, rank), jnp.float32)
            b = jax.random.normal(key, (*lead, rank, d_out), jnp.float32)
        elif self.init_scheme in ("pissa", "olora"):
            kernel = leaves["kernel"].astype(jnp.float32)
            a, b = decompose(kernel, rank, scale, self.init_scheme)
            out["kernel"] = (kernel - scale[..., None, None] * (a @ b)).astype(leaves["kernel"].dtype)
            out["lora_init_a"], out["lora_init_b"] = a, b
        elif self.init_scheme == "peft":
            a = linear_uniform(key, (*lead, d_in, rank), d_in)
            b = jnp.zeros((*lead, rank, d_out), jnp.float32)
        else:
            a = jax.random.normal(key, (*lead, d_in, rank), jnp.float32) / rank
            b = jnp.zeros((*lead, rank, d_out), jnp.float32)
        out.update(lora_a=a, lora_b=b, lora_scale=scale)
        if self.dropout > 0:
            out["lora_dropout"] = jnp.full(lead, self.dropout, jnp.float32)
        if self.use_dora:
            base = out["embedding"] if embedding else _weight(out)
            out["lora_magnitude"] = column_norm(base.astype(jnp.float32), a, b, scale)
        return out

    def init_experts(self, key, path: str, leaves: dict, picked: list[bool]) -> dict:
        """A pair of factors per expert of a stacked weight [..., E, out, in], PEFT's init."""
        lead, rank, scale = self.layer_ranks(path, leaves, picked)
        experts, d_out, d_in = expert_shape(leaves)[-3:]
        shape = (*lead, experts, d_in, rank)
        a = linear_uniform(key, shape, d_in) if self.init_scheme == "peft" else jax.random.normal(key, shape) / rank
        return {**leaves, "lora_a": a, "lora_b": jnp.zeros((*lead, experts, rank, d_out), jnp.float32),
                "lora_scale": scale}

    def layer_ranks(self, path: str, leaves: dict, picked: list[bool]):
        """(stacked-layer dims, the one rank rank_pattern gives the module's adapted layers, each layer's scale:
        alpha_pattern's over the rank, 0 where not adapted)."""
        lead, names = leading(path, next(iter(leaves.values()))), module_layers(path, leaves)
        ranks = {int(pattern_value(self.rank_pattern, n, self.rank)) for n, p in zip(names, picked) if p}
        if len(ranks) > 1:
            raise JpeftError(f"{hf_module(path)}: rank_pattern gives its layers different ranks {sorted(ranks)}; "
                             "a stacked layer module needs one rank")
        rank = ranks.pop()
        scale = jnp.asarray([self.scaling(rank, pattern_value(self.alpha_pattern, n, self.alpha)) * p
                             for n, p in zip(names, picked)], jnp.float32).reshape(lead)
        return lead, rank, scale

    @staticmethod
    def expert_delta(leaves, rows, sizes):
        """s·(rows·A_e)·B_e for each expert's rows."""
        a = (leaves["lora_scale"][..., None, None, None] * leaves["lora_a"]).astype(rows.dtype)
        return grouped(grouped(rows, a, sizes), leaves["lora_b"], sizes)

    @staticmethod
    def dense_delta(leaves, x, y, rng):
        """s·(dropout(x)·A)·B, or DoRA's rescaling of the whole output (PEFT's forward)."""
        if "adapter_ids" in leaves:
            return _routed(leaves, x)
        scale = leaves["lora_scale"]
        xd = dropped_input(x, leaves["lora_dropout"], rng, 0) if "lora_dropout" in leaves and rng is not None else x
        # the scale on the rank-r factor, not on the [tokens, out] product: an elementwise op fused
        # into that big product (and its gradient) takes XLA:CPU off its fast matmul path
        a, b = (scale * leaves["lora_a"]).astype(x.dtype), leaves["lora_b"].astype(x.dtype)
        lora = matmul(matmul(xd, a), b)
        if "lora_magnitude" not in leaves:
            return lora
        w = _weight(leaves, x.dtype)
        norm = jax.lax.stop_gradient(column_norm(w.astype(jnp.float32), leaves["lora_a"], leaves["lora_b"], scale))
        mag = leaves["lora_magnitude"] / norm
        base = y if xd is x else jnp.matmul(xd, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return jnp.where(scale != 0, (mag - 1) * base + mag * lora, 0)

    @staticmethod
    def embed_delta(leaves, ids):
        """s·A[ids]·B, or with DoRA the rows rescaled as a whole: m / ‖E + s·A·B‖ per embedding dimension (the norm
        over the vocabulary, PEFT's DoRA embedding) times (E[ids] + s·A[ids]·B), less E[ids]."""
        if "adapter_ids" in leaves:
            chosen = leaves["adapter_ids"]
            rows = leaves["lora_a"][chosen[:, None], ids]
            return leaves["lora_scale"][chosen][:, None, None] * jnp.einsum("btr,brd->btd", rows,
                                                                              leaves["lora_b"][chosen])
        rows = jnp.take(leaves["lora_a"], ids, axis=0)
        lora = leaves["lora_scale"] * jnp.matmul(rows, leaves["lora_b"])
        if "lora_magnitude" not in leaves:
            return lora
        table = leaves["embedding"]
        norm = jax.lax.stop_gradient(column_norm(table.astype(jnp.float32), leaves["lora_a"], leaves["lora_b"],
                                                 leaves["lora_scale"]))
        mag = leaves["lora_magnitude"] / norm
        return (mag - 1) * jnp.take(table, ids, axis=0).astype(jnp.float32) + mag * lora

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        """W + s·A·B (DoRA: rescaled to the magnitude), in float32, cast back; LoRA leaves dropped."""
        out = {k: v for k, v in leaves.items() if k not in cls.trainable + cls.metadata}
        if "weight" in leaves:  # a mixture's experts, [..., E, out, in]
            delta = jnp.einsum("...eir,...ero->...eoi", leaves["lora_a"], leaves["lora_b"])
            scale = leaves["lora_scale"][..., None, None, None]
            return {**out, "weight": (leaves["weight"].astype(jnp.float32) + scale * delta).astype(leaves["weight"].dtype)}
        name = weight_name(leaves)
        w = leaves[name]
        a, b = leaves["lora_a"].astype(jnp.float32), leaves["lora_b"].astype(jnp.float32)
        scale = leaves["lora_scale"][..., None, None]
        merged = w.astype(jnp.float32) + scale * (a @ b)
        if "lora_magnitude" in leaves:
            norm = column_norm(w.astype(jnp.float32), a, b, leaves["lora_scale"])
            mag = jnp.where(leaves["lora_scale"][..., None] != 0, leaves["lora_magnitude"] / norm, 1.0)
            merged = merged * mag[..., None, :]
        out[name] = merged.astype(w.dtype)
        return out

    @classmethod
    def count(cls, leaves: dict, name: str) -> int:
        """Only adapted layers count (PEFT's formula over the layers it transforms)."""
        size = int(np.size(leaves[name]))
        scale = np.asarray(leaves["lora_scale"])
        return size * int(np.count_nonzero(scale)) // max(scale.size, 1)


def _weight(leaves, dtype=None):
    """The module's dense weight, whatever stores it (the kernel, or a quantized form)."""
    from jpeft.peft import sites  # sites imports the registry, which imports this module
    return sites.weight(leaves, dtype)


def _routed(leaves, x):
    """Row i of the batch through adapter `adapter_ids[i]` of factors stacked [n, in, r] / [n, r, out]."""
    ids = leaves["adapter_ids"]
    a, b = leaves["lora_a"][ids].astype(x.dtype), leaves["lora_b"][ids].astype(x.dtype)
    delta = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x, a), b, preferred_element_type=jnp.float32)
    return leaves["lora_scale"][ids][:, None, None] * delta


def column_norm(w, a, b, scale):
    """‖W + s·A·B‖ over the input axis: one norm per output unit (DoRA's weight norm)."""
    merged = w + scale[..., None, None] * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    return jnp.sqrt(jnp.sum(merged * merged, axis=-2))


def decompose(kernel, rank: int, scale, scheme: str):
    """PiSSA (top-r SVD) or OLoRA (QR) factors of W = kernelᵀ as PEFT computes them; `scale` per layer."""
    w = jnp.swapaxes(kernel, -1, -2)  # PyTorch's [out, in]
    if scheme == "pissa":
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        root = jnp.sqrt(s[..., :rank] / jnp.where(scale == 0, 1.0, scale)[..., None])
        lora_a = root[..., :, None] * vh[..., :rank, :]            # [r, in]
        lora_b = u[..., :, :rank] * root[..., None, :]             # [out, r]
    else:
        q, r = jnp.linalg.qr(w)
        lora_a, lora_b = r[..., :rank, :], q[..., :, :rank]
    return jnp.swapaxes(lora_a, -1, -2), jnp.swapaxes(lora_b, -1, -2)
