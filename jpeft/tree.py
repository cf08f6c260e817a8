"""Path-aware helpers for nested-dict parameter trees.

Paths are '/'-joined dict keys (``model/layers/self_attn/q_proj/kernel``), so a
selection, a partition or a count reads the tree itself, never a side registry.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
import numpy as np

Tree = dict[str, Any]

def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """{'a/b/c': leaf} for a nested dict; the inverse of `unflatten`."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict[str, Any]) -> Tree:
    tree: Tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def map_with_path(fn: Callable[[str, Any], Any], tree: Tree) -> Tree:
    """Apply fn(path, leaf) to every leaf, keeping the structure."""
    return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def named(tree: Tree, names) -> Tree:
    """Bool tree: True on leaves whose own name is in `names`."""
    return map_with_path(lambda p, _: leaf_name(p) in names, tree)


def select(tree: Tree, pattern: str | Iterable[str]) -> Tree:
    """Bool tree: True where the path matches a regex (re.search) in pattern."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return map_with_path(lambda p, _: any(re.search(q, p) for q in patterns), tree)


def partition(tree: Tree, mask: Tree) -> tuple[Tree, Tree]:
    """Split into (selected, rest) sparse trees; `combine` puts them back."""
    flat, flat_mask = flatten(tree), flatten(mask)
    chosen = {p: v for p, v in flat.items() if flat_mask[p]}
    rest = {p: v for p, v in flat.items() if not flat_mask[p]}
    return unflatten(chosen), unflatten(rest)


def combine(*trees: Tree) -> Tree:
    merged: dict[str, Any] = {}
    for t in trees:
        merged.update(flatten(t))
    return unflatten(merged)


def count(tree: Tree) -> int:
    """Number of scalars (`jpeft.count_parameters` counts the way PEFT does)."""
    return sum(int(np.prod(np.shape(v))) for v in flatten(tree).values())


# The scanned layer stacks, named as the HF module lists they stand for (Llama's `layers`, T5's `block`,
# GPT-2's `h`, MPT's `blocks`).
STACKS = ("layers", "block", "h", "blocks")


def is_stacked(path: str) -> bool:
    """Leaves under a stack carry a leading per-layer axis (the scanned layer stack)."""
    return any(part in STACKS for part in path.split("/")[:-1])


def unstack(tree: Tree) -> Tree:
    """Each stack's layers as subtrees of their own: `model/layers/mlp/...` [L, ...] -> `model/layers/{i}/mlp/...`
    (the layout `layers.Unrolled` reads)."""
    flat = {}
    for path, value in flatten(tree).items():
        parts = path.split("/")
        at = next((i for i, part in enumerate(parts[:-1]) if part in STACKS), None)
        if at is None:
            flat[path] = value
            continue
        for layer in range(value.shape[0]):
            flat["/".join([*parts[:at + 1], str(layer), *parts[at + 1:]])] = value[layer]
    return unflatten(flat)


def modules(tree: Tree) -> dict[str, dict[str, Any]]:
    """{'model/layers/self_attn/q_proj': {'kernel': ..., 'lora_a': ...}}: leaves grouped by their module."""
    grouped: dict[str, dict[str, Any]] = {}
    for path, value in flatten(tree).items():
        module, _, name = path.rpartition("/")
        grouped.setdefault(module, {})[name] = value
    return grouped


def from_modules(grouped: dict[str, dict[str, Any]]) -> Tree:
    return unflatten({f"{m}/{n}": v for m, leaves in grouped.items() for n, v in leaves.items()})


def shapes(tree: Tree) -> Tree:
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
