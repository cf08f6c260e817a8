"""Adapter directories (adapter_config.json + adapter_model.safetensors), both ways.

Methods PEFT has (LoRA and its variants, VeRA, LoHa, LoKr, OFT, HRA, IA3, trainable tokens, prompt tuning, P-tuning,
prefix tuning, adaption prompts) are written with PEFT's key names and shapes (`base_model.model.<module>.lora_A.weight`,
`prompt_embeddings`, ...), so `peft.PeftModel.from_pretrained` reads what we write; each
method's file holds its own mapping (`to_peft(modules, tree)` / `from_peft`, found through the
method's `peft_type`; LoRA's is lora_format.py; `tree` is every module of the base, so `target_modules` select
exactly the adapted ones). Bottleneck adapters, which PEFT lacks, have their own `peft_type` and layout in
the same style (see `bottleneck.py`). Norm tuning trains base leaves, which only its mask tells apart, and is
written as PEFT's LN tuning; BitFit, which PEFT lacks, uses `peft_type` "JPEFT", `method` naming it, and the
trained tensors under their HF checkpoint names (as norm tuning did before: such dirs still load).
A classification head is saved with the adapter trained beside it: as PEFT's SEQ_CLS
`modules_to_save` (`score.weight`) where HF has the head, else in a JPEFT dir (`method`
"classifier") that nests the adapter's PEFT config. Loading is stricter than PEFT: a missing or
unexpected key, a shape that does not fit the base, or a config field jpeft cannot honour is an
error, never a warning.
"""
from __future__ import annotations

import json
import operator
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError, read_json
from jpeft.models.hf import hf_names
from jpeft.peft import adalora, classifier, lora_format, norm, saved_modules
from jpeft.peft.base import without_excluded
from jpeft.peft.lora import LoRA
from jpeft.peft.multi import ADAPTER_LEAVES, refuse_container
from jpeft.peft.registry import BY_NAME, METHODS

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# tensors that belong to no module of the base: prompt learning's one, VeRA's shared projections
UNPREFIXED = ("prompt_embeddings", "base_model.vera_")
CLASSES = {cls.peft_type: cls for cls in (*METHODS, norm.NormTuning) if getattr(cls, "peft_type", None)}
# peft_type -> its module's to_peft and from_peft (LoRA's in lora_format.py); AdaLoRA's from_peft alone (read as the
# LoRA it computes)
PEFT_FAMILIES = {**{t: sys.modules[cls.__module__] for t, cls in CLASSES.items()}, "LORA": lora_format,
                 "ADALORA": adalora}
# adapter_config fields that change the math; jpeft refuses rather than ignores them (modules_to_save
# only beyond a SEQ_CLS adapter's classification head). `fan_in_fan_out` only says how the torch base
# stores its weight (GPT-2's Conv1D): jpeft's kernels are [in, out] whatever the file.
UNHONOURED = {"modules_to_save": None, "layer_replication": None,
              "use_qalora": False,
              "lora_bias": False, "alora_invocation_tokens": None,
              # LoRA variants with leaves or base rewrites of their own (KaSA, BD-LoRA, VeLoRA, MonteCLoRA)
              "kasa_config": None, "use_bdlora": None, "velora_config": None, "monteclora_config": None}


class Tensors:
    """The adapter file's tensors by module name (PEFT's prefix dropped); `take` pops one, so
    what is left at the end was never used."""

    def __init__(self, tensors: dict, source: str):
        self.left = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
        self.source = source

    def take(self, key: str) -> np.ndarray:
        if key not in self.left:
            prefix, _, rest = key.partition(".")
            if rest in self.left:
                raise AdapterError(f"{self.source}: its modules are named without '{prefix}.' ('{rest}'): the "
                                   "adapter was trained on the headless base (transformers' AutoModel); jpeft loads "
                                   f"adapters of the model with its head, whose names start '{prefix}.'")
            raise AdapterError(f"{self.source}: missing key '{key}'; the adapter does not cover every module its "
                               "target_modules names (or it was trained on a different base model)")
        return self.left.pop(key)

    def fits(self, name: str, got: tuple, want: tuple) -> None:
        if tuple(got) != tuple(want):
            raise AdapterError(f"{self.source}: '{name}' has shape {tuple(got)}, which does not fit the base weight "
                               f"(expected {tuple(want)}); was the adapter trained on a different base model?")


