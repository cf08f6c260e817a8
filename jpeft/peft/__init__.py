"""Adapter methods, each a pure transform of the parameter tree, and the tree-wide operations
(mask, count, merge, freeze) as unions over the method registry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jpeft import tree as T
from jpeft.errors import JpeftError
from jpeft.peft.bitfit import BitFit
from jpeft.peft.bottleneck import Bottleneck
from jpeft.peft.classifier import Classifier, classify
from jpeft.peft.full import Full
from jpeft.peft.hra import HRA
from jpeft.peft.ia3 import IA3
from jpeft.peft.lora import LoRA
from jpeft.peft.llama_adapter import LlamaAdapter
from jpeft.peft.multi import refuse_container
from jpeft.peft.norm import NormTuning
from jpeft.peft.oft import OFT
from jpeft.peft.p_tuning import PTuning
from jpeft.peft.prefix import PrefixTuning
from jpeft.peft.prompt import PromptTuning, select_task
from jpeft.peft.qlora import QLoRA, merge_note
from jpeft.peft.road import RoAd
from jpeft.peft.trainable_tokens import TrainableTokens
from jpeft.peft import saved_modules
from jpeft.peft.saved_modules import modules_to_save
from jpeft.peft.registry import BY_NAME, HEAD_MODULES, METHODS
from jpeft.peft.loha import LoHa
from jpeft.peft.lokr import LoKr
from jpeft.peft.vera import VeRA

TRAINABLE_LEAVES = frozenset(n for m in METHODS for n in m.trainable)
METADATA_LEAVES = frozenset(n for m in METHODS for n in m.metadata)
_OWNER = {n: m for m in METHODS for n in (*m.trainable, *m.metadata, *m.stored)}


def leaf_axes(name: str, weight_axes: tuple | None, ndim: int, stacked: bool = False) -> tuple:
    """Logical axes of an adapter leaf, derived from those of the weight it modifies: `in`/`out`
    are the weight's input/output axes, `lead` its stacked-layer axis; a leaf in a module without
    a weight (a prefix, a soft prompt, a bottleneck adapter) names logical axes itself, `lead`
    being `layers` when stacked. Unknown shapes replicate past the leading axes they have (a LoRA's
    per-layer scale beside a mixture's [layers, experts, out, in] weight: `layers`)."""
    if weight_axes is None:
        lead, d_in, d_out = ["layers"] if stacked else [], None, None
    else:
        *lead, d_in, d_out = weight_axes
    spec = _OWNER[name].axes.get(name) if name in _OWNER else ("lead", "out")  # e.g. a bias BitFit added
    words = {"in": [d_in], "out": [d_out], "lead": lead, None: [None]}
    axes = tuple(a for word in spec or () for a in words.get(word, [word]))
    return axes if len(axes) == ndim else (*lead, *[None] * ndim)[:ndim]


def trainable_mask(params):
    """Bool tree: True exactly on adapter leaves, on a head's leaves but its metadata (what every method trains)
    and on the weights of modules an adapter dir saves whole (PEFT's modules_to_save). A head is matched by its
    top-level module, so a base `kernel` never is."""
    saved = saved_modules.trained(params)

    def trained(path, _):
        name = T.leaf_name(path)
        return (name in TRAINABLE_LEAVES or path in saved
                or (path.split("/", 1)[0] in HEAD_MODULES and name not in METADATA_LEAVES))
    return T.map_with_path(trained, params)


def merge(params):
    """Fold every adapter into the base weights: a plain tree an HF checkpoint can hold."""
    refuse_container(params, "merge")
    merge_note(params)
    grouped = T.modules(params)
    for path, leaves in grouped.items():
        for method in METHODS:
            if method.present(leaves):
                leaves = method.merge(leaves)
        grouped[path] = leaves
    return T.from_modules(grouped)


def count_parameters(params, mask=None) -> tuple[int, int]:
    """(trainable, total) as PEFT counts them: metadata leaves never, a quantized weight by its
    logical size, a partly adapted layer stack by its adapted layers; mask defaults to `trainable_mask`."""
    flat_mask = _mask_of(params, mask, "count_parameters")
    trainable = total = 0
    for path, leaves in T.modules(params).items():
        for name in leaves:
            owner = _OWNER.get(name)
            n = 0 if name in METADATA_LEAVES else owner.count(leaves, name) if owner else T.count({name: leaves[name]})
            total += n
            trainable += n if flat_mask[f"{path}/{name}"] else 0
    return trainable, total


def parameter_report(params, mask=None) -> str:
    """PEFT's print_trainable_parameters line."""
    trainable, total = count_parameters(params, mask)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def freeze(tx: optax.GradientTransformation, params, mask=None) -> optax.GradientTransformation:
    """`tx` on the trainable leaves only, for a user's own `jax.grad` over the whole tree.

    Frozen leaves get zero updates and no optimizer state. (jpeft's trainer goes further: it
    differentiates only the trainable partition, so frozen gradients are never computed.)
    """
    flat_mask = _mask_of(params, mask, "freeze")
    if not any(flat_mask.values()):
        raise JpeftError("freeze: no leaf of this tree is trainable; a method that trains base leaves (Full, BitFit, "
                         "NormTuning) needs its mask: freeze(tx, params, method.mask(params))")
    labels = T.map_with_path(lambda p, _: "train" if flat_mask[p] else "freeze", params)
    return optax.multi_transform({"train": tx, "freeze": optax.stateless(_zeros_like_params)}, labels)


def _zeros_like_params(updates, params):
    """Zero updates in each frozen leaf's own dtype: a QLoRA code's gradient (`jax.grad(..., allow_int=True)`)
    is float0, which optax.apply_updates cannot add to it."""
    if params is None:
        return jax.tree.map(jnp.zeros_like, updates)
    return jax.tree.map(lambda _, p: jnp.zeros_like(p), updates, params)


def _mask_of(params, mask, what: str) -> dict:
    """The flat mask for `params` (`trainable_mask` by default), or an error where it was made for another tree."""
    if mask is None:  # every stored adapter's leaves would count as trained: pick the one to train
        refuse_container(params, what)
    flat_mask = T.flatten(trainable_mask(params) if mask is None else mask)
    if missing := sorted(set(T.flatten(params)) - set(flat_mask)):
        raise JpeftError(f"{what}: the mask does not fit this tree (no entry for {missing[0]}"
                         f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); compute it on the "
                         "initialised tree: method.mask(method.init(key, params))")
    return flat_mask


__all__ = ["leaf_axes", "LoRA", "QLoRA", "VeRA", "LoHa", "LoKr", "OFT", "HRA", "IA3", "RoAd", "TrainableTokens", "BitFit", "NormTuning", "Full", "PromptTuning", "PTuning", "PrefixTuning",
           "LlamaAdapter", "select_task", "Bottleneck", "Classifier", "classify", "BY_NAME", "trainable_mask", "merge",
           "count_parameters", "parameter_report", "freeze", "modules_to_save"]
