"""A frozen dense weight stored in 4 or 8 bits: NF4 (the QLoRA paper), blockwise int8, and MXFP4.

An NF4 or int8 block holds 64 consecutive input elements of one output unit: bitsandbytes' block over
PyTorch's flattened [out, in] weight, so codes and scales are bitsandbytes'. The input size
must be a multiple of 64; below 64 (tiny test models) it is one block per output unit,
where bitsandbytes' blocks would straddle output units. Leaves that replace `kernel`
[..., in, out] (any leading axes, e.g. stacked layers):

    NF4   kernel_nf4 uint8 [..., in/2, out]: two codes per byte, input row 2i in the high
          nibble and 2i+1 in the low one (bitsandbytes' bytes, transposed);
          kernel_absmax f32 [..., in/64, out]
          double_quant (bitsandbytes' compress_statistics): instead of kernel_absmax,
          kernel_absmax_offset f32 [...] (the mean absmax of each layer) and the absmax
          minus it in 8-bit dynamic-map blocks of 256, grouped in bitsandbytes' order
          (output unit major): kernel_absmax_q uint8 [..., in/64, out],
          kernel_absmax_scale f32 [..., ceil(in/64 · out / 256)]
    int8  kernel_int8 int8 [..., in, out] = round(w / absmax · 127), kernel_absmax
    MXFP4 (the OCP MX format GPT-OSS's experts ship in) kernel_mxfp4 uint8 [..., in/2, out]: codes of FP4 (E2M1)
          values packed as NF4's, in blocks of 32 inputs scaled by a power of two, kernel_exponent uint8
          [..., in/32, out] = its exponent + 127 (E8M0): the block's largest magnitude's floor(log2) - 2, so that
          magnitude lands in [4, 8) and anything past 6 saturates (the MX spec's rule). Values that already
          are MXFP4 (a dequantized gpt-oss expert) come back exactly.

Codes are the nearest table entries (ties to the lower), as bitsandbytes' CUDA kernels
pick them. Its CPU 8-bit kernel (0.50, used for double_quant's absmax) first rounds the
value to a grid of step 2/65535, so the few absmax values that close to a midpoint between
two codes (about 1 in 500) get the other one there.
`dequantize` is jax.numpy, run inside the dense insertion point on every step.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jpeft.errors import JpeftError

BLOCK, SCALE_BLOCK, MX_BLOCK = 64, 256, 32
KINDS = ("nf4", "int8", "mxfp4")
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
FP4 = np.array([-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)  # E2M1's values, sorted
PACKED = ("kernel_nf4", "kernel_mxfp4")  # two 4-bit codes a byte
QUANT_LEAVES = (*PACKED, "kernel_int8", "kernel_absmax", "kernel_absmax_q", "kernel_absmax_scale",
                "kernel_absmax_offset", "kernel_exponent")
# the same leaves of a mixture's stacked expert weight (`weight` [..., E, out, in]): those of its [..., E, in, out]
# transpose, so each expert's blocks are bitsandbytes' over its own [out, in] weight
EXPERT_LEAVES = tuple("weight" + n.removeprefix("kernel") for n in QUANT_LEAVES)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted values in [-1, 1].

    Equal to bitsandbytes' own to 2 float32 ulps: torch's vectorised linspace rounds a few
    boundaries differently (and differently per CPU vector width)."""
    data = [0.0, 1.0]
    for i in range(7):  # decade 10**(i-6): the means of 2**i + 1 boundaries in [0.1, 1], both signs
        boundaries = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
        means = np.float32(10.0 ** (i - 6)) * (boundaries[:-1] + boundaries[1:]) / np.float32(2)
        data += [*means, *-means]
    return np.sort(np.asarray(data, np.float32))


DYNAMIC = _dynamic_map()


def is_quantized(leaves: dict) -> bool:
    return any(n in leaves for n in (*PACKED, "kernel_int8"))


def expert_codes(leaves: dict) -> dict:
    """A quantized expert stack's leaves under the names this module reads (`kernel_*`)."""
    return {"kernel" + n.removeprefix("weight"): v for n, v in leaves.items() if n in EXPERT_LEAVES}


def logical_shape(leaves: dict) -> tuple[int, ...]:
    """The shape [..., in, out] of the weight the leaves store."""
    if "kernel_int8" in leaves:
        return tuple(np.shape(leaves["kernel_int8"]))
    *lead, half, d_out = np.shape(leaves["kernel_nf4" if "kernel_nf4" in leaves else "kernel_mxfp4"])
    return (*lead, 2 * half, d_out)


def num_elements(leaves: dict) -> int:
    """Elements of the logical [..., in, out] weight (what a parameter count reports)."""
    return int(np.prod(logical_shape(leaves)))


def _nearest(values, table: np.ndarray):
    """Index of the nearest entry of a sorted table (ties to the lower one)."""
    return jnp.searchsorted(jnp.asarray((table[1:] + table[:-1]) / 2), values, side="left").astype(jnp.uint8)


def _normalise(values, absmax):
    """values · (1 / absmax) as bitsandbytes' kernels compute it (0 stays 0 in an all-zero block)."""
    return values * (jnp.float32(1) / jnp.where(absmax == 0, jnp.float32(1), absmax))


def _groups(flat):
    """[..., n] -> [..., ceil(n/256), 256], zero-padded."""
    pad = -flat.shape[-1] % SCALE_BLOCK
    return jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)]).reshape(*flat.shape[:-1], -1, SCALE_BLOCK)


