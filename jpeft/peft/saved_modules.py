"""PEFT's `modules_to_save`: whole modules an adapter dir carries beside its adapter (typically the LM head and the
token embedding, trained with the adapter after new tokens were added), saved under their checkpoint names.

A marked module (`modules_to_save(params, entries)`, or one read from a dir, whose weights replace the base's)
keeps a mark beside its weights (`saved_module` [...], metadata), so `trainable_mask` trains them and
`count_parameters` counts them as PEFT does, `save_adapter` writes them into the dir, and `merge` keeps them and
drops the mark. PEFT picks a module whose name ends with an entry (a plain string ending). A tied head cannot
hold one apart from the embedding (PEFT's copy of either unties them): refused.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError
from jpeft.peft.base import Method, exact_targets, hf_module, is_conv1d, leading, module_layers, module_names
from jpeft.peft.trainable_tokens import INPUT_EMBEDDINGS

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


def selected(entries, modules: dict) -> list[str]:
    """Paths of the modules `entries` names (whole layer stacks), or an error saying why it names none."""
    entries = list(entries)
    if "lm_head" not in modules and any(_ends(name, entries) for name in ("lm_head", *INPUT_EMBEDDINGS)):
        raise AdapterError(f"modules_to_save {entries} names the head or the token embedding of a model that "
                           "ties them (tie_word_embeddings): PEFT's saved copy unties them, which jpeft's tied model "
                           "cannot hold; merge the adapter with PEFT (merge_and_unload) and load that checkpoint")
    paths = []
    for path, leaves in modules.items():
        picked = [_ends(name, entries) for name in module_layers(path, leaves)]
        if any(picked) and not all(picked):
            raise AdapterError(f"modules_to_save {entries} names only some layers of {hf_module(path)}; "
                               "jpeft keeps a layer stack whole")
        if any(picked):
            paths.append(path)
    if not paths:
        raise AdapterError(f"modules_to_save {entries} names no module of this base")
    return paths


def _marked(leaves: dict, path: str) -> dict:
    return {**leaves, MARK: jnp.ones(leading(path, next(iter(leaves.values()))), jnp.float32)}


def modules_to_save(params, entries):
    """`params` with the modules `entries` names (PEFT's `modules_to_save`, e.g. ["lm_head"]) trained whole beside
    the adapter, in float32, and saved in its dir; init the adapter first, on the other modules."""
    from jpeft.peft.registry import METHODS  # not at the top: the registry imports this module
    adapter_leaves = {n for m in METHODS for n in (*m.trainable, *m.metadata, *m.stored)}
    grouped = T.modules(params)
    for path in selected(entries, grouped):
        if held := sorted(set(grouped[path]) & adapter_leaves):
            raise AdapterError(f"modules_to_save: {hf_module(path)} holds adapter leaves ({', '.join(held)}); a "
                               "module either trains whole or carries an adapter: leave it out of one of them")
        grouped[path] = _marked({k: v.astype(jnp.float32) for k, v in grouped[path].items()}, path)
    return T.from_modules(grouped)


def selected_mask(params, entries):
    """Bool tree: True on the weights of the modules `entries` names (what `modules_to_save` makes trained)."""
    paths = set(selected(entries, T.modules(params))) if entries else set()
    return T.map_with_path(lambda p, _: p.rpartition("/")[0] in paths and T.leaf_name(p) != MARK, params)


def read(entries, tensors, modules: dict) -> dict:
    """The grouped tree with the dir's saved modules in place of the base's, marked."""
    from jpeft.models.hf import hf_names  # not at the top: jpeft.models imports jpeft.peft
    out = dict(modules)
    for path in selected(entries, modules):
        leaves, replaced = modules[path], {}
        names = module_layers(path, leaves)
        for leaf, value in leaves.items():
            keys = hf_names(f"{path}/{leaf}", len(names))
            rows = [tensors.take(k) for k in keys]
            if leaf == "kernel" and not is_conv1d(path):  # torch's Linear is [out, in]
                rows = [row.T for row in rows]
            array = np.stack(rows) if leading(path, value) else rows[0]
            tensors.fits(keys[0], array.shape, np.shape(value))
            replaced[leaf] = jnp.asarray(array, value.dtype)
        out[path] = _marked(replaced, path)
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
            torch_layout = leaf == "kernel" and not is_conv1d(path)
            for key, row in zip(hf_names(f"{path}/{leaf}", len(names)), rows):
                tensors[key] = np.ascontiguousarray(row.T if torch_layout else row)
        saved += names
    entries = exact_targets(saved, module_names(grouped), selects=lambda name, suffix: _ends(name, suffix))
    return tensors, entries


def trained(params) -> set[str]:
    """Paths of the leaves of marked modules (their weights), which PEFT trains and counts."""
    return {f"{path}/{leaf}" for path, leaves in T.modules(params).items() if MARK in leaves
            for leaf in leaves if leaf != MARK}
