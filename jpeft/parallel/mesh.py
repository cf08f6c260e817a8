"""One device mesh and one rules table that decide all sharding.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`, `experts`);
`RULES` maps them to mesh axes. Adapter leaves derive their axes from the weight they
modify, as each method declares (`jpeft.peft.leaf_axes`): LoRA A shares the kernel's input
axis, B its output axis, the rank is unsharded; IA3 vectors follow the axis they scale.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np
import optax
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
    ("experts", None),
    ("head_dim", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1: the devices the others leave.

    Devices are laid out by `jax.make_mesh` (ICI-aware on TPU); on a multi-slice TPU the data
    axis spans the slices (DCN), fsdp and tensor stay inside a slice.
    """
    devices = jax.devices() if devices is None else devices
    shape = tuple(mesh_shape(data, fsdp, tensor, len(devices)).values())
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        from jax.experimental import mesh_utils
        if shape[0] % slices:
            raise ConfigError(f"mesh.data={shape[0]} must be a multiple of the {slices} TPU slices")
        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1), devices)
        return auto_axes(Mesh(grid, MESH_AXES))
    return auto_axes(jax.make_mesh(shape, MESH_AXES, devices=devices))


def auto_axes(mesh: Mesh) -> Mesh:
    """`mesh` with every axis Auto: XLA propagates shardings from the params' placement and the models'
    constraints. `jax.make_mesh` makes Explicit axes by default, whose sharding-in-types rejects mixing
    split and whole operands (a decoding step's cache update), so a user's mesh is taken as Auto too."""
    return mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> dict:
    """{axis: size} on `n_devices` devices, the one -1 axis taking the devices the others leave."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    sizes = {a: n_devices // known if s == -1 else s for a, s in sizes.items()}
    if min(sizes.values()) < 1 or int(np.prod(list(sizes.values()))) != n_devices:
        raise ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} x mesh.tensor={tensor} does not use the "
                          f"{n_devices} devices; set one axis to -1 to take the devices left over")
    return sizes


def fitted_spec(shape: tuple, axes: tuple, sizes: dict) -> list:
    """Mesh axes for a leaf's logical `axes` through `RULES`; a dimension they do not divide replicates."""
    spec = nn.logical_to_mesh_axes(axes, RULES)
    return [ax if ax is None or shape[i] % axis_size(ax, sizes) == 0 else None for i, ax in enumerate(spec)]


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """Trace under this so the models' activation constraints (logical axes) bind to `mesh`."""
    with jax.sharding.set_mesh(auto_axes(mesh)), nn.logical_axis_rules(RULES):
        yield


def logical_axes(params, abstract_base) -> dict:
    """Logical axis names for every leaf of `params`; adapter leaves derive theirs from their weight's."""
    base = T.flatten(nn.get_partition_spec(abstract_base))
    axes = {}
    for path, leaf in T.flatten(params).items():
        prefix, name = path.rsplit("/", 1)
        weight = base.get(prefix + "/kernel") or base.get(prefix + "/embedding")
        if weight is None and (stacked := base.get(prefix + "/weight")) is not None:  # a mixture's experts, [.., out, in]
            weight = (*stacked[:-2], stacked[-1], stacked[-2])
        if path in base:
            axes[path] = tuple(base[path])
        else:
            axes[path] = leaf_axes(name, None if weight is None else tuple(weight), np.ndim(leaf), T.is_stacked(path))
    return axes


def param_shardings(params, abstract_base, mesh: Mesh):
    """NamedSharding per leaf, from logical axes through `RULES`; indivisible dims replicate."""
    axes, mesh = logical_axes(params, abstract_base), auto_axes(mesh)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

    def sharding(path, leaf):
        return NamedSharding(mesh, P(*fitted_spec(leaf.shape, axes[path], sizes)))
    return T.map_with_path(sharding, params)


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """[grad_accum, batch, T] batches split over the mesh's data-parallel axes (data x fsdp)."""
    mesh, ways = auto_axes(mesh), data_ways(mesh)
    if batch_size % ways:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the {ways} data-parallel "
                          f"devices (mesh.data x mesh.fsdp)")
    return NamedSharding(mesh, P(None, ("data", "fsdp")))


def data_ways(mesh: Mesh | None) -> int:
    """How many ways the mesh's data-parallel axes (data x fsdp) split a batch's rows (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def params_mesh(params) -> Mesh | None:
    """The jpeft mesh (`make_mesh`'s axes) a placed tree lies on, where it spans more than one device."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 and sharding.mesh.axis_names == MESH_AXES:
            return sharding.mesh
    return None


def split_rows(mesh: Mesh, array: np.ndarray) -> jax.Array:
    """A host array every process holds whole -> a global array whose rows are split over the data-parallel
    axes (each device takes its own rows; no device receives the whole array)."""
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def local_rows(sharding: NamedSharding, shape: tuple) -> slice:
    """The rows of a global [grad_accum, batch, T] batch that this process's devices hold."""
    held = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        held.update(range(*index[1].indices(shape[1])[:2]))
    start, stop = min(held), max(held) + 1
    if len(held) != stop - start:
        raise ConfigError("this process's devices hold rows of the batch that are not contiguous; "
                          "order the mesh so each host's devices are adjacent on mesh.data")
    return slice(start, stop)


def place_batch(sharding: NamedSharding, local: dict, global_shape: tuple) -> dict:
    """This process's rows of a batch -> global arrays (one process: a plain device_put); `global_shape`
    is (grad_accum, batch, ...), each array keeping its own trailing dims (a classifier's labels have none)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v, (*global_shape[:2], *v.shape[2:]))
            for k, v in local.items()}


def state_shardings(optimizer, trainable, mesh: Mesh) -> dict:
    """Shardings of the train state: optimizer moments lie exactly like the (placed) leaves they track."""
    replicated = NamedSharding(auto_axes(mesh), P())
    trainable_shardings = jax.tree.map(lambda x: x.sharding, trainable)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    return {"step": replicated, "trainable": trainable_shardings,
            "opt_state": optax.tree_map_params(optimizer, lambda _, s: s, opt_state, trainable_shardings,
                                               transform_non_params=lambda _: replicated)}


def axis_size(axis, sizes) -> int:
    return int(np.prod([sizes[a] for a in ((axis,) if isinstance(axis, str) else axis)]))
