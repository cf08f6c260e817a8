"""IA3: learned vectors that rescale activations, with PEFT's semantics.

A targeted module scales its output (`ia3_out` [..., out], bias included); a module that is
also in `feedforward` scales its input instead (`ia3_in` [..., in]). Vectors start at one,
so the model is unchanged at init, and fold exactly into W (and b) on merge.
Parameters per targeted layer: out (or in, for feedforward modules).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import (Method, dense_layers, exact_targets, from_layer_rows, hf_module, is_conv1d,
                             layer_rows, leading, matches, module_layers, module_names, refuse_second_init,
                             saved_base_weight, targeted_layers)


class IA3(Method):
    name = "ia3"
    peft_type = "IA3"
    trainable = ("ia3_in", "ia3_out")
    axes = {"ia3_in": ("lead", "in"), "ia3_out": ("lead", "out")}

    def __init__(self, targets: Sequence[str] | str = ("k_proj", "v_proj", "down_proj"),
                 feedforward: Sequence[str] | str = ("down_proj",)):
        self.targets = targets if isinstance(targets, str) else tuple(targets)
        self.feedforward = feedforward if isinstance(feedforward, str) else tuple(feedforward)

    def __repr__(self):
        return f"IA3(targets={self.targets!r}, feedforward={self.feedforward!r})"

    def init(self, key, params):
        del key
        grouped = T.modules(params)
        found = []
        for path, leaves in grouped.items():
            if "kernel" not in leaves:
                continue
            lead, names = leading(path, leaves["kernel"]), module_layers(path, leaves)
            picked = targeted_layers(path, len(names), self.targets)
            if not any(picked):
                continue
            if not all(picked):
                raise JpeftError(f"IA3 targets {self.targets!r} pick only some layers of {hf_module(path)}; "
                                 "IA3 adapts whole layer stacks (use LoRA for layer selection)")
            refuse_second_init(self, path, leaves, self.trainable)
            is_ff = any(is_feedforward(name, self.feedforward) for name in names)
            d_in, d_out = leaves["kernel"].shape[-2:]
            name, size = ("ia3_in", d_in) if is_ff else ("ia3_out", d_out)
            grouped[path] = {**leaves, name: jnp.ones((*lead, size), jnp.float32)}
            found.append(path)
        if not found:
            raise JpeftError(f"IA3 targets {self.targets!r} match no dense layer; the dense layers: "
                             f"{dense_layers(grouped)}")
        return T.from_modules(grouped)

    @staticmethod
    def dense_input(leaves, x):
        return (x * leaves["ia3_in"]).astype(x.dtype) if "ia3_in" in leaves else x

    @staticmethod
    def dense_output(leaves, y):
        return (y * leaves["ia3_out"]).astype(y.dtype) if "ia3_out" in leaves else y

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        out = {k: v for k, v in leaves.items() if k not in cls.trainable}
        kernel = leaves["kernel"].astype(jnp.float32)
        if "ia3_in" in leaves:
            kernel = kernel * leaves["ia3_in"][..., :, None]
        else:
            kernel = kernel * leaves["ia3_out"][..., None, :]
            if "bias" in leaves:
                out["bias"] = (leaves["bias"] * leaves["ia3_out"]).astype(leaves["bias"].dtype)
        out["kernel"] = kernel.astype(leaves["kernel"].dtype)
        return out


def is_feedforward(name: str, entries: Sequence[str] | str) -> bool:
    """PEFT's rule for `feedforward_modules`: a string is a regex the whole module name matches; a list entry
    is a plain ending of it (T5's `o` picks `wo` too), not a dotted suffix as target_modules are."""
    return matches(name, entries) if isinstance(entries, str) else any(name.endswith(e) for e in entries)


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's `ia3_l` tensors: (1, in) for feedforward modules, (out, 1) for the others. The targets select
    exactly the adapted modules among the grouped `tree`'s, and the feedforward entries (a subset of them,
    which PEFT also matches as plain name endings) exactly the feedforward ones."""
    tensors, scaled, feedforward = {}, [], []
    for path, leaves in modules.items():
        ff = "ia3_in" in leaves
        layers = module_layers(path, leaves)
        for name, v in zip(layers, layer_rows(path, leaves["ia3_in" if ff else "ia3_out"])):
            tensors[f"{name}.ia3_l"] = v[None, :] if ff else v[:, None]
        (feedforward if ff else scaled).extend(layers)
    names = module_names(tree)
    ff_entries = exact_targets(feedforward, names, is_feedforward)
    entries = exact_targets(scaled, set(names) - set(feedforward))
    return tensors, {"target_modules": sorted({*entries, *ff_entries}), "feedforward_modules": ff_entries,
                     "fan_in_fan_out": any(map(is_conv1d, modules)),
                     "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    if config.get("layers_to_transform") is not None:
        raise AdapterError("IA3 adapters with layers_to_transform are not supported; IA3 adapts whole layer stacks")
    method = IA3(config["target_modules"], config.get("feedforward_modules") or ())
    out = method.init(None, T.from_modules(modules))
    grouped = T.modules(out)
    for path, leaves in grouped.items():
        for leaf in ("ia3_in", "ia3_out"):
            if leaf not in leaves:
                continue
            rows, base = layer_rows(path, leaves[leaf]), {}
            for name, row in zip(module_layers(path, leaves), rows):
                got = tensors.take(f"{name}.ia3_l")
                tensors.fits(f"{name}.ia3_l", got.shape, (1, row.size) if leaf == "ia3_in" else (row.size, 1))
                row[:] = got.reshape(-1)
                base = saved_base_weight(tensors, name, leaves)
            grouped[path] = {**leaves, **base, leaf: from_layer_rows(path, rows, leaves[leaf].dtype)}
    return grouped