def save_adapter(out_dir: str, params, base_model_name_or_path: str | None = None, method=None) -> None:
    """Write the adapter leaves of `params` as an adapter directory (PEFT's, where PEFT has the method).

    `method` is needed only for methods that train base leaves (BitFit, NormTuning, a LoRA with PEFT's `bias`):
    the tree alone cannot tell a trained bias from a base one. A tree with a classification head is saved
    with it (see `_classifier`).
    """
    refuse_container(params, "save_adapter")
    head = bool(classifier.split_head(params)[1])
    carries = not head and (method is None or carries_saved_modules(type(method)))
    if not carries and saved_modules.SavedModules.present_in(params):
        raise AdapterError("save_adapter: this tree holds modules saved whole (modules_to_save), which only the dir "
                           "of an adapter in PEFT's layout carries; save its adapter without method= (or merge it)")
    if head:
        tensors, config = _classifier(params)
    elif isinstance(method, norm.NormTuning):  # it trains base leaves, which only its mask tells apart
        tensors, config = _peft_layout(params, method.peft_type, *norm.to_peft(params, method.mask(params)))
    elif method is not None and not isinstance(method, tuple(CLASSES.values())):  # a method PEFT lacks
        tensors, config = _native(params, method)
    else:
        tensors, config = _peft(params, getattr(method, "bias", "none") != "none" and method)
    config["base_model_name_or_path"] = base_model_name_or_path
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def carries_saved_modules(method_class) -> bool:
    """Does the dir `save_adapter` writes for this method class carry PEFT's `modules_to_save`? (An adapter
    in PEFT's layout does; LN tuning's, which trains the base's own norms, and jpeft's native dirs do not.)"""
    return issubclass(method_class, tuple(CLASSES.values())) and not issubclass(method_class, norm.NormTuning)


def _peft(params, biased=None):
    """PEFT's tensors and adapter_config for the one PEFT adapter type the tree holds (with the base biases a
    `biased` LoRA trains)."""
    grouped = T.modules(jax.device_get(params))
    found = [t for t, cls in CLASSES.items() if any(cls.present(m) for m in grouped.values())]
    if found == ["LORA", "TRAINABLE_TOKENS"]:  # LoRA's trainable_token_indices: its dir carries the rows
        found = ["LORA"]
    if len(found) != 1:
        what = "no adapter leaves (call a method's .init first)" if not found else f"adapters of {found}"
        raise AdapterError(f"save_adapter: the parameter tree holds {what}; one adapter type is saved at a time")
    cls = CLASSES[found[0]]
    tensors, config = PEFT_FAMILIES[found[0]].to_peft({p: m for p, m in grouped.items() if cls.present(m)}, grouped)
    if any(saved_modules.SavedModules.present(m) for m in grouped.values()):
        saved, entries = saved_modules.write(grouped)
        tensors, config = {**tensors, **saved}, {**config, "modules_to_save": entries}
    if biased:
        biases = lora_format.biases_to_peft(grouped, T.flatten(biased.trained_biases(params)))
        tensors, config = {**tensors, **biases}, {**config, "bias": biased.bias}
    return _peft_layout(params, found[0], tensors, config)


def _peft_layout(params, peft_type: str, tensors: dict, config: dict):
    """PEFT's key prefix on the tensors, and its peft_type and task_type in the config."""
    tensors = {k if k.startswith(UNPREFIXED) else PREFIX + k: np.ascontiguousarray(v, np.float32)
               for k, v in tensors.items()}
    task = "SEQ_2_SEQ_LM" if {"encoder", "decoder"} <= set(params) else "CAUSAL_LM"
    return tensors, {"peft_type": peft_type, "task_type": task, **config}


