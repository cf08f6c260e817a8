"""One device mesh and one rules table that decide all sharding.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`);
`RULES` maps them to mesh axes. Adapter leaves derive their axes from the weight they
modify, as each method declares (`jpeft.peft.leaf_axes`): LoRA A shares the kernel's input
axis, B its output axis, the rank is unsharded; IA3 vectors follow the axis they scale.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jpeft import tree as T
from jpeft.errors import ConfigError
from jpeft.peft import leaf_axes

MESH_AXES = ("data", "fsdp", "tensor")
RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; data=-1 takes the devices left over."""
    devices = jax.devices() if devices is None else devices
    if data == -1:
        data = len(devices) // (fsdp * tensor)
    if data < 1 or data * fsdp * tensor > len(devices):
        raise ConfigError(f"a mesh of fsdp={fsdp} x tensor={tensor} needs more than the {len(devices)} devices here")
    shape = (data, fsdp, tensor)
    return Mesh(np.asarray(devices[: int(np.prod(shape))]).reshape(shape), MESH_AXES)


def logical_axes(params, abstract_base) -> dict:
    """Logical axis names for every leaf of `params`; adapter leaves derive theirs from their weight's."""
    base = T.flatten(nn.get_partition_spec(abstract_base))
    axes = {}
    for path, leaf in T.flatten(params).items():
        prefix, name = path.rsplit("/", 1)
        weight = base.get(prefix + "/kernel") or base.get(prefix + "/embedding")
        if path in base:
            axes[path] = tuple(base[path])
        elif weight is not None:
            axes[path] = leaf_axes(name, tuple(weight), np.ndim(leaf))
        else:
            axes[path] = (None,) * np.ndim(leaf)
    return axes


def param_shardings(params, abstract_base, mesh: Mesh):
    """NamedSharding per leaf, from logical axes through `RULES`; indivisible dims replicate."""
    axes = logical_axes(params, abstract_base)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

    def sharding(path, leaf):
        spec = nn.logical_to_mesh_axes(axes[path], RULES)
        fitted = [ax if ax is None or leaf.shape[i] % _size(ax, sizes) == 0 else None for i, ax in enumerate(spec)]
        return NamedSharding(mesh, P(*fitted))
    return T.map_with_path(sharding, params)


def batch_placer(mesh: Mesh, batch_size: int):
    """Shard [grad_accum, batch, T] batches over the mesh's data-parallel axes."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the {ways} data-parallel "
                          f"devices (data x fsdp) of the mesh")
    sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))
    return lambda batch: jax.device_put(batch, sharding)


def _size(axis, sizes) -> int:
    return int(np.prod([sizes[a] for a in ((axis,) if isinstance(axis, str) else axis)]))
