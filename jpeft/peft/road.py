"""RoAd (Liao et al., 2024): each targeted layer's output rotated and scaled in pairs, as PEFT's RoAd.

The output [..., out] (bias included) splits into groups of `group_size`; within a group, element i pairs with
element i + group_size/2, and each pair (y₁, y₂) becomes (c₁·y₁ − s₁·y₂, c₂·y₂ + s₂·y₁), an element's c = a cos θ
and s = a sin θ. `road_1` shares one (θ, a) between both elements of a pair, `road_2` gives each element its own,
`road_4` each element separate angles and scales for c and for s. θ = 0 and a = 1 leave the model unchanged;
the map is linear in the output, so it folds into W and b on merge.

The leaves keep the group in their shape, so the hook needs no option beside them: `road_theta` and `road_alpha`
are [..., out / g, g / 2] (road_1), [..., out / g, g] (road_2) or [..., out / g, 2, g] (road_4); PEFT's are the
same values flattened. Parameters per targeted layer: out (road_1), 2·out, 4·out.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import (Method, exact_targets, from_layer_rows, hf_module, layer_rows, leading, linear_stacks,
                             module_layers, module_names, refuse_second_init, target_option)

VARIANTS = ("road_1", "road_2", "road_4")


class RoAd(Method):
    name = "road"
    peft_type = "ROAD"
    trainable = ("road_theta", "road_alpha")  # replicated past the layer axis (`leaf_axes`' default)

    def __init__(self, targets: Sequence[str] | str = ("q_proj", "v_proj"), variant: str = "road_1",
                 group_size: int = 64):
        if variant not in VARIANTS:
            raise JpeftError(f"RoAd variant {variant!r}: one of {', '.join(VARIANTS)}")
        if group_size <= 0 or group_size % 2:
            raise JpeftError(f"RoAd group_size {group_size}: a positive even number (it pairs element i with "
                             "element i + group_size/2)")
        self.targets = target_option(targets)
        self.variant, self.group_size = variant, group_size

    def __repr__(self):
        return f"RoAd(targets={self.targets!r}, variant={self.variant!r}, group_size={self.group_size})"

    def init(self, key, params):
        del key
        grouped, g = T.modules(params), self.group_size
        for path in linear_stacks(self, grouped):
            leaves = grouped[path]
            out = leaves["kernel"].shape[-1]
            if out % g:
                raise JpeftError(f"RoAd on {hf_module(path)}: its {out} outputs do not split into groups of "
                                 f"method.group_size={g}; pick a group size that divides {out}")
            refuse_second_init(self, path, leaves, self.trainable)
            shape = (*leading(path, leaves["kernel"]), out // g, *{"road_1": (g // 2,), "road_2": (g,),
                                                                   "road_4": (2, g)}[self.variant])
            grouped[path] = {**leaves, "road_theta": jnp.zeros(shape, jnp.float32),
                             "road_alpha": jnp.ones(shape, jnp.float32)}
        return T.from_modules(grouped)

    @staticmethod
    def dense_output(leaves, y):
        first, second = pair_factors(leaves)
        return rotated(y, first, second).astype(y.dtype)

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        """W' and b' with each row rotated as an output is: R(xW + b) = x R(W) + R(b)."""
        out = {k: v for k, v in leaves.items() if k not in cls.trainable}
        kernel = leaves["kernel"]
        first, second = pair_factors(leaves)
        out["kernel"] = rotated(kernel.astype(jnp.float32), first[..., None, :, :, :],
                                second[..., None, :, :, :]).astype(kernel.dtype)
        if "bias" in leaves:
            out["bias"] = rotated(leaves["bias"].astype(jnp.float32), first, second).astype(leaves["bias"].dtype)
        return out


def variant_of(leaves: dict) -> tuple[str, int]:
    """A module's (variant, group size), read from its leaves' shapes: past the kernel's leading (layer)
    axes, road_4's have three, the others two, of which road_2's cover every output and road_1's half."""
    theta, kernel = leaves["road_theta"], leaves["kernel"]
    out, groups = kernel.shape[-1], theta.shape[kernel.ndim - 2]
    if theta.ndim - kernel.ndim == 1:
        return "road_4", out // groups
    return ("road_2", out // groups) if groups * theta.shape[-1] == out else ("road_1", out // groups)


def pair_factors(leaves: dict):
    """(a cos θ, a sin θ) of each output, [..., out / g, 2, g / 2]: the factors of an element and of the
    partner it is rotated with."""
    theta, alpha = leaves["road_theta"], leaves["road_alpha"]
    variant, _ = variant_of(leaves)
    if variant == "road_4":
        cos, sin = jnp.cos(theta[..., 0, :]) * alpha[..., 0, :], jnp.sin(theta[..., 1, :]) * alpha[..., 1, :]
    else:
        cos, sin = jnp.cos(theta) * alpha, jnp.sin(theta) * alpha
    if variant == "road_1":  # both halves of a group share their pairs' values
        return tuple(jnp.stack([f, f], axis=-2) for f in (cos, sin))
    return tuple(f.reshape(*f.shape[:-1], 2, f.shape[-1] // 2) for f in (cos, sin))


def rotated(y, first, second):
    """y [..., out] with each pair (y₁, y₂) of a group mapped to (first₁ y₁ − second₁ y₂, first₂ y₂ + second₂ y₁);
    `first`, `second` [..., out / g, 2, g / 2], broadcast against y's leading axes."""
    groups = y.reshape(*y.shape[:-1], first.shape[-3], 2, first.shape[-1])
    half_turn = jnp.stack([-groups[..., 1, :], groups[..., 0, :]], axis=-2)
    return (groups * first + half_turn * second).reshape(y.shape)


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's flat `road_theta` / `road_alpha` per layer; its variant and group size read from the leaves."""
    tensors, adapted, options = {}, [], set()
    for path, leaves in modules.items():
        options.add(variant_of(leaves))
        for leaf in RoAd.trainable:
            for name, row in zip(module_layers(path, leaves), layer_rows(path, leaves[leaf])):
                tensors[f"{name}.{leaf}"] = row.reshape(-1)
        adapted.extend(module_layers(path, leaves))
    if len(options) > 1:
        raise AdapterError(f"RoAd layers of different variants or group sizes ({sorted(options)}) cannot be one "
                           "PEFT adapter, whose config holds one of each")
    variant, group_size = options.pop()
    return tensors, {"variant": variant, "group_size": group_size, "init_weights": True,
                     "target_modules": exact_targets(adapted, module_names(tree)), "inference_mode": True,
                     "modules_to_save": None}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    method = RoAd(config["target_modules"], config.get("variant", "road_1"), int(config.get("group_size", 64)))
    grouped = T.modules(method.init(None, T.from_modules(modules)))
    for path, leaves in grouped.items():
        if not RoAd.present(leaves):
            continue
        for leaf in RoAd.trainable:
            rows = layer_rows(path, leaves[leaf])
            loaded = []
            for name, row in zip(module_layers(path, leaves), rows):
                got = tensors.take(f"{name}.{leaf}")
                tensors.fits(f"{name}.{leaf}", got.shape, (row.size,))
                loaded.append(got.reshape(row.shape))
            grouped[path] = {**grouped[path], leaf: from_layer_rows(path, loaded)}
    return T.from_modules(grouped)
