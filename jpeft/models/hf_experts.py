"""A mixture's experts as checkpoints store them: one tensor per expert and projection.

transformers 5 runs the experts stacked (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj`
[E, D, I]), as jpeft's tree holds them (`.../experts/gate_up_proj/weight`), but loads and saves the hub's layout: Qwen2/3-MoE's and OLMoE's
`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`, and Mixtral's `block_sparse_moe.experts.{e}.w1`
(gate), `w3` (up), `w2` (down) beside its router `block_sparse_moe.gate`. Reading stacks those parts lazily,
slice by slice (`Stacked`), so a sharded load still reads each device's part only; saving splits them again.
GraniteMoE's files hold each stack whole as `block_sparse_moe.input_linear` and `output_linear`, its router as
`router.layer`. GPT-OSS's files hold each stack whole, `mlp.experts.gate_up_proj` [E, D, 2I] and `down_proj` [E, I, D], as its
transformers model runs them ([E, in, out]): read transposed (`Transposed`), written back so. The hub's gpt-oss
checkpoints hold them MXFP4-quantized instead (`gate_up_proj_blocks`, `_scales`, [E, out, in] by blocks of 32),
dequantized as read (`Mxfp4`) and written back as floats.
"""
from __future__ import annotations

import re

import numpy as np

# per family: the layer's module holding router and experts in files, and its (gate, up) and down names
FILE_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3"), "w2")}
DEFAULT_FILE_NAMES = ("mlp", ("gate_proj", "up_proj"), "down_proj")
IN_OUT_TYPES = ("gpt_oss",)  # families whose files stack each expert weight [E, in, out] under transformers' name
# families whose files hold each stack whole under names of their own (GraniteMoE's), by tree tensor
WHOLE_FILE_NAMES = dict.fromkeys(("granitemoe", "granitemoeshared"), {
    "experts.gate_up_proj": "input_linear.weight", "experts.down_proj": "output_linear.weight",
    "router": "router.layer.weight"})
_STACKED = re.compile(r"^(.*)\.(mlp|block_sparse_moe)\.(experts\.gate_up_proj|experts\.down_proj|gate|router)\.weight$")


def file_parts(name: str, model_type: str, num_experts: int, held=()) -> list[list[str]] | None:
    """The file's tensor names behind a stacked tree tensor `name`: per expert, the parts its rows join (gate
    and up; down alone); for a renamed router, one part; the stacked tensor itself where the file (`held`
    names) has it under transformers' own name. None for any other name."""
    if not (match := _STACKED.match(name)):
        return None
    layer, module, what = match.groups()
    stacked = name.removesuffix(".weight")
    if model_type in WHOLE_FILE_NAMES:
        return [[stacked if stacked in held else f"{layer}.{module}.{WHOLE_FILE_NAMES[model_type][what]}"]]
    block, gate_up, down = FILE_NAMES.get(model_type, DEFAULT_FILE_NAMES)
    if what in ("gate", "router"):
        return [[f"{layer}.{block}.gate.weight"]] if what == "gate" and block != module else None
    if model_type in IN_OUT_TYPES and f"{stacked}_blocks" in held:
        return [[f"{stacked}_blocks", f"{stacked}_scales"]]
    if stacked in held or model_type in IN_OUT_TYPES:
        return [[stacked]]
    parts = gate_up if what.endswith("gate_up_proj") else (down,)
    return [[f"{layer}.{block}.experts.{e}.{part}.weight" for part in parts] for e in range(num_experts)]


def split(name: str, array: np.ndarray, model_type: str) -> dict[str, np.ndarray]:
    """A stacked tree tensor as the file stores it: {file name: part} (itself where it is stored as it is)."""
    parts = file_parts(name, model_type, len(array))
    if parts is None:
        return {name: array}
    if model_type in IN_OUT_TYPES:
        return {parts[0][0]: np.ascontiguousarray(array.transpose(0, 2, 1))}
    if model_type in WHOLE_FILE_NAMES or name.endswith(".gate.weight"):  # a router, or a stack stored whole
        return {parts[0][0]: array}
    return {part: np.ascontiguousarray(piece) for expert, names in zip(array, parts)
            for part, piece in zip(names, np.split(expert, len(names), axis=0))}


