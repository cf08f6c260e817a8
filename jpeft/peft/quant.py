"""A frozen dense weight stored in 4 or 8 bits: NF4 (the QLoRA paper) and blockwise int8.

Blocks hold 64 consecutive input elements of one output unit, which is bitsandbytes' block
over PyTorch's flattened [out, in] weight, so codes and scales agree with it. (An input size
64 does not divide uses its largest divisor below 64 instead, where bitsandbytes' blocks
would straddle output units; the block size is always input size / absmax rows.) Leaves
that replace `kernel` [..., in, out]:

    NF4   kernel_nf4 uint8 [..., in/2, out] (two codes per byte: even input row in the high
          nibble), kernel_absmax f32 [..., in/64, out]
          double_quant: the absmax values minus their mean, 8-bit with bitsandbytes' dynamic
          map in blocks of 256 (bitsandbytes' order): kernel_absmax_q uint8 [..., in/64, out],
          kernel_absmax_scale f32 [..., n/256], kernel_absmax_offset f32 [...]
    int8  kernel_int8 int8 [..., in, out] (round(w / absmax · 127)), kernel_absmax

`dequantize` is jax.numpy, called inside the dense insertion point on every step.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jpeft.errors import JpeftError

BLOCK, SCALE_BLOCK = 64, 256
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
QUANT_LEAVES = ("kernel_nf4", "kernel_int8", "kernel_absmax", "kernel_absmax_q", "kernel_absmax_scale",
                "kernel_absmax_offset")


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map`): 256 sorted values in [-1, 1].

    Equal to bitsandbytes' own to one float32 ulp: torch's vectorised linspace rounds a few
    boundaries differently (and differently per CPU vector width)."""
    data = []
    for i in range(7):  # 7 exponent bits: 2**i + 1 boundaries in [0.1, 1] per decade
        boundaries = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
        means = np.float32(10.0 ** (i - 6)) * (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        data += [*means, *-means]
    data += [0.0, 1.0]
    return np.sort(np.asarray(data + [0.0] * (256 - len(data)), np.float32))


DYNAMIC = dynamic_map()


def is_quantized(leaves: dict) -> bool:
    return "kernel_nf4" in leaves or "kernel_int8" in leaves


def num_elements(leaves: dict) -> int:
    """Elements of the logical [..., in, out] weight (what a parameter count reports)."""
    if "kernel_int8" in leaves:
        return int(np.size(leaves["kernel_int8"]))
    return 2 * int(np.size(leaves["kernel_nf4"]))


def _nearest(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest table entry (ties to the lower one), by midpoints as bitsandbytes does."""
    midpoints = (table[1:] + table[:-1]) / 2
    return np.searchsorted(midpoints, values, side="left").astype(np.uint8)


def quantize(kernel, kind: str = "nf4", double_quant: bool = False) -> dict:
    """The leaves that replace a float `kernel` [..., in, out] (see the module docstring)."""
    w = np.asarray(kernel, np.float32)
    *lead, d_in, d_out = w.shape
    if d_in % 2 and kind == "nf4":
        raise JpeftError(f"cannot store a weight of shape {w.shape} as NF4: its input size {d_in} is odd "
                         "(two 4-bit codes share a byte)")
    block = max(b for b in range(1, BLOCK + 1) if d_in % b == 0)
    blocks = w.reshape(*lead, d_in // block, block, d_out)
    absmax = np.max(np.abs(blocks), axis=-2)                       # [..., in/64, out]
    normed = blocks / np.where(absmax == 0, 1, absmax)[..., None, :]
    if kind == "int8":
        codes = np.round(normed * 127).astype(np.int8).reshape(w.shape)
        return {"kernel_int8": codes, "kernel_absmax": absmax}
    if kind != "nf4":
        raise JpeftError(f"unknown quantization {kind!r}; use nf4 or int8")
    codes = _nearest(normed, NF4).reshape(*lead, d_in // 2, 2, d_out)
    out = {"kernel_nf4": (codes[..., 0, :] << 4) | codes[..., 1, :]}
    return {**out, **(_quantize_absmax(absmax) if double_quant else {"kernel_absmax": absmax})}


def _quantize_absmax(absmax: np.ndarray) -> dict:
    """bitsandbytes' nested quantization: (absmax - mean) in 8-bit dynamic blocks of 256.

    bitsandbytes orders the absmax values as its blocks run over PyTorch's [out, in] weight:
    output unit major. Ours are [..., in/64, out], so they are transposed into that order.
    """
    *lead, n_blocks, d_out = absmax.shape
    ordered = np.swapaxes(absmax, -1, -2).reshape(*lead, -1)      # bitsandbytes' block order
    offset = ordered.mean(axis=-1)
    centred = ordered - offset[..., None]
    pad = -centred.shape[-1] % SCALE_BLOCK
    groups = np.pad(centred, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, SCALE_BLOCK)
    scale = np.max(np.abs(groups), axis=-1)
    q = _nearest(groups / np.where(scale == 0, 1, scale)[..., None], DYNAMIC).reshape(*lead, -1)
    q = q[..., : ordered.shape[-1]].reshape(*lead, d_out, n_blocks)
    return {"kernel_absmax_q": np.swapaxes(q, -1, -2), "kernel_absmax_scale": scale.astype(np.float32),
            "kernel_absmax_offset": offset.astype(np.float32)}


def _absmax(leaves: dict):
    if "kernel_absmax" in leaves:
        return leaves["kernel_absmax"]
    q = leaves["kernel_absmax_q"]
    *lead, n_blocks, d_out = q.shape
    ordered = jnp.swapaxes(q, -1, -2).reshape(*lead, -1)
    pad = -ordered.shape[-1] % SCALE_BLOCK
    groups = jnp.pad(ordered, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, SCALE_BLOCK)
    values = jnp.asarray(DYNAMIC)[groups] * leaves["kernel_absmax_scale"][..., None]
    values = values.reshape(*lead, -1)[..., : n_blocks * d_out] + leaves["kernel_absmax_offset"][..., None]
    return jnp.swapaxes(values.reshape(*lead, d_out, n_blocks), -1, -2)


def dequantize(leaves: dict, dtype=jnp.float32):
    """The float weight [..., in, out] of a quantized module (jit-friendly; fuses into the matmul)."""
    absmax = _absmax(leaves).astype(jnp.float32)
    if "kernel_int8" in leaves:
        codes = leaves["kernel_int8"]
        values = codes.astype(jnp.float32) / 127
    else:
        packed = leaves["kernel_nf4"]
        pairs = jnp.stack([packed >> 4, packed & 15], axis=-2)       # [..., in/2, 2, out]
        values = jnp.asarray(NF4)[pairs.reshape(*packed.shape[:-2], -1, packed.shape[-1])]
    *lead, d_in, d_out = values.shape
    blocks = values.reshape(*lead, absmax.shape[-2], -1, d_out) * absmax[..., None, :]
    return blocks.reshape(*lead, d_in, d_out).astype(dtype)
