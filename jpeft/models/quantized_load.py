"""A base read straight into the leaves a method stores it as (QLoRA's codes), one layer at a time.

Quantizing after loading would first hold the whole float base on the devices (a 4-bit Mixtral-8x7B would need its
93 GB of bf16 to load). Here each stacked weight the method quantizes is read a layer's slice at a time, each device
reading only its own part of the slice, quantized on the devices and written into the stacked codes, whose buffers
the next layer's write reuses: a device holds the codes plus one layer's float slice of one weight.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def quantized_shapes(method, path: str, shape: tuple, dtype) -> dict:
    """{path: ShapeDtypeStruct} of the leaves `method.quantized` makes of a weight of `shape` at `path`."""
    return jax.eval_shape(partial(method.quantized, path), jax.ShapeDtypeStruct(shape, dtype))


def read_quantized(method, path: str, shape: tuple, dtype, read, shardings: dict | None) -> dict:
    """{path: stacked array} replacing the stacked weight at `path` [L, ...]: `read(index)` gives the tree-layout
    slice `index` of the float weight (cast to `dtype` here), `shardings` the leaves' NamedShardings (None: one
    device)."""
    layers, one = shape[0], shape[1:]
    codes = quantized_shapes(method, path, one, dtype)
    placed = {leaf: None if shardings is None else shardings[leaf] for leaf in codes}
    out = {leaf: jax.jit(partial(jnp.zeros, (layers, *s.shape), s.dtype), out_shardings=placed[leaf])()
           for leaf, s in codes.items()}
    write = jax.jit(partial(_write_layer, method, path), donate_argnums=0, out_shardings=placed)
    for layer in range(layers):
        at = (slice(layer, layer + 1),)
        if shardings is None:
            weight = jnp.asarray(read(at)[0], dtype)
        else:
            weight = jax.make_array_from_callback(one, _without_layers(shardings[path]),
                                                  lambda index, at=at: read(at + tuple(index))[0].astype(dtype))
        out = write(out, weight, layer)
    return out


def _without_layers(sharding: NamedSharding) -> NamedSharding:
    """A stacked leaf's sharding for one layer's slice of it."""
    return NamedSharding(sharding.mesh, P(*sharding.spec[1:]))


def _write_layer(method, path: str, stacked: dict, weight, layer):
    """The stacked codes with layer `layer`'s written: `weight` quantized."""
    return {leaf: jax.lax.dynamic_update_index_in_dim(stacked[leaf], codes, layer, 0)
            for leaf, codes in method.quantized(path, weight).items()}