def quantize(kernel, kind: str = "nf4", double_quant: bool = False) -> dict:
    """The leaves that replace a float `kernel` [..., in, out] (see the module docstring).

    jax.numpy throughout, so it runs under jit on a sharded weight without gathering it."""
    if kind not in KINDS:
        raise JpeftError(f"unknown quantization {kind!r}; use one of {', '.join(KINDS)}")
    w = jnp.asarray(kernel, jnp.float32)
    *lead, d_in, d_out = w.shape
    size = MX_BLOCK if kind == "mxfp4" else BLOCK
    block = min(size, d_in)
    if d_in % block or (kind != "int8" and d_in % 2):
        raise JpeftError(f"cannot quantize a weight of shape {w.shape} to {kind}: its input size {d_in} must be a "
                         f"multiple of the block size {size}" + (" (or even, below it)" if kind != "int8" else ""))
    blocks = w.reshape(*lead, d_in // block, block, d_out)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)                      # [..., in/block, out]
    if kind == "mxfp4":
        exponent = jnp.clip(jnp.frexp(absmax)[1] - 3, -127, 127)      # floor(log2(absmax)) - 2; 0 gives -127
        normed = (blocks * jnp.ldexp(jnp.float32(1), -exponent)[..., None, :]).reshape(w.shape)
        return {"kernel_mxfp4": _pack(_nearest(normed, FP4)), "kernel_exponent": (exponent + 127).astype(jnp.uint8)}
    normed = _normalise(blocks, absmax[..., None, :]).reshape(w.shape)
    if kind == "int8":
        return {"kernel_int8": jnp.round(normed * 127).astype(jnp.int8), "kernel_absmax": absmax}
    packed = {"kernel_nf4": _pack(_nearest(normed, NF4))}
    return {**packed, **(_quantize_absmax(absmax) if double_quant else {"kernel_absmax": absmax})}


def _pack(codes):
    """4-bit codes [..., in, out] -> bytes [..., in/2, out], input row 2i in the high nibble."""
    pairs = codes.reshape(*codes.shape[:-2], -1, 2, codes.shape[-1])
    return (pairs[..., 0, :] << 4) | pairs[..., 1, :]


def _quantize_absmax(absmax) -> dict:
    """bitsandbytes' nested quantization: (absmax - mean) in 8-bit dynamic blocks of 256, per layer."""
    *lead, n_blocks, d_out = absmax.shape
    ordered = jnp.swapaxes(absmax, -1, -2).reshape(*lead, -1)       # bitsandbytes' order: output unit major
    offset = _mean(ordered)
    groups = _groups(ordered - offset[..., None])
    scale = jnp.max(jnp.abs(groups), axis=-1)
    q = _nearest(_normalise(groups, scale[..., None]), DYNAMIC).reshape(*lead, -1)[..., : n_blocks * d_out]
    return {"kernel_absmax_q": jnp.swapaxes(q.reshape(*lead, d_out, n_blocks), -1, -2),
            "kernel_absmax_scale": scale, "kernel_absmax_offset": offset}


def _mean(x):
    """The float32 mean of the last axis, corrected by the mean residual: the correctly rounded mean
    (what PyTorch's accurate summation gives bitsandbytes) without float64, which jit lacks by default."""
    m = jnp.mean(x, axis=-1)
    return m + jnp.mean(x - m[..., None], axis=-1)


def _absmax(leaves: dict):
    """kernel_absmax, or its value rebuilt from the double-quantized leaves: code · scale + offset."""
    if "kernel_absmax" in leaves:
        return leaves["kernel_absmax"]
    q = leaves["kernel_absmax_q"]
    *lead, n_blocks, d_out = q.shape
    groups = _groups(jnp.swapaxes(q, -1, -2).reshape(*lead, -1))
    values = (jnp.asarray(DYNAMIC)[groups] * leaves["kernel_absmax_scale"][..., None]).reshape(*lead, -1)
    values = values[..., : n_blocks * d_out] + leaves["kernel_absmax_offset"][..., None]
    return jnp.swapaxes(values.reshape(*lead, d_out, n_blocks), -1, -2)


def dequantize(leaves: dict, dtype=jnp.float32):
    """The weight [..., in, out] of a quantized module's leaves (other leaf names are ignored),
    computed in float32 and cast to `dtype`; jit-friendly, it fuses into the consuming matmul."""
    if "kernel_int8" in leaves:
        values = leaves["kernel_int8"].astype(jnp.float32) / 127
    else:
        packed, table = (leaves["kernel_nf4"], NF4) if "kernel_nf4" in leaves else (leaves["kernel_mxfp4"], FP4)
        codes = jnp.stack([packed >> 4, packed & 15], axis=-2)       # [..., in/2, 2, out]
        values = jnp.asarray(table)[codes.reshape(*packed.shape[:-2], -1, packed.shape[-1])]
    if "kernel_exponent" in leaves:
        scale = jnp.ldexp(jnp.float32(1), leaves["kernel_exponent"].astype(jnp.int32) - 127)
    else:
        scale = _absmax(leaves).astype(jnp.float32)
    *lead, d_in, d_out = values.shape
    blocks = values.reshape(*lead, scale.shape[-2], -1, d_out) * scale[..., None, :]
    return blocks.reshape(*lead, d_in, d_out).astype(dtype)
