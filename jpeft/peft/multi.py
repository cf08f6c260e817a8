"""Several named adapters on one base tree: choose one per call, route rows of one batch to
different LoRA adapters, or combine them as PEFT's `add_weighted_adapter` does.

The container is the base tree plus `params["adapters"][name]`: each adapter's own leaves at
their usual paths. `use_adapter` and `route` return trees for `model.apply`; the base
weights are shared, never copied.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import JpeftError
from jpeft.peft.registry import HEAD_MODULES, METHODS
from jpeft.peft.saved_modules import MARK as SAVED_MARK

ADAPTER_LEAVES = frozenset(n for m in METHODS for n in (*m.trainable, *m.metadata))
COMBINATIONS = ("linear", "cat", "svd")
LORA_LEAVES = frozenset({"lora_a", "lora_b", "lora_scale", "lora_magnitude", "lora_dropout"})  # DoRA's: refused below
IA3_LEAVES = frozenset({"ia3_in", "ia3_out"})


def add_adapter(params, name: str, adapted):
    """`params` with the adapter leaves of `adapted` (a tree adapted from the same base) stored as `name`."""
    flat = T.flatten(adapted)
    if any(T.leaf_name(p) in ("lora_init_a", "lora_init_b") for p in flat):
        raise JpeftError(f"adapter {name!r} was initialised with PiSSA/OLoRA, which rewrites the base weights; "
                         "it cannot share a base with other adapters")
    if any(T.leaf_name(p) == SAVED_MARK for p in flat):
        raise JpeftError(f"add_adapter: {name!r} holds modules its dir saved whole (modules_to_save), which replace "
                         "the base's rather than sit beside them; named adapters cannot share a base with it")
    if head := sorted({p.split("/", 1)[0] for p in flat} & set(HEAD_MODULES)):
        raise JpeftError(f"add_adapter: {name!r} holds a classification head ({', '.join(head)}), which named "
                         "adapters do not keep; use the classifier tree itself")
    leaves = {p: v for p, v in flat.items() if T.leaf_name(p) in ADAPTER_LEAVES and not p.startswith("adapters/")}
    if not leaves:
        raise JpeftError(f"add_adapter: {name!r} holds no adapter leaves (call a method's .init first)")
    base = T.flatten(_base(params))
    if changed := sorted(p for p, v in flat.items() if p in base and p not in leaves and v is not base[p]
                         and not bool(jnp.array_equal(v, base[p]))):
        raise JpeftError(f"add_adapter: {name!r} changed base weights the named adapters share "
                         f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}), which an adapter entry "
                         "does not keep (full fine-tuning; LoRA's bias='all' on a table PEFT calls a bias); keep that "
                         "tree whole, or merge it and add adapters to that")
    stored = dict(params.get("adapters", {}))
    stored[name] = T.unflatten(leaves)
    return {**params, "adapters": stored}


def _base(params):
    return {k: v for k, v in params.items() if k != "adapters"}


def refuse_container(params, what: str) -> None:
    """A tree holding named adapters is no model tree: merging or saving it must pick one first."""
    if "adapters" in params:
        raise JpeftError(f"{what}: this tree holds named adapters {sorted(params['adapters'])} (add_adapter); "
                         "pick one with jpeft.use_adapter(tree, name) first (to train one, train that tree and "
                         "store it back with add_adapter)")


def _named(params, name: str) -> dict:
    adapters = params.get("adapters", {})
    if name not in adapters:
        raise JpeftError(f"no adapter named {name!r}; this tree holds {sorted(adapters) or 'none'}")
    return T.flatten(adapters[name])


def use_adapter(params, name: str):
    """A tree for `model.apply` with adapter `name` active (and no other)."""
    base = {p: v for p, v in T.flatten(_base(params)).items() if T.leaf_name(p) not in ADAPTER_LEAVES}
    return T.unflatten({**base, **_named(params, name)})


def route(params, names: Sequence[str], adapter_ids):
    """A tree in which row i of the batch uses LoRA adapter `names[adapter_ids[i]]`, all in one step.

    Factors are stacked on a new axis (ranks zero-padded to the largest, which changes nothing);
    a module an adapter does not adapt gets a zero scale for it.
    """
    adapters = [T.modules(T.unflatten(_named(params, n))) for n in names]
    grouped = T.modules(use_adapter(params, names[0]) if names else _base(params))
    if not isinstance(adapter_ids, jax.core.Tracer) and not np.all(
            (0 <= (given := np.asarray(adapter_ids))) & (given < len(names))):
        raise JpeftError(f"route: adapter_ids must index names (0..{len(names) - 1}), got {adapter_ids!r}")
    ids = jnp.asarray(adapter_ids, jnp.int32)
    for path in sorted({p for a in adapters for p in a}):
        if other := sorted({leaf for a in adapters for leaf in a.get(path, {})} - (LORA_LEAVES - {"lora_magnitude"})):
            raise JpeftError(f"route: {path} holds {', '.join(other)} (not a plain LoRA); routing rows supports "
                             "plain LoRA adapters only")
        if path.endswith("relative_attention_bias"):
            raise JpeftError(f"route: {path} is adapted, but T5's position biases are shared by every row of "
                             "the batch; routing rows supports adapters on per-token modules only")
        rank = max(a[path]["lora_a"].shape[-1] for a in adapters if path in a)
        template = next(a[path] for a in adapters if path in a)
        factors = [_padded(a.get(path), template, rank) for a in adapters]
        stack = lambda i: jnp.stack([f[i] for f in factors], axis=template["lora_scale"].ndim)
        leaves = {k: v for k, v in grouped[path].items() if k not in ADAPTER_LEAVES}
        lead = template["lora_scale"].shape
        grouped[path] = {**leaves, "lora_a": stack(0), "lora_b": stack(1), "lora_scale": stack(2),
                         "adapter_ids": jnp.broadcast_to(ids, (*lead, *ids.shape))}
    return T.from_modules(grouped)


def _padded(leaves: dict | None, template: dict, rank: int):
    """(a, b, scale) zero-padded to `rank`; zeros when the adapter leaves this module alone."""
    a0, b0, s0 = template["lora_a"], template["lora_b"], template["lora_scale"]
    if leaves is None:
        return (jnp.zeros((*a0.shape[:-1], rank)), jnp.zeros((*b0.shape[:-2], rank, b0.shape[-1])),
                jnp.zeros_like(s0))
    a, b = leaves["lora_a"], leaves["lora_b"]
    pad = rank - a.shape[-1]
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
    return a, b, leaves["lora_scale"]


def add_weighted_adapter(params, names: Sequence[str], weights: Sequence[float], new_name: str,
                         combination: str = "svd", rank: int | None = None):
    """A new named LoRA adapter combining `names` with `weights`, as PEFT's `add_weighted_adapter`:

    linear: A = Σ sign·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (equal ranks);  cat: [w₁s₁A₁ | w₂s₂A₂ ...], [B₁ | B₂ ...]
    (exactly Σ wᵢsᵢBᵢAᵢ);  svd: the top-`rank` SVD of Σ wᵢsᵢBᵢAᵢ. The result has scale 1 (alpha = rank) and
    the first adapter's dropout. IA3 adapters combine as PEFT's IA3 does, Σ wᵢ·lᵢ (`combination` unused).
    """
    if combination not in COMBINATIONS:
        raise JpeftError(f"combination must be one of {', '.join(COMBINATIONS)}, got {combination!r}")
    if len(names) != len(weights) or not names:
        raise JpeftError("add_weighted_adapter needs one weight per adapter name")
    if len(names) == 1:
        combination = "linear"
    adapters = [T.modules(T.unflatten(_named(params, n))) for n in names]
    if all({leaf for leaves in a.values() for leaf in leaves} <= IA3_LEAVES for a in adapters):
        return add_adapter(params, new_name, T.from_modules(_weighted_ia3(adapters, weights)))
    for name, adapter in zip(names, adapters):
        if other := sorted({leaf for leaves in adapter.values() for leaf in leaves} - LORA_LEAVES):
            raise JpeftError(f"add_weighted_adapter combines LoRA adapters; {name!r} holds {', '.join(other)}")
    new_rank = rank or max(a[p]["lora_a"].shape[-1] for a in adapters for p in a)  # svd's
    # the first adapter's dropout rate on every combined module, as PEFT copies the first adapter's config
    dropout = max((float(np.max(leaves["lora_dropout"])) for leaves in adapters[0].values()
                   if "lora_dropout" in leaves), default=0.0)
    combined = {}
    for path in sorted({p for a in adapters for p in a}):
        parts = [(a[path], w) for a, w in zip(adapters, weights) if path in a]
        if any("lora_magnitude" in leaves for leaves, _ in parts):
            raise JpeftError(f"add_weighted_adapter: {path} holds a DoRA adapter, which does not combine linearly")
        coef = [w * leaves["lora_scale"][..., None, None] for leaves, w in parts]  # per layer
        if combination == "linear" and len(ranks := {leaves["lora_a"].shape[-1] for leaves, _ in parts}) != 1:
            raise JpeftError(f"linear combination needs one rank per module; {path} has ranks {sorted(ranks)} in "
                             "these adapters: use 'cat' or 'svd'")
        if combination == "linear":
            a = sum(jnp.sign(c) * jnp.sqrt(jnp.abs(c)) * leaves["lora_a"] for (leaves, _), c in zip(parts, coef))
            b = sum(jnp.sqrt(jnp.abs(c)) * leaves["lora_b"] for (leaves, _), c in zip(parts, coef))
        elif combination == "cat":
            a = jnp.concatenate([c * leaves["lora_a"] for (leaves, _), c in zip(parts, coef)], axis=-1)
            b = jnp.concatenate([leaves["lora_b"] for leaves, _ in parts], axis=-2)
        else:
            delta = sum(c * (leaves["lora_a"] @ leaves["lora_b"]) for (leaves, _), c in zip(parts, coef))
            a, b = _top_factors(delta, new_rank)
        active = jnp.max(jnp.stack([leaves["lora_scale"] != 0 for leaves, _ in parts]), axis=0)
        combined[path] = {"lora_a": a, "lora_b": b, "lora_scale": active.astype(jnp.float32)}
        if dropout:
            combined[path]["lora_dropout"] = jnp.full(active.shape, dropout, jnp.float32)
    return add_adapter(params, new_name, T.from_modules(combined))


def _weighted_ia3(adapters: list[dict], weights: Sequence[float]) -> dict:
    """IA3's combination, as PEFT's IA3Model.add_weighted_adapter: each module's vector Σ wᵢ·lᵢ over the
    adapters that scale it (one that does not adds nothing, not a vector of ones)."""
    combined = {}
    for path in sorted({p for a in adapters for p in a}):
        parts = [(a[path], w) for a, w in zip(adapters, weights) if path in a]
        (name,), kinds = parts[0][0].keys(), {tuple(leaves) for leaves, _ in parts}
        if len(kinds) > 1:
            raise JpeftError(f"add_weighted_adapter: {path} scales its input in one IA3 adapter and its output in "
                             "another; they do not combine")
        combined[path] = {name: sum(w * leaves[name] for leaves, w in parts)}
    return combined


def _top_factors(delta, rank: int):
    """(a, b) with a·b the best rank-`rank` approximation of delta [..., in, out], split as PEFT
    splits it: B = U·diag(S), A = Vh from the SVD of PEFT's ΔW = deltaᵀ."""
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(delta, -1, -2), full_matrices=False)
    lora_b, lora_a = u[..., :, :rank] * s[..., None, :rank], vh[..., :rank, :]
    return jnp.swapaxes(lora_a, -1, -2), jnp.swapaxes(lora_b, -1, -2)