def _classifier(params):
    """A head and the PEFT adapter trained with it (if any): PEFT's SEQ_CLS layout, the head saved as a
    module to save, where HF can hold the head; else jpeft's own dir, the adapter's config nested in it."""
    body, head = classifier.split_head(params)
    tensors = {PREFIX + k: v for k, v in classifier.head_tensors(head).items()}
    adapted = any(cls.present(m) for m in T.modules(body).values() for cls in CLASSES.values())
    adapter_tensors, adapter = _peft(body) if adapted else ({}, None)
    tensors.update(adapter_tensors)
    if adapter and classifier.hf_unsupported(head) is None:
        return tensors, {**adapter, "task_type": "SEQ_CLS", "modules_to_save": list(classifier.PEFT_HEAD_MODULES)}
    return tensors, {"peft_type": "JPEFT", "method": classifier.Classifier.name, **classifier.head_options(head),
                     "adapter": adapter}


def _native(params, method):
    mask = T.flatten(method.mask(params))
    tensors = {}
    for path, value in T.flatten(jax.device_get(params)).items():
        if mask[path]:
            parts = list(np.asarray(value)) if T.is_stacked(path) else [np.asarray(value)]
            for name, part in zip(hf_names(path, len(parts)), parts):
                tensors[name] = np.ascontiguousarray(part, np.float32)
    if not tensors:
        raise AdapterError(f"save_adapter: {method!r} trains no leaf of this tree")
    return tensors, {"peft_type": "JPEFT", "method": type(method).name,
                     "targets": list(getattr(method, "targets", ()) or ())}


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isdir(adapter_dir):
        what = "is a file, not an" if os.path.isfile(adapter_dir) else "no such"
        raise AdapterError(f"{adapter_dir}: {what} adapter directory (a PEFT adapter dir with adapter_config.json)")
    named = sorted(d for d in os.listdir(adapter_dir) if os.path.isfile(os.path.join(adapter_dir, d, CONFIG_FILE)))
    hint = f" (PEFT saves a named adapter in a subfolder: {', '.join(named)}; pass that folder)" if named else ""
    config = read_json(path, AdapterError, f"an adapter dir needs adapter_config.json{hint}")
    peft_type = config.get("peft_type")
    if peft_type not in (*PEFT_FAMILIES, "JPEFT"):
        raise AdapterError(f"{path}: peft_type {peft_type!r} is not supported; jpeft loads "
                           f"{', '.join(PEFT_FAMILIES)} adapters and its own (JPEFT)")
    if config.get("bias", "none") not in (("none", "all", "lora_only") if peft_type == "LORA" else ("none",)):
        raise AdapterError(f"{path}: bias={config.get('bias')!r} {peft_type} adapters are not supported; use "
                           "bias='none'")
    if config.get("task_type") == "SEQ_CLS" and peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING",
                                                                  "ADAPTION_PROMPT"):
        raise AdapterError(f"{path}: a {peft_type} adapter for sequence classification (task_type SEQ_CLS) is not "
                           "supported; jpeft reads classifiers trained with LoRA or IA3 beside the head")
    # what PEFT saves of a classifier, its head, jpeft reads as one; of a causal LM, whole modules (saved_modules)
    saved = config.get("task_type") != "SEQ_CLS" or set(config.get("modules_to_save") or ()) <= set(
        classifier.PEFT_HEAD_MODULES)
    for key, neutral in UNHONOURED.items():
        if key == "modules_to_save" and saved:
            continue
        if config.get(key, neutral) not in (neutral, [], {}):
            raise AdapterError(f"{path}: {key}={config[key]!r} cannot be honoured by jpeft; "
                               f"re-export the adapter with {key}={neutral!r}")
    return config


def adapter_mask(adapter_dir: str, params):
    """What the adapter dir trains, as a mask of `params` (the tree `load_adapter` gave): its own leaves
    (`trainable_mask`), or the base leaves a method trains in place, which only the dir's config names: PEFT's
    LN tuning its norms whole, as PEFT counts them; BitFit's and norm tuning's jpeft dirs their method's."""
    from jpeft.peft import trainable_mask
    config = read_adapter_config(adapter_dir)
    if config["peft_type"] == norm.NormTuning.peft_type:
        return norm.targeted_mask(params, without_excluded(config, T.modules(params), AdapterError)["target_modules"])
    if config["peft_type"] == "LORA" and config.get("bias", "none") != "none":  # the base biases it trained too
        return jax.tree.map(operator.or_, trainable_mask(params), LoRA(bias=config["bias"]).trained_biases(params))
    method = BY_NAME.get(config.get("method")) if config["peft_type"] == "JPEFT" else None
    if method is None or method is classifier.Classifier:
        return trainable_mask(params)
    return (method(targets=config["targets"]) if config.get("targets") else method()).mask(params)


