"""VeRA (Kopiczko et al., 2024): one pair of frozen random projections shared by every adapted layer, and
two trained vectors per layer, with PEFT's semantics.

    y = x·W + λ_b ⊙ ((λ_d ⊙ (dropout(x)·A))·B),   A, B: the shared pair's first `in` rows / `out` columns

The pair is drawn once per init, sized for the largest adapted layer, as PEFT draws it (kaiming-uniform:
A [max_in, r] within ±√(6/max_in), B [r, max_out] within ±√(6/r)). Each module keeps its slices
(`vera_a` [..., in, r], `vera_b` [..., r, out]: metadata, frozen and never counted), so the hook reads one
module's leaves as every method's does, and `save_adapter` writes the pair back whole (PEFT's
`save_projection`). λ_b starts at zero, so the model is unchanged at init; λ_d at `d_initial`.
Parameters per adapted layer: r + out.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import (Method, dropped_input, exact_targets, from_layer_rows, hf_module, is_conv1d,
                             layer_rows, leading, module_layers, module_names, refuse_second_init, refuse_tied_head,
                             saved_base_weight, target_option, whole_stacks)
from jpeft.peft.quant import is_quantized
from jpeft.products import matmul

# PEFT's keys of the shared pair, beside the per-module ones: [r, max_in] and [max_out, r], torch's layout
SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"


class VeRA(Method):
    name = "vera"
    peft_type = "VERA"
    trainable = ("vera_lambda_d", "vera_lambda_b")
    metadata = ("vera_a", "vera_b", "vera_dropout")
    axes = {"vera_lambda_d": ("lead", None), "vera_lambda_b": ("lead", "out"), "vera_a": ("lead", "in", None),
            "vera_b": ("lead", None, "out"), "vera_dropout": ("lead",)}

    def __init__(self, rank: int = 256, targets: Sequence[str] | str = ("q_proj", "v_proj"), dropout: float = 0.0,
                 d_initial: float = 0.1):
        if rank < 1:
            raise JpeftError(f"VeRA rank must be >= 1, got {rank}")
        if not 0 <= dropout < 1:
            raise JpeftError(f"VeRA dropout must be in [0, 1), got {dropout}")
        self.rank, self.dropout, self.d_initial = int(rank), float(dropout), float(d_initial)
        self.targets = target_option(targets)

    def __repr__(self):
        return (f"VeRA(rank={self.rank}, targets={self.targets!r}, dropout={self.dropout}, "
                f"d_initial={self.d_initial})")

    def chosen(self, grouped: dict) -> list[str]:
        """The dense modules VeRA adapts (whole layer stacks; `all-linear`: all but the output head)."""
        def refusal(path, leaves):
            if is_quantized(leaves):
                return "its weight is quantized: VeRA adapts float weights (QLoRA's LoRA adapts quantized ones)"
            if "kernel" not in leaves:
                return "it is an embedding: VeRA adapts dense layers, as PEFT's VeRA does"
        return whole_stacks(self, grouped, refusal)

    def init(self, key, params):
        grouped = T.modules(params)
        refuse_tied_head(self.targets, grouped)
        chosen = self.chosen(grouped)
        d_in, d_out = largest(grouped, chosen)
        key_a, key_b = jax.random.split(key)
        shared_a = _kaiming_uniform(key_a, (d_in, self.rank), d_in)
        shared_b = _kaiming_uniform(key_b, (self.rank, d_out), self.rank)
        return T.from_modules(self.attach(grouped, chosen, shared_a, shared_b))

    def attach(self, grouped: dict, chosen: list[str], shared_a, shared_b) -> dict:
        """`grouped` with VeRA's leaves on each chosen module: the shared pair's slices, λ_d = d_initial, λ_b = 0."""
        out = dict(grouped)
        for path in chosen:
            leaves = grouped[path]
            refuse_second_init(self, path, leaves, self.trainable)
            lead = leading(path, leaves["kernel"])
            d_in, d_out = leaves["kernel"].shape[-2:]
            out[path] = {**leaves, "vera_a": jnp.broadcast_to(shared_a[:d_in], (*lead, d_in, self.rank)),
                         "vera_b": jnp.broadcast_to(shared_b[:, :d_out], (*lead, self.rank, d_out)),
                         "vera_lambda_d": jnp.full((*lead, self.rank), self.d_initial, jnp.float32),
                         "vera_lambda_b": jnp.zeros((*lead, d_out), jnp.float32)}
            if self.dropout > 0:
                out[path]["vera_dropout"] = jnp.full(lead, self.dropout, jnp.float32)
        return out

    @staticmethod
    def dense_delta(leaves, x, y, rng):
        """λ_b ⊙ ((λ_d ⊙ (dropout(x)·A))·B) in PEFT's order. The vectors scale the products' outputs rather than
        the frozen factors: that way the backward pass needs no weight-gradient product for A or B, only sums
        over tokens (a float32 step's VeRA delta, r=256 on [2048, 512]·[512, 1408]: 38 against 54 ms)."""
        if "vera_dropout" in leaves and rng is not None:
            x = dropped_input(x, leaves["vera_dropout"], rng, 1)
        mid = (matmul(x, leaves["vera_a"]) * leaves["vera_lambda_d"]).astype(x.dtype)
        return matmul(mid, leaves["vera_b"]) * leaves["vera_lambda_b"]

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        out = {k: v for k, v in leaves.items() if k not in cls.trainable + cls.metadata}
        a, b = _scaled(leaves)
        out["kernel"] = (leaves["kernel"].astype(jnp.float32) + a @ b).astype(leaves["kernel"].dtype)
        return out


def largest(grouped: dict, chosen: list[str]) -> tuple[int, int]:
    """(input, output) sizes of the shared pair: the largest of the chosen modules', as PEFT's `_find_dim`."""
    return tuple(max(grouped[p]["kernel"].shape[i] for p in chosen) for i in (-2, -1))


def _scaled(leaves):
    """A·diag(λ_d) and B·diag(λ_b) in float32: the delta's two factors."""
    a = leaves["vera_a"].astype(jnp.float32) * leaves["vera_lambda_d"][..., None, :]
    b = leaves["vera_b"].astype(jnp.float32) * leaves["vera_lambda_b"][..., None, :]
    return a, b


def _kaiming_uniform(key, shape, fan_in: int):
    """PEFT's `_kaiming_init`: U(±√3·√2/√fan_in), the fan-in of torch's [out, in] layout."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def shared_pair(modules: dict) -> tuple[np.ndarray, np.ndarray]:
    """The shared (A [max_in, r], B [r, max_out]) rebuilt from the modules' slices, which must all be its
    prefixes (they are, unless trees of two inits were mixed)."""
    slices = [(np.asarray(leaves["vera_a"]).reshape(-1, *leaves["vera_a"].shape[-2:])[0],
               np.asarray(leaves["vera_b"]).reshape(-1, *leaves["vera_b"].shape[-2:])[0]) for leaves in modules.values()]
    a = max((a for a, _ in slices), key=len)
    b = max((b for _, b in slices), key=lambda b: b.shape[1])
    for path, leaves in modules.items():
        d_in, d_out = leaves["vera_a"].shape[-2], leaves["vera_b"].shape[-1]
        if not (np.array_equal(leaves["vera_a"], np.broadcast_to(a[:d_in], leaves["vera_a"].shape)) and
                np.array_equal(leaves["vera_b"], np.broadcast_to(b[:, :d_out], leaves["vera_b"].shape))):
            raise AdapterError(f"{hf_module(path)}: its VeRA projections are not slices of the pair the other "
                               "modules share (VeRA trees of two inits mixed); PEFT's VeRA holds one pair")
    return a, b


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's per-layer `vera_lambda_b` [out] and `vera_lambda_d` [r], and the shared pair in torch's layout."""
    a, b = shared_pair(modules)
    tensors, adapted, dropouts = {SHARED_A: a.T, SHARED_B: b.T}, [], {0.0}
    for path, leaves in modules.items():
        names = module_layers(path, leaves)
        for leaf in ("vera_lambda_d", "vera_lambda_b"):
            tensors.update({f"{name}.{leaf}": row for name, row in zip(names, layer_rows(path, leaves[leaf]))})
        adapted += names
        dropouts.add(float(np.max(leaves.get("vera_dropout", 0.0))))
    return tensors, {"r": int(a.shape[1]), "target_modules": exact_targets(adapted, module_names(tree)),
                     "projection_prng_key": 0, "save_projection": True, "vera_dropout": max(dropouts),
                     "d_initial": 0.1, "fan_in_fan_out": any(map(is_conv1d, modules)),
                     "bias": "none", "modules_to_save": None, "init_weights": True, "layers_to_transform": None,
                     "inference_mode": True}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    if not config.get("save_projection", True):
        raise AdapterError("a VeRA adapter saved with save_projection=False: PEFT redraws its projections from "
                           "projection_prng_key with torch's generator, which jpeft does not; save it with "
                           "save_projection=True (the default)")
    if config.get("layers_to_transform") is not None:
        raise AdapterError("VeRA adapters with layers_to_transform are not supported; VeRA adapts whole layer stacks")
    method = VeRA(int(config["r"]), config["target_modules"], float(config.get("vera_dropout") or 0.0))
    refuse_tied_head(method.targets, modules, AdapterError)
    chosen = method.chosen(modules)
    d_in, d_out = largest(modules, chosen)
    shared_a, shared_b = tensors.take(SHARED_A).T, tensors.take(SHARED_B).T
    tensors.fits(SHARED_A, shared_a.T.shape, (method.rank, d_in))
    tensors.fits(SHARED_B, shared_b.T.shape, (d_out, method.rank))
    out = method.attach(modules, chosen, jnp.asarray(shared_a), jnp.asarray(shared_b))
    for path in chosen:
        leaves = dict(out[path])
        vectors = {leaf: layer_rows(path, leaves[leaf]) for leaf in method.trainable}
        for i, name in enumerate(module_layers(path, leaves)):
            for leaf, vec in vectors.items():
                got = tensors.take(f"{name}.{leaf}")
                tensors.fits(f"{name}.{leaf}", got.shape, vec.shape[-1:])
                vec[i] = got
            leaves.update(saved_base_weight(tensors, name, modules[path]))  # PEFT saves a targeted head whole
        out[path] = {**leaves, **{leaf: from_layer_rows(path, vec) for leaf, vec in vectors.items()}}
    return out
