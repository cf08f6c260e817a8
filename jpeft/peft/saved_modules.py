"""PEFT's `modules_to_save`: whole modules an adapter dir carries beside its adapter (typically the LM head and the
token embedding, trained with the adapter after new tokens were added), saved under their checkpoint names.

Read from a dir, they replace the base's weights and keep a mark beside them (`saved_module` [...], metadata), so
`save_adapter` writes them back, `trainable_mask` and `count_parameters` count them trained as PEFT does, and
`merge` keeps them and drops the mark. PEFT picks a module whose name ends with an entry (a plain string
ending). A tied head cannot hold one apart from the embedding (PEFT's copy of either unties them): refused.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError
from jpeft.peft.base import CONV1D, Method, exact_targets, hf_module, leading, module_layers, module_names

MARK = "saved_module"


class SavedModules(Method):
    name = "modules_to_save"
    metadata = (MARK,)
    axes = {MARK: ("lead",)}

    @classmethod
    def present(cls, leaves: dict) -> bool:
        return MARK in leaves

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        return {k: v for k, v in leaves.items() if k != MARK}


def _ends(name: str, entries) -> bool:
    return any(name.endswith(entry) for entry in entries)


def read(entries, tensors, modules: dict) -> dict:
    """The grouped tree with the dir's saved modules in place of the base's, marked."""
    from jpeft.models.hf import hf_names  # not at the top: jpeft.models imports jpeft.peft
    if "lm_head" not in modules and any(_ends(name, entries) for name in ("lm_head", "embed_tokens", "wte", "shared")):
        raise AdapterError(f"modules_to_save {list(entries)} names the head or the token embedding of a model that "
                           "ties them (tie_word_embeddings): PEFT's saved copy unties them, which jpeft's tied model "
                           "cannot hold; merge the adapter with PEFT (merge_and_unload) and load that checkpoint")
    out, found = dict(modules), False
    for path, leaves in modules.items():
        names = module_layers(path, leaves)
        picked = [_ends(name, entries) for name in names]
        if not any(picked):
            continue
        if not all(picked):
            raise AdapterError(f"modules_to_save {list(entries)} names only some layers of {hf_module(path)}; "
                               "jpeft keeps a layer stack whole")
        replaced = {}
        for leaf, value in leaves.items():
            keys = hf_names(f"{path}/{leaf}", len(names))
            rows = [tensors.take(k) for k in keys]
            if leaf == "kernel" and path.rpartition("/")[2] not in CONV1D:  # torch's Linear is [out, in]
                rows = [row.T for row in rows]
            array = np.stack(rows) if leading(path, value) else rows[0]
            tensors.fits(keys[0], array.shape, np.shape(value))
            replaced[leaf] = jnp.asarray(array, value.dtype)
        out[path] = {**replaced, MARK: jnp.ones(leading(path, next(iter(leaves.values()))), jnp.float32)}
        found = True
    if not found:
        raise AdapterError(f"modules_to_save {list(entries)} names no module of this base")
    return out


def write(grouped: dict) -> tuple[dict, list[str]]:
    """The marked modules' weights under their checkpoint names, and PEFT's `modules_to_save` entries for them."""
    from jpeft.models.hf import hf_names
    tensors, saved = {}, []
    for path, leaves in grouped.items():
        if MARK not in leaves:
            continue
        names = module_layers(path, leaves)
        for leaf, value in leaves.items():
            if leaf == MARK:
                continue
            rows = np.asarray(value, np.float32) if leading(path, value) else np.asarray(value, np.float32)[None]
            torch_layout = leaf == "kernel" and path.rpartition("/")[2] not in CONV1D
            for key, row in zip(hf_names(f"{path}/{leaf}", len(names)), rows):
                tensors[key] = np.ascontiguousarray(row.T if torch_layout else row)
        saved += names
    entries = exact_targets(saved, module_names(grouped), selects=lambda name, suffix: _ends(name, suffix))
    return tensors, entries


def trained(params) -> set[str]:
    """Paths of the leaves of marked modules (their weights), which PEFT trains and counts."""
    return {f"{path}/{leaf}" for path, leaves in T.modules(params).items() if MARK in leaves
            for leaf in leaves if leaf != MARK}
