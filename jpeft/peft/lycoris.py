"""What LoHa and LoKr share (PEFT's LyCORIS family): a dense weight's whole update ΔW, rebuilt in every call from
small trained factors and added to the weight before the product (the `weight` insertion point: one product with
x and one for its gradient, where PEFT's separate x·ΔW takes two more, equal to float32 rounding).

A subclass names its factor leaves (`trainable`, PEFT's tensor names, each transposed to jpeft's [in, out] side)
and its metadata (alpha / r per layer, ...), and gives `init_module` (PEFT's init), `delta` (ΔW [..., in, out] in
float32) and the config fields its files carry (`peft_options`, `from_config`). Whole layer stacks at one rank and
alpha; PEFT's training-time `rank_dropout` and `module_dropout` are not implemented.
"""
from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp

from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import (RebuiltWeight, exact_targets, from_layer_rows, layer_rows, linear_stacks, module_layers,
                             module_names, refuse_tied_head, saved_base_weight, target_option)

log = logging.getLogger("jpeft.peft")


class Lycoris(RebuiltWeight):
    def __init__(self, rank: int = 8, alpha: float = 8.0, targets: Sequence[str] | str = ("q_proj", "v_proj")):
        if rank < 1:
            raise JpeftError(f"{type(self).__name__} rank must be >= 1, got {rank}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.targets = target_option(targets)

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, alpha={self.alpha}, targets={self.targets!r})"

    def init_module(self, key, path: str, leaves: dict) -> dict:
        raise NotImplementedError

    @staticmethod
    def delta(leaves) -> jax.Array:
        raise NotImplementedError

    @classmethod
    def weight(cls, leaves, dtype=None):
        """W + ΔW, summed in float32."""
        w = leaves["kernel"].astype(jnp.float32) + cls.delta(leaves)
        return w if dtype is None else w.astype(dtype)

    @classmethod
    def peft_options(cls, modules: dict) -> dict:
        """The config fields beyond the shared ones that make PEFT build exactly these modules' factors."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> "Lycoris":
        raise NotImplementedError

    @classmethod
    def to_peft(cls, modules: dict, tree: dict) -> tuple[dict, dict]:
        """PEFT's tensors in torch's layout, and the config that adapts exactly these modules."""
        tensors, adapted = {}, []
        for path, leaves in modules.items():
            names = module_layers(path, leaves)
            for leaf in cls.trainable:
                if leaf in leaves:
                    tensors.update({f"{name}.{leaf}": row.T for name, row in zip(names, layer_rows(path, leaves[leaf]))})
            adapted += names
        return tensors, {**cls.peft_options(modules), "target_modules": exact_targets(adapted, module_names(tree)),
                         "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                         "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
                         "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "exclude_modules": None,
                         "inference_mode": True}

    @classmethod
    def from_peft(cls, config: dict, tensors, modules: dict) -> dict:
        name = cls.__name__
        for field in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
            if config.get(field):
                raise AdapterError(f"{name} adapters with {field} are not supported; jpeft's {name} adapts whole "
                                   "layer stacks at one rank and alpha")
        if config.get("rank_dropout") or config.get("module_dropout"):
            log.warning(f"this {name} adapter was trained with rank_dropout/module_dropout, which jpeft does not "
                        "implement: its outputs are the same (they act in training only), but training it further "
                        "runs without them")
        method = cls.from_config(config)
        chosen = linear_stacks(method, modules)
        refuse_tied_head(method.targets, modules, AdapterError)
        out = dict(modules)
        for path in chosen:
            leaves = method.init_module(jax.random.key(0), path, modules[path])  # then filled from the file
            factors = {leaf: layer_rows(path, leaves[leaf]) for leaf in cls.trainable if leaf in leaves}
            for i, layer in enumerate(module_layers(path, leaves)):
                found = sorted(leaf for leaf in cls.trainable if f"{layer}.{leaf}" in tensors.left)
                if found and found != sorted(factors):
                    raise AdapterError(f"{tensors.source}: {layer} holds {', '.join(found)}, where its config "
                                       f"({method!r}) makes {', '.join(sorted(factors))}")
                for leaf, rows in factors.items():
                    got = tensors.take(f"{layer}.{leaf}").T
                    tensors.fits(f"{layer}.{leaf}", got.T.shape, rows[i].T.shape)
                    rows[i] = got
                leaves.update(saved_base_weight(tensors, layer, modules[path]))
            out[path] = {**leaves, **{leaf: from_layer_rows(path, rows) for leaf, rows in factors.items()}}
        return out


def one_setting(name: str, settings: set) -> tuple:
    """The one (rank, alpha, ...) all of a method's modules share: PEFT's config holds one."""
    if len(settings) != 1:
        raise AdapterError(f"save_adapter: the {name} modules have different ranks or alphas {sorted(settings)}; "
                           f"PEFT's {name} config holds one of each")
    return next(iter(settings))
