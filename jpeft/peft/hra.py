"""HRA (Yuan et al. 2024, Householder reflection adaptation): each adapted layer's weight times a chain of r
Householder reflections, with PEFT's semantics.

    y = x·(H·W),   H = H_{r−1} ⋯ H₁·H₀,   H_i = I − 2·u_i·u_iᵀ / ‖u_i‖²   [in, in]

The vectors are trained (`hra_u` [..., in, r], PEFT's tensor as it is). PEFT's init repeats each of r/2 random
vectors twice, so each pair of reflections cancels: the model unchanged at init (an odd r cannot start so, and
PEFT warns; nor can the Gram–Schmidt form below, whose pairs do not orthonormalise: jpeft warns of both). With `gram_schmidt` (PEFT's `apply_GS`) the vectors are orthonormalised (Gram–Schmidt) and H = I − 2·U·Uᵀ; jpeft marks that
variant by the metadata leaf `hra_gram_schmidt` beside them, so which one runs is static under jit. H·W is built
in every call by reflecting W's rows r times, O(r·in·out) (the `weight` insertion point; PEFT forms H whole first:
equal to float32 rounding). Whole layer stacks of Linear layers, as LoHa and OFT. Parameters: r·in per layer.
"""
from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp

from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import (RebuiltWeight, exact_targets, from_layer_rows, layer_rows, leading, linear_stacks,
                             linear_uniform, module_layers, module_names, refuse_tied_head, saved_base_weight,
                             target_option)

log = logging.getLogger("jpeft.peft")
GRAM_SCHMIDT = "hra_gram_schmidt"


class HRA(RebuiltWeight):
    name = "hra"
    peft_type = "HRA"
    trainable = ("hra_u",)
    metadata = (GRAM_SCHMIDT,)
    axes = {"hra_u": ("lead", "in", None), GRAM_SCHMIDT: ("lead",)}

    def __init__(self, rank: int = 8, targets: Sequence[str] | str = ("q_proj", "v_proj"), gram_schmidt: bool = False):
        if rank < 1:
            raise JpeftError(f"HRA rank must be >= 1, got {rank}")
        self.rank, self.targets, self.gram_schmidt = int(rank), target_option(targets), bool(gram_schmidt)

    def __repr__(self):
        return f"HRA(rank={self.rank}, targets={self.targets!r}, gram_schmidt={self.gram_schmidt})"

    def init(self, key, params):
        if self.rank % 2:
            log.warning(f"HRA rank {self.rank} is odd: its reflections cannot start in cancelling pairs, so the "
                        "model changes at init (as PEFT warns)")
        elif self.gram_schmidt:
            log.warning("HRA with gram_schmidt starts, as PEFT's does, from pairs of equal vectors, which Gram–Schmidt "
                        "cannot orthonormalise (each pair's second is the first): the model changes at init, by a "
                        "reflection that float rounding picks")
        return super().init(key, params)

    def init_module(self, key, path: str, leaves: dict) -> dict:
        """PEFT's init: r/2 kaiming-uniform vectors, each twice in a row (U(±1/√(r/2)) on torch's [in, r/2]); an odd
        r all random (U(±1/√r))."""
        lead, r, width = leading(path, leaves["kernel"]), self.rank, leaves["kernel"].shape[-2]
        if r % 2:
            u = linear_uniform(key, (*lead, width, r), r)
        else:
            u = jnp.repeat(linear_uniform(key, (*lead, width, r // 2), r // 2), 2, axis=-1)
        return {**leaves, "hra_u": u, **({GRAM_SCHMIDT: jnp.ones(lead, jnp.float32)} if self.gram_schmidt else {})}

    @staticmethod
    def weight(leaves, dtype=None):
        """H·W [..., in, out] in float32: W's rows reflected by H₀, then H₁, ..."""
        w = leaves["kernel"].astype(jnp.float32)
        u = leaves["hra_u"].astype(jnp.float32)
        if GRAM_SCHMIDT in leaves:  # H = I − 2·U·Uᵀ, U orthonormal
            q = orthonormal(u)
            w = w - 2 * q @ (jnp.swapaxes(q, -1, -2) @ w)
        else:
            u = u / jnp.linalg.norm(u, axis=-2, keepdims=True)
            for i in range(u.shape[-1]):
                ui = u[..., i:i + 1]
                w = w - 2 * ui @ (jnp.swapaxes(ui, -1, -2) @ w)
        return w if dtype is None else w.astype(dtype)


def orthonormal(u):
    """PEFT's Gram–Schmidt on the columns of u [..., in, r], in order."""
    columns = []
    for i in range(u.shape[-1]):
        c = u[..., i:i + 1]
        for q in columns:
            c = c - (jnp.swapaxes(q, -1, -2) @ c) * q
        columns.append(c / jnp.linalg.norm(c, axis=-2, keepdims=True))
    return jnp.concatenate(columns, axis=-1)


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's `hra_u` tensors as they are, and the config that adapts exactly these modules."""
    tensors, adapted, settings = {}, [], set()
    for path, leaves in modules.items():
        names = module_layers(path, leaves)
        tensors.update({f"{name}.hra_u": row for name, row in zip(names, layer_rows(path, leaves["hra_u"]))})
        settings.add((int(leaves["hra_u"].shape[-1]), GRAM_SCHMIDT in leaves))
        adapted += names
    if len(settings) != 1:
        raise AdapterError(f"save_adapter: the HRA modules differ in rank or apply_GS {sorted(settings)}; PEFT's HRA "
                           "config holds one of each")
    (rank, gram_schmidt), = settings
    return tensors, {"r": rank, "apply_GS": gram_schmidt, "target_modules": exact_targets(adapted, module_names(tree)),
                     "init_weights": True, "layers_to_transform": None, "layers_pattern": None, "bias": "none",
                     "modules_to_save": None, "exclude_modules": None, "inference_mode": True}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    if config.get("layers_to_transform"):
        raise AdapterError("HRA adapters with layers_to_transform are not supported; jpeft's HRA adapts whole layer "
                           "stacks")
    method = HRA(int(config["r"]), config["target_modules"], gram_schmidt=bool(config.get("apply_GS", False)))
    refuse_tied_head(method.targets, modules, AdapterError)
    out = dict(modules)
    for path in linear_stacks(method, modules):
        leaves = method.init_module(jax.random.key(0), path, modules[path])  # then filled from the file
        rows = layer_rows(path, leaves["hra_u"])
        for i, name in enumerate(module_layers(path, leaves)):
            got = tensors.take(f"{name}.hra_u")
            tensors.fits(f"{name}.hra_u", got.shape, rows[i].shape)
            rows[i] = got
            leaves.update(saved_base_weight(tensors, name, modules[path]))
        out[path] = {**leaves, "hra_u": from_layer_rows(path, rows)}
    return out