def load_adapter(adapter_dir: str, base_params):
    """Add the leaves of an adapter dir to `base_params` (a plain base tree); a pure function."""
    refuse_container(base_params, "load_adapter")
    if held := sorted({T.leaf_name(p) for p in T.flatten(base_params)} & ADAPTER_LEAVES):
        raise AdapterError(f"load_adapter: the tree already holds adapter leaves ({', '.join(held)}), which would "
                           "stay active beside the loaded ones; load into the plain base tree, or keep several "
                           "adapters with jpeft.add_adapter")
    config = read_adapter_config(adapter_dir)
    weights_path = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.exists(weights_path):
        raise AdapterError(f"{weights_path}: not found (PyTorch .bin adapters are not read; re-save with safetensors)")
    try:
        tensors = Tensors(load_file(weights_path), weights_path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights_path}: unreadable safetensors file ({e})") from None
    if config["peft_type"] == "JPEFT" and config.get("method") == classifier.Classifier.name:
        adapter = config.get("adapter")
        loaded = _from_peft(adapter, tensors, base_params, adapter_dir) if adapter else base_params
        loaded = classifier.read_head(tensors, loaded, config.get("pooling", "last"), config.get("hidden"))
    elif config["peft_type"] == "JPEFT":
        loaded = _load_native(tensors, base_params)
    else:
        loaded = _from_peft(config, tensors, base_params, adapter_dir)
        if config.get("task_type") == "SEQ_CLS":
            loaded = classifier.read_head(tensors, loaded)
        elif config.get("modules_to_save"):
            loaded = T.from_modules(saved_modules.read(config["modules_to_save"], tensors, T.modules(loaded)))
    if tensors.left:
        keys = sorted(tensors.left)
        if any(k.startswith(("encoder.embed_tokens.", "decoder.embed_tokens.")) for k in keys):
            raise AdapterError(f"{weights_path}: LoRA on each T5 stack's embed_tokens ({', '.join(keys[:2])}); jpeft's "
                               "T5 has one token embedding (`shared`), which both stacks read, so it cannot adapt them apart")
        raise AdapterError(f"{weights_path}: unexpected keys that match no targeted module of the base model: "
                           f"{', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}; "
                           "was the adapter trained on a different base model?")
    return loaded


def _from_peft(config: dict, tensors: Tensors, base_params, adapter_dir: str):
    grouped = T.modules(base_params)
    try:
        config = without_excluded(config, grouped, AdapterError)
        return T.from_modules(PEFT_FAMILIES[config["peft_type"]].from_peft(config, tensors, grouped))
    except KeyError as e:
        raise AdapterError(f"{adapter_dir}: adapter_config.json lacks the field {e}") from None
    except AdapterError:
        raise
    except JpeftError as e:  # a method's own refusal of the config (VeRA's, LoHa's targets): an adapter's fault here
        raise AdapterError(str(e)) from None


def _load_native(tensors: Tensors, base_params):
    """Tensors named as in an HF checkpoint replace the matching leaves (or add a bias BitFit added)."""
    flat = T.flatten(base_params)
    shapes = {p: np.shape(v) for p, v in flat.items()}
    for path, shape in list(shapes.items()):
        if path.endswith("/kernel"):
            shapes.setdefault(path[: -len("kernel")] + "bias", (*shape[:-2], shape[-1]))
    for path, shape in shapes.items():
        names = hf_names(path, shape[0] if T.is_stacked(path) else 1)
        if not all(n in tensors.left for n in names):
            continue
        parts = [tensors.take(n) for n in names]
        array = np.stack(parts) if T.is_stacked(path) else parts[0]
        tensors.fits(names[0], array.shape, shape)
        flat[path] = jnp.asarray(array, flat[path].dtype if path in flat else jnp.float32)
    return T.unflatten(flat)