def reader(name: str, model_type: str, opened: list[list]):
    """A safetensors slice of tree tensor `name` from the file slices `file_parts` opened for it."""
    in_out = model_type in IN_OUT_TYPES and (match := _STACKED.match(name)) and match.group(3).startswith("experts")
    if in_out and len(opened[0]) == 2:
        return Mxfp4(*opened[0])
    if len(opened) > 1 or len(opened[0]) > 1:
        return Stacked(opened)
    return Transposed(opened[0][0]) if in_out else opened[0][0]


# MXFP4's 4-bit values (E2M1: sign, two exponent bits, one mantissa bit), by code
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
MXFP4_BLOCK = 32  # values per shared scale


class Mxfp4:
    """MXFP4-quantized stacked expert weights read as floats [E, out, in]: `blocks` [E, out, in / 32, 16] hold two
    4-bit codes a byte (the low nibble first), `scales` [E, out, in / 32] each block's power of two (biased by
    127), as transformers dequantizes them (exact in float32 and bfloat16). A slice reads only its blocks."""

    def __init__(self, blocks, scales):
        self.blocks, self.scales = blocks, scales

    def get_shape(self) -> list[int]:
        experts, rows, groups, width = self.blocks.get_shape()
        return [experts, rows, groups * width * 2]

    def get_dtype(self) -> str:
        return "BF16"  # what every MXFP4 value and scale fits exactly

    def __getitem__(self, index: tuple) -> np.ndarray:
        experts, rows, columns = tuple(index) + (slice(None),) * (3 - len(index))
        start, stop, _ = columns.indices(self.get_shape()[2])
        first, last = start // MXFP4_BLOCK, -(-stop // MXFP4_BLOCK)
        blocks = self.blocks[experts, rows, first:last]
        values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1).reshape(*blocks.shape[:-1], -1)
        exponents = self.scales[experts, rows, first:last].astype(np.int32) - 127
        values = np.ldexp(values, exponents[..., None]).reshape(*blocks.shape[:2], -1)
        return values[..., start - first * MXFP4_BLOCK:stop - first * MXFP4_BLOCK]


class Transposed:
    """A safetensors slice of stacked [E, in, out] expert weights, read as [E, out, in]."""

    def __init__(self, part):
        self.part = part

    def get_shape(self) -> list[int]:
        experts, d_in, d_out = self.part.get_shape()
        return [experts, d_out, d_in]

    def get_dtype(self) -> str:
        return self.part.get_dtype()

    def __getitem__(self, index: tuple) -> np.ndarray:
        experts, rows, columns = tuple(index) + (slice(None),) * (3 - len(index))
        return np.swapaxes(self.part[experts, columns, rows], 1, 2)


class Stacked:
    """A safetensors slice over parts: experts stacked on a new first axis, each expert's parts joined along
    their rows (gate, then up), read only where a slice asks."""

    def __init__(self, parts: list[list]):
        self.parts = parts
        self.rows = [p.get_shape()[0] for p in parts[0]]

    def get_shape(self) -> list[int]:
        first = self.parts[0][0].get_shape()
        return [len(self.parts), sum(self.rows), *first[1:]]

    def get_dtype(self) -> str:
        return self.parts[0][0].get_dtype()

    def __getitem__(self, index: tuple) -> np.ndarray:
        experts, rows, *rest = tuple(index) + (slice(None),) * (3 - len(index))
        start, stop, _ = rows.indices(sum(self.rows))
        out = []
        for expert in self.parts[experts]:
            pieces, offset = [], 0
            for part, size in zip(expert, self.rows):
                lo, hi = max(start - offset, 0), min(stop - offset, size)
                if lo < hi:
                    pieces.append(part[(slice(lo, hi), *rest)])
                offset += size
            out.append(np.concatenate(pieces))
        return np.stack(out)
