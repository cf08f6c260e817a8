"""Norm tuning: train only the scales of the normalisation layers (RMSNorm / LayerNorm).

No new leaves: the mask picks the `scale` of every module whose name ends in `norm` (GPT-2's: `ln_*`, MPT's:
`norm_*`).
Parameters: hidden size per norm (two per layer plus the final norm for Llama). Its adapter dir is PEFT's
LN tuning (`LN_TUNING`): each trained norm module whole, under `<module>.ln_tuning_layers.` (a LayerNorm's
bias too, which PEFT trains and jpeft keeps as the base has it).
"""
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError
from jpeft.peft.base import (Method, exact_targets, from_layer_rows, hf_module, layer_rows, leading, module_layers,
                             module_names, targeted_layers)

LEAVES = {"scale": "weight", "bias": "bias"}  # a norm's leaves and torch's names for them


class NormTuning(Method):
    name = "norm"
    peft_type = "LN_TUNING"

    def __repr__(self):
        return "NormTuning()"

    def mask(self, params):
        return T.map_with_path(lambda p, _: p.endswith("/scale") and _is_norm(p.split("/")[-2]), params)


def _is_norm(module: str) -> bool:
    return module.endswith("norm") or module.startswith(("ln_", "norm_"))


def _norms(grouped: dict):
    """(path, leaves, HF names of its layers) of every normalisation module of a grouped tree."""
    for path, leaves in grouped.items():
        if "scale" in leaves and _is_norm(path.rpartition("/")[2]):
            yield path, leaves, module_layers(path, leaves)


def targeted_mask(params, targets):
    """What PEFT's LN tuning trains of `params`: every leaf (scale and bias) of the norms `targets` picks."""
    picked = {path for path, _, names in _norms(T.modules(params)) if any(targeted_layers(path, len(names), targets))}
    return T.map_with_path(lambda p, _: p.rpartition("/")[0] in picked, params)


def to_peft(params, mask) -> tuple[dict, dict]:
    """PEFT's LN tuning tensors and config fields for the norms `mask` trains."""
    grouped, trained = T.modules(params), T.flatten(mask)
    tensors, adapted = {}, []
    for path, leaves, names in _norms(grouped):
        if not trained.get(f"{path}/scale"):
            continue
        for leaf in (leaf for leaf in LEAVES if leaf in leaves):
            for name, row in zip(names, layer_rows(path, leaves[leaf])):
                tensors[f"{name}.ln_tuning_layers.{LEAVES[leaf]}"] = row
        adapted += names
    if not adapted:
        raise AdapterError("save_adapter: NormTuning trains no normalisation layer of this tree")
    return tensors, {"target_modules": exact_targets(adapted, module_names(grouped)), "modules_to_save": None,
                     "exclude_modules": None, "inference_mode": True}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    """The tree's modules with each targeted norm's leaves read from a PEFT LN tuning file."""
    out = dict(modules)
    for path, leaves, names in _norms(modules):
        picked = targeted_layers(path, len(names), config["target_modules"])
        if not any(picked):
            continue
        if not all(picked):
            raise AdapterError(f"target_modules {config['target_modules']!r} pick only some layers of "
                               f"{hf_module(path)}; jpeft's norm tuning tunes whole layer stacks")
        loaded = dict(leaves)
        for leaf in (leaf for leaf in LEAVES if leaf in leaves):
            parts = []
            for name in names:
                key = f"{name}.ln_tuning_layers.{LEAVES[leaf]}"
                parts.append(tensors.take(key))
                tensors.fits(key, parts[-1].shape, leaves[leaf].shape[len(leading(path, leaves[leaf])):])
            loaded[leaf] = from_layer_rows(path, np.stack(parts), leaves[leaf].dtype)
        out[path] = loaded
    if all(out[p] is modules[p] for p in modules):
        raise AdapterError(f"target_modules {config['target_modules']!r} match no normalisation layer of the base "
                           f"model; its norms: {', '.join(sorted(hf_module(p) for p, _, _ in _norms(modules)))}")
    return out
