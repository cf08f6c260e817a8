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

import collections
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import (CONV1D, Method, dropped_input, exact_targets, expert_shape,
                             from_layer_rows, hf_module, is_expert_weight, layer_index, layer_rows, leading,
                             linear_uniform, module_layers, module_names, picked_layers, refuse_second_init,
                             refuse_tied_head, saved_base_weight, target_option, weight_name)
from jpeft.peft import lora_experts, trainable_tokens
from jpeft.peft.quant import is_quantized
from jpeft.peft.trainable_tokens import TrainableTokens
from jpeft.products import grouped, matmul

INITS = ("peft", "gaussian", "pissa", "olora")
# init_lora_weights values of a PEFT adapter jpeft loads: those that leave the base weights as they are (A and B
# come from the file), and PiSSA's and OLoRA's exact rewrites, which jpeft repeats
PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal", "lora_ga", "pissa", "olora")


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
    dropout, DoRA or PiSSA/OLoRA there.
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
                 target_parameters: Sequence[str] | None = None):
        if rank < 1:
            raise JpeftError(f"LoRA rank must be >= 1, got {rank}")
        if init not in INITS:
            raise JpeftError(f"LoRA init must be one of {', '.join(INITS)}, got {init!r}")
        if not 0 <= dropout < 1:
            raise JpeftError(f"LoRA dropout must be in [0, 1), got {dropout}")
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
        unfit = {"dropout": dropout > 0, "DoRA": use_dora, f"init {init!r}": init in ("pissa", "olora"),
                 "layers": layers is not None}
        if self.target_parameters and (unfit := [name for name, on in unfit.items() if on]):
            raise JpeftError(f"LoRA on target_parameters {list(self.target_parameters)} takes no {', '.join(unfit)} "
                             "(PEFT's LoRA on parameters has none of them)")

    def __repr__(self):
        options = {"use_dora": self.use_dora, "layers": self.layers, "rank_pattern": self.rank_pattern,
                   "alpha_pattern": self.alpha_pattern, "lr_ratio": self.lr_ratio, "lr_embedding": self.lr_embedding,
                   "trainable_token_indices": self.trainable_token_indices, "target_parameters": self.target_parameters}
        defaults = {"use_dora": False, "layers": None, "rank_pattern": {}, "alpha_pattern": {}, "lr_ratio": 1.0,
                    "lr_embedding": None, "trainable_token_indices": None, "target_parameters": ()}
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
        """LoRA's factors, and the token rows of `trainable_token_indices`."""
        return T.named(params, self.trainable + (TrainableTokens.trainable if self.trainable_token_indices else ()))

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


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT tensors and config fields for the LoRA `modules` of a grouped `tree` (`T.modules`); PiSSA/OLoRA converted back: [A | A₀], [B | -B₀] at twice the rank, so the adapter
    applies to the original base. Trainable token rows beside it go as its `trainable_token_indices`."""
    tensors, entries, dropouts, dora, active = {}, {}, {0.0}, False, {}
    experts = {p: leaves for p, leaves in modules.items() if is_expert_weight(p, leaves)}
    modules = {p: leaves for p, leaves in modules.items() if p not in experts}
    parameters = lora_experts.to_peft(experts, tensors)
    for path, leaves in modules.items():
        a, b = np.asarray(leaves["lora_a"], np.float32), np.asarray(leaves["lora_b"], np.float32)
        if "lora_init_a" in leaves:
            a = np.concatenate([a, np.asarray(leaves["lora_init_a"])], axis=-1)
            b = np.concatenate([b, -np.asarray(leaves["lora_init_b"])], axis=-2)
        a, b, scale = layer_rows(path, a), layer_rows(path, b), layer_rows(path, leaves["lora_scale"])
        magnitude = layer_rows(path, leaves["lora_magnitude"]) if "lora_magnitude" in leaves else None
        rank, embedding = a.shape[-1], "embedding" in leaves
        dropouts.add(float(np.max(leaves.get("lora_dropout", 0.0))))
        for i, name in enumerate(module_layers(path, leaves)):
            if scale[i] == 0:
                continue
            if embedding:
                tensors[f"{name}.lora_embedding_A"], tensors[f"{name}.lora_embedding_B"] = a[i].T, b[i].T
            else:
                tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a[i].T, b[i].T
            if magnitude is not None:
                tensors[f"{name}.lora_magnitude_vector"] = magnitude[i]
                dora = True
            entries[name] = (rank, float(scale[i]) * rank)
            active.setdefault(path, []).append(i)
    ranks = {**entries, **parameters}
    rank = collections.Counter(r for r, _ in ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(al for _, al in ranks.values()).most_common(1)[0][0]
    short = {name.rsplit(".", 1)[-1] for name in entries}
    layer_sets = {tuple(v) for v in active.values()}
    whole = all(len(v) == len(module_layers(p, modules[p])) for p, v in active.items())
    config = {"r": rank, "lora_alpha": alpha, "lora_dropout": max(dropouts), "use_dora": dora,
              "rank_pattern": {n: r for n, (r, _) in ranks.items() if r != rank},
              "alpha_pattern": {n: al for n, (_, al) in ranks.items() if al != alpha},
              "bias": "none", "fan_in_fan_out": bool(short & set(CONV1D)), "inference_mode": True,
              "init_lora_weights": True,
              "modules_to_save": None, "use_rslora": False, "layers_to_transform": None}
    stacked_only = all(T.is_stacked(p + "/leaf") for p in active)
    names = module_names(tree)
    if parameters:  # by their names within a layer, as PEFT's target_parameters name them
        config["target_parameters"] = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in parameters})
    if not entries:
        config["target_modules"] = None
    elif whole:
        config["target_modules"] = exact_targets(entries, names)
    elif len(layer_sets) == 1 and stacked_only:
        layers = layer_sets.pop()
        config["target_modules"] = exact_targets(entries, [n for n in names if layer_index(n) in layers])
        config["layers_to_transform"] = list(layers)
    else:  # an exact regex over the adapted per-layer names
        config["target_modules"] = "(" + "|".join(re.escape(n) for n in sorted(entries)) + ")"
    if tokens := {p: m for p, m in tree.items() if TrainableTokens.present(m)}:
        rows, config["trainable_token_indices"] = trainable_tokens.lora_tensors(tokens)
        tensors.update(rows)
    return tensors, config


def from_peft(config: dict, tensors, modules: dict) -> dict:
    """The tree's modules with LoRA leaves read from a PEFT state dict (`tensors.take(key)`)."""
    layers = config.get("layers_to_transform")
    init = config.get("init_lora_weights", True)
    if init == "mica":
        raise AdapterError("init_lora_weights='mica' cannot be honoured by jpeft, and PEFT cannot convert it to a "
                           "plain LoRA either; retrain with another init")
    if init not in PEFT_INITS:
        raise AdapterError(f"init_lora_weights={init!r}: PEFT rewrites the base weights with it when it loads the "
                           "adapter, which jpeft cannot reproduce; save it from PEFT with "
                           "path_initial_model_for_weight_conversion (a plain LoRA of the original base) and load that")
    targets = config.get("target_modules")
    method = LoRA(int(config["r"]), float(config["lora_alpha"]), () if targets is None else targets,
                  dropout=float(config.get("lora_dropout") or 0.0),
                  init=init if init in ("pissa", "olora") else "peft", use_rslora=bool(config.get("use_rslora")),
                  use_dora=bool(config.get("use_dora")), layers=[layers] if isinstance(layers, int) else layers,
                  rank_pattern=config.get("rank_pattern"), alpha_pattern=config.get("alpha_pattern"),
                  target_parameters=config.get("target_parameters"))
    refuse_tied_head(method.targets, modules, AdapterError)
    if layers is not None and config.get("layers_pattern"):
        _refuse_other_layer_counts(config["layers_pattern"], modules)
    out = {**modules, **lora_experts.from_peft(method, tensors, modules)}
    for path, leaves in modules.items():
        picked = method.targeted(path, leaves)
        if not any(picked):
            continue
        adapted = method.init_module(jax.random.key(0), path, leaves, picked)  # then filled from the file
        embedding = "embedding" in leaves
        keys = {"lora_a": "lora_embedding_A" if embedding else "lora_A.weight",
                "lora_b": "lora_embedding_B" if embedding else "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
        per_layer = {leaf: layer_rows(path, adapted[leaf]) for leaf in keys if leaf in adapted}
        for i, name in enumerate(module_layers(path, leaves)):
            for leaf in per_layer if picked[i] else ():
                got = tensors.take(f"{name}.{keys[leaf]}")
                got = got if leaf == "lora_magnitude" else got.T
                tensors.fits(f"{name}.{keys[leaf]}", got.shape, per_layer[leaf][i].shape)
                per_layer[leaf][i] = got
            adapted.update(saved_base_weight(tensors, name, leaves))
        out[path] = {**adapted, **{leaf: from_layer_rows(path, v) for leaf, v in per_layer.items()}}
    if all(out[p] is modules[p] for p in modules):
        raise AdapterError(f"target_modules {config['target_modules']!r} match no module of the base model; "
                           f"its modules: {method.available(modules)}")
    if token_indices := config.get("trainable_token_indices"):
        out = trainable_tokens.read_lora_tensors(token_indices, tensors, out)
    return out


def _refuse_other_layer_counts(layers_pattern, modules: dict) -> None:
    """PEFT numbers a module's layer by the first `{layers_pattern}.N.` in its name; jpeft by its layer stack's
    index. A pattern that numbers any module otherwise (T5's `layer`, a name this base lacks) is refused."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)

    def peft_index(name: str) -> int | None:
        found = (re.match(rf"(?:^|.*?\.){re.escape(p)}\.(?P<idx>\d+)\.", name) for p in patterns)
        return next((int(m.group("idx")) for m in found if m), None)

    for name in module_names(modules):
        if peft_index(name) != layer_index(name):
            raise AdapterError(f"layers_pattern {layers_pattern!r} numbers the layers of {name} otherwise than its "
                               "layer stack does; jpeft counts layers_to_transform in the stack (re-save the adapter "
                               "with layers_pattern=None)")
