"""HF PEFT adapter directories (adapter_config.json + adapter_model.safetensors), both ways.

Key names and shapes are PEFT's own (`base_model.model.<module>.lora_A.weight`, A as
[r, in], B as [out, r]), so `peft.PeftModel.from_pretrained` reads what we write.
Loading is stricter than PEFT: a missing or unexpected key, a shape that does not fit
the base, or a config field jpeft cannot honour is an error, never a warning.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jpeft import tree as T
from jpeft.errors import AdapterError, read_json
from jpeft.models.hf import is_stacked
from jpeft.peft.lora import matches, module_name

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
LAYER = re.compile(r"^(.*)\.layers\.(\d+)\.(.*)$")
# adapter_config fields that change the math; jpeft refuses rather than ignores them.
UNHONOURED = {"use_dora": False, "fan_in_fan_out": False, "layers_to_transform": None,
              "modules_to_save": None, "layer_replication": None, "target_parameters": None,
              "trainable_token_indices": None, "use_qalora": False, "exclude_modules": None}


def _hf_modules(path: str, num_layers: int) -> list[str]:
    """Per-layer HF module names for a tree module path."""
    name = module_name(path + "/x")
    if is_stacked(path + "/x"):
        return [name.replace(".layers.", f".layers.{i}.", 1) for i in range(num_layers)]
    return [name]


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module-name suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def save_adapter(out_dir: str, params, base_model_name_or_path: str | None = None) -> None:
    """Write the LoRA leaves of `params` as an HF PEFT adapter directory."""
    flat = T.flatten(jax.device_get(params))
    modules = [p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a")]
    if not modules:
        raise AdapterError("save_adapter: the parameter tree holds no LoRA leaves (call LoRA(...).init first)")
    tensors, ranks, alphas, dropouts = {}, {}, {}, set()
    for mod in modules:
        a, b = np.asarray(flat[mod + "/lora_a"], np.float32), np.asarray(flat[mod + "/lora_b"], np.float32)
        scale = np.asarray(flat[mod + "/lora_scale"]).reshape(-1)[0]
        rank = a.shape[-1]
        leaf = mod.rsplit("/", 1)[-1]
        ranks[leaf], alphas[leaf] = rank, float(scale) * rank
        dropouts.add(float(np.asarray(flat.get(mod + "/lora_dropout", 0.0)).reshape(-1)[0]))
        layers = a.shape[0] if a.ndim == 3 else 1
        for i, name in enumerate(_hf_modules(mod, layers)):
            a_i, b_i = (a[i], b[i]) if a.ndim == 3 else (a, b)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_i.T)
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks), "lora_dropout": max(dropouts),
        "rank_pattern": {k: r for k, r in ranks.items() if r != rank},
        "alpha_pattern": {k: a for k, a in alphas.items() if a != alpha},
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isdir(adapter_dir):
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    config = read_json(path, AdapterError, "an HF PEFT adapter dir needs adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; "
                           "jpeft loads LORA adapters")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{path}: bias={config.get('bias')!r} adapters are not supported; use bias='none'")
    for key, neutral in UNHONOURED.items():
        if config.get(key, neutral) not in (neutral, [], {}):
            raise AdapterError(f"{path}: {key}={config[key]!r} cannot be honoured by jpeft; "
                               f"re-export the adapter with {key}={neutral!r}")
    return config


def load_adapter(adapter_dir: str, base_params):
    """Add the LoRA leaves of a PEFT adapter dir to `base_params` (a plain base tree)."""
    config = read_adapter_config(adapter_dir)
    weights_path = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.exists(weights_path):
        raise AdapterError(f"{weights_path}: not found (PyTorch .bin adapters are not read; re-save with safetensors)")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights_path}: unreadable safetensors file ({e})") from None
    flat = T.flatten(base_params)
    targets = config["target_modules"]
    remaining = dict(tensors)
    for path in [p for p in flat if p.endswith("/kernel")]:
        mod = path[: -len("/kernel")]
        kernel = flat[path]
        layers = kernel.shape[0] if is_stacked(path) else 1
        names = _hf_modules(mod, layers)
        if not all(matches(n, targets) for n in names):
            continue
        a_list, b_list = [], []
        for name in names:
            a = _take(remaining, f"{PREFIX}{name}.lora_A.weight", weights_path)
            b = _take(remaining, f"{PREFIX}{name}.lora_B.weight", weights_path)
            d_in, d_out = kernel.shape[-2:]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"{weights_path}: '{name}' has lora_A {a.shape} / lora_B {b.shape}, which does not fit the "
                    f"base weight (in={d_in}, out={d_out}); was the adapter trained on a different base model?")
            a_list.append(a.T), b_list.append(b.T)
            base_key = f"{PREFIX}{name}.base_layer.weight"
            if base_key in remaining:  # PEFT saves targeted embedding/LM-head weights too
                if layers != 1 or remaining[base_key].shape != kernel.shape[::-1]:
                    raise AdapterError(f"{weights_path}: '{base_key}' does not fit the base weight {kernel.shape}")
                flat[path] = jnp.asarray(remaining.pop(base_key).T, kernel.dtype)
        rank = a_list[0].shape[1]
        leaf = names[0]
        expected_rank = _pattern_value(config.get("rank_pattern") or {}, leaf, config["r"])
        if rank != expected_rank:
            raise AdapterError(f"{weights_path}: '{leaf}' has rank {rank} but adapter_config.json says "
                               f"{expected_rank}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, leaf, config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        stack = (lambda xs: np.stack(xs)) if is_stacked(path) else (lambda xs: xs[0])
        lead = (layers,) if is_stacked(path) else ()
        flat[mod + "/lora_a"] = jnp.asarray(stack(a_list), jnp.float32)
        flat[mod + "/lora_b"] = jnp.asarray(stack(b_list), jnp.float32)
        flat[mod + "/lora_scale"] = jnp.full(lead, scale, jnp.float32)
    if remaining:
        raise AdapterError(f"{weights_path}: unexpected keys that match no targeted module of the base model: "
                           f"{', '.join(sorted(remaining)[:5])}{' ...' if len(remaining) > 5 else ''}; "
                           "was the adapter trained on a different base model?")
    if not any(p.endswith("/lora_a") for p in flat):
        raise AdapterError(f"{adapter_dir}: target_modules {targets!r} match no module of the base model")
    return T.unflatten(flat)


def _take(tensors: dict, key: str, source: str) -> np.ndarray:
    if key not in tensors:
        raise AdapterError(f"{source}: missing key '{key}'; the adapter does not cover every module its "
                           "target_modules names (or it was trained on a different base model)")
    return tensors.pop(key)
