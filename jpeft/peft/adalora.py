"""PEFT's AdaLoRA adapter dirs, read as the LoRA they compute.

AdaLoRA trains an SVD-shaped LoRA, ΔW = B·diag(E)·A · alpha / (init_r + 1e-5), and prunes the singular
values E while training; its dir keeps each module's surviving rows (`rank_pattern`: per module, which of
`init_r` survived), so ranks differ between layers. Loaded, each module becomes jpeft LoRA leaves:
`lora_a` = (A ⊙ E)ᵀ and `lora_b` = Bᵀ zero-padded to the stack's largest rank (padding changes nothing),
`lora_scale` PEFT's scaling per layer: alpha (the kept rank where alpha is 0, as PEFT re-creates a pruned
module) over init_r + 1e-5, which PEFT keeps as `ranknum` through pruning. Inference, `merge` and further
training read them as any LoRA; `save_adapter` then writes a LoRA dir. Training AdaLoRA itself (its
budget schedule and rank allocation) is not something jpeft does.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jpeft.errors import AdapterError
from jpeft.peft.base import from_layer_rows, layer_names, saved_base_weight
from jpeft.peft.lora import LoRA


def from_peft(config: dict, tensors, modules: dict) -> dict:
    init_r, alpha = int(config["init_r"]), float(config["lora_alpha"])
    # rank_pattern keys: "<module>.lora_E", with the adapter's name after it where PEFT kept it
    kept = {name.split(".lora_E")[0]: int(sum(mask)) for name, mask in (config.get("rank_pattern") or {}).items()}
    layers = config.get("layers_to_transform")
    method = LoRA(init_r, alpha, config["target_modules"], dropout=float(config.get("lora_dropout") or 0.0),
                  layers=[layers] if isinstance(layers, int) else layers)
    out = dict(modules)
    for path, leaves in modules.items():
        picked = method.targeted(path, leaves)
        if not any(picked) or "kernel" not in leaves:
            continue
        names = layer_names(path, len(picked))
        ranks = [kept.get(name, init_r) if p else 0 for name, p in zip(names, picked)]
        rank = max(max(ranks), 1)
        d_in, d_out = leaves["kernel"].shape[-2:]
        a, b = np.zeros((len(names), d_in, rank), np.float32), np.zeros((len(names), rank, d_out), np.float32)
        scale = np.zeros(len(names), np.float32)
        loaded = dict(leaves)
        for i, (name, r) in enumerate(zip(names, ranks)):
            if not picked[i]:
                continue
            got = {key: tensors.take(f"{name}.{key}") for key in ("lora_A", "lora_B", "lora_E")}
            for key, want in (("lora_A", (r, d_in)), ("lora_B", (d_out, r)), ("lora_E", (r, 1))):
                tensors.fits(f"{name}.{key}", got[key].shape, want)
            a[i, :, :r] = (got["lora_A"] * got["lora_E"]).T
            b[i, :r] = got["lora_B"].T
            scale[i] = (alpha if alpha > 0 else r) / (init_r + 1e-5) if r else 0.0
            loaded.update(saved_base_weight(tensors, name, leaves))
        loaded.update(lora_a=from_layer_rows(path, a), lora_b=from_layer_rows(path, b),
                      lora_scale=from_layer_rows(path, scale))
        if method.dropout > 0:
            loaded["lora_dropout"] = jnp.full(loaded["lora_scale"].shape, method.dropout, jnp.float32)
        out[path] = loaded
    if all(out[p] is modules[p] for p in modules):
        raise AdapterError(f"target_modules {config['target_modules']!r} match no module of the base model; "
                           f"its dense layers: {method.available(modules)}")
    return out
