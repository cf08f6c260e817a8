"""OFT (Qiu et al. 2023, orthogonal fine-tuning): each adapted layer's input rotated by a block-diagonal
orthogonal matrix, with PEFT's semantics (PEFT ≥ 0.18: the skew-symmetric parameterisation, the Cayley transform
by a truncated Neumann series).

    y = (x·R)·W = x·(R·W),   R = diag(R₁ … R_r),   R_i = Cayley(Q_i),   Q_i = S_i − S_iᵀ   [b, b]

S_i is upper-triangular, its b(b − 1)/2 entries trained (`oft_R` [..., r, b(b−1)/2], PEFT's tensor as it is;
[..., 1, ·] with `block_share`: one block for all). r blocks of b cover the layer's input width: a `block_size`
(PEFT's `oft_block_size`) or a block count (`rank`, PEFT's `r`) is given and the other follows, adjusted as PEFT
adjusts one that does not divide the width. Cayley(Q) is PEFT's series I + 2Q + 2Q² + … + Q^(k−1) at
`num_cayley_neumann_terms` k (default 5), or the exact (I − Q)(I + Q)⁻¹; the series' coefficients are the
metadata leaf `oft_cayley` [..., k] (empty: exact), so its length is static under jit. PEFT's init, S = 0, is
R = I: the model unchanged. R·W is built in every call (the `weight` insertion point), where PEFT rotates x:
equal to float32 rounding. Whole layer stacks of Linear weights; PEFT's constrained OFT (`coft`) is read, not
trained: its dir's blocks are projected once on load, as PEFT's forward projects them. Parameters: r·b(b−1)/2 per
layer (b(b−1)/2 with `block_share`).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import (RebuiltWeight, exact_targets, from_layer_rows, layer_rows, leading, linear_stacks,
                             module_layers, module_names, refuse_tied_head, saved_base_weight, target_option)

log = logging.getLogger("jpeft.peft")
PEFT_DEFAULT_BLOCK_SIZE = 32


class OFT(RebuiltWeight):
    name = "oft"
    peft_type = "OFT"
    trainable = ("oft_R",)
    metadata = ("oft_cayley",)
    axes = {"oft_R": ("lead", None, None), "oft_cayley": ("lead", None)}

    def __init__(self, block_size: int | None = None, rank: int | None = None,
                 targets: Sequence[str] | str = ("q_proj", "v_proj"), block_share: bool = False,
                 use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5):
        if block_size and rank:
            raise JpeftError(f"OFT takes a block size or a block count (rank), not both: r·block_size is the "
                             f"layer's input width (got block_size={block_size}, rank={rank})")
        if (block_size or 0) < 0 or (rank or 0) < 0:
            raise JpeftError(f"OFT's block_size and rank must be positive, got {block_size} and {rank}")
        self.block_size = None if rank else int(block_size or PEFT_DEFAULT_BLOCK_SIZE)
        self.rank = int(rank) if rank else None
        self.targets = target_option(targets)
        self.block_share = bool(block_share)
        self.use_cayley_neumann, self.num_cayley_neumann_terms = bool(use_cayley_neumann), int(num_cayley_neumann_terms)

    def __repr__(self):
        size = f"rank={self.rank}" if self.rank else f"block_size={self.block_size}"
        return (f"OFT({size}, targets={self.targets!r}, block_share={self.block_share}, "
                f"use_cayley_neumann={self.use_cayley_neumann}, num_cayley_neumann_terms={self.num_cayley_neumann_terms})")

    def blocks(self, path: str, width: int) -> tuple[int, int]:
        """(r, b) for an input width, PEFT's adjustment (with its warning) where the option does not divide it."""
        given = self.rank or self.block_size
        if (adjusted := dividing(width, given)) != given:
            log.warning(f"OFT: {'rank' if self.rank else 'block_size'} {given} does not divide the input width "
                        f"{width} of {path.replace('/', '.')}; {adjusted} there, as PEFT adjusts it")
        return (adjusted, width // adjusted) if self.rank else (width // adjusted, adjusted)

    def init_module(self, key, path: str, leaves: dict) -> dict:
        """PEFT's init: S = 0, so R = I (nothing drawn)."""
        lead = leading(path, leaves["kernel"])
        r, b = self.blocks(path, leaves["kernel"].shape[-2])
        coefficients = neumann_coefficients(self.num_cayley_neumann_terms) if self.use_cayley_neumann else []
        return {**leaves, "oft_R": jnp.zeros((*lead, 1 if self.block_share else r, b * (b - 1) // 2), jnp.float32),
                "oft_cayley": jnp.broadcast_to(jnp.asarray(coefficients, jnp.float32), (*lead, len(coefficients)))}

    @staticmethod
    def weight(leaves, dtype=None):
        """R·W [..., in, out], in float32: each block of b input rows of W rotated by its R_i."""
        kernel = leaves["kernel"].astype(jnp.float32)
        *lead, width, out = kernel.shape
        rotations = rotation(leaves["oft_R"].astype(jnp.float32), leaves["oft_cayley"])
        b = rotations.shape[-1]
        rotations = jnp.broadcast_to(rotations, (*lead, width // b, b, b))  # block_share: one block for all
        w = jnp.einsum("...rkc,...rco->...rko", rotations, kernel.reshape(*lead, width // b, b, out))
        w = w.reshape(kernel.shape)
        return w if dtype is None else w.astype(dtype)


def dividing(width: int, given: int) -> int:
    """The block count or size PEFT uses for a width: the given one where it divides the width, else
    `adjust_oft_parameters`' divisor nearest it (the lower on a tie; the width itself where it is larger)."""
    if width % given == 0 and given <= width:
        return given
    if given >= width:
        return width
    higher = given
    while higher <= width and width % higher:
        higher += 1
    lower = given
    while lower > 1 and width % lower:
        lower -= 1
    return lower if given - lower <= higher - given else higher


def neumann_coefficients(terms: int) -> list[float]:
    """The coefficients c_j of PEFT's truncated series for Cayley(Q) = Σ c_j Q^j at `num_cayley_neumann_terms`:
    [1], [1, 2], [1, 2, 2, 1] (3 and 4 terms alike), then [1, 2, …, 2, 1] of `terms` entries."""
    if terms <= 1:
        return [1.0]
    if terms == 2:
        return [1.0, 2.0]
    return [1.0, *[2.0] * (max(terms, 4) - 2), 1.0]


def skew(vectors, block: int):
    """Q = S − Sᵀ [..., b, b] from the upper-triangular entries [..., b(b−1)/2] (row-major, as torch.triu_indices)."""
    rows, cols = np.triu_indices(block, 1)
    s = jnp.zeros((*vectors.shape[:-1], block, block), vectors.dtype).at[..., rows, cols].set(vectors)
    return s - jnp.swapaxes(s, -1, -2)


def block_size(vectors) -> int:
    """b from a block's b(b − 1)/2 entries."""
    return int(round((1 + math.sqrt(1 + 8 * vectors.shape[-1])) / 2))


def rotation(vectors, cayley) -> jax.Array:
    """R_i [..., r, b, b]: PEFT's series with these coefficients (`oft_cayley`), or the exact Cayley transform
    where there are none."""
    q = skew(vectors, block_size(vectors))
    eye = jnp.eye(q.shape[-1], dtype=q.dtype)
    if cayley.shape[-1] == 0:  # R = (I − Q)(I + Q)⁻¹, i.e. R·(I + Q) = I − Q
        return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + q, -1, -2), jnp.swapaxes(eye - q, -1, -2)), -1, -2)
    coefficients = cayley[..., None, :, None, None].astype(q.dtype)  # one series per layer, for all its blocks
    r, power = coefficients[..., 0, :, :] * eye, eye
    for j in range(1, cayley.shape[-1]):
        power = power @ q
        r = r + coefficients[..., j, :, :] * power
    return r


def _projected(vectors: np.ndarray, eps: float) -> np.ndarray:
    """PEFT's constrained OFT (`coft`): each block's Q scaled into a Frobenius ball of eps / √r (its forward does
    it before every use; once is the same)."""
    block = block_size(vectors)
    q = np.asarray(skew(jnp.asarray(vectors), block))
    bound = eps / math.sqrt(q.shape[-3])
    norms = np.linalg.norm(q, axis=(-2, -1), keepdims=True)
    q = np.where(norms <= bound, q, bound * q / np.maximum(norms, 1e-30))
    rows, cols = np.triu_indices(block, 1)
    return q[..., rows, cols]


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's `oft_R.weight` tensors as they are, and the config that rebuilds exactly these blocks."""
    tensors, adapted, series, shapes = {}, [], set(), {}
    for path, leaves in modules.items():
        names = module_layers(path, leaves)
        tensors.update({f"{name}.oft_R.weight": row for name, row in zip(names, layer_rows(path, leaves["oft_R"]))})
        series |= {tuple(row) for row in layer_rows(path, leaves["oft_cayley"])}
        b = block_size(leaves["oft_R"])
        width = int(np.shape(leaves["kernel"])[-2])
        shapes[path] = (width, b, np.shape(leaves["oft_R"])[-2] == 1 and width > b)
        adapted += names
    if len(series) != 1 or len({share for _, _, share in shapes.values()}) != 1:
        raise AdapterError("save_adapter: the OFT modules differ in their Cayley series or block sharing; PEFT's OFT "
                           "config holds one of each")
    (coefficients,), share = series, next(iter(shapes.values()))[2]
    return tensors, {**_peft_sizes([(w, b) for w, b, _ in shapes.values()]),
                     "target_modules": exact_targets(adapted, module_names(tree)),
                     "block_share": bool(share), "use_cayley_neumann": bool(coefficients),
                     "num_cayley_neumann_terms": len(coefficients) or 5, "coft": False, "eps": 6e-5,
                     "module_dropout": 0.0, "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
                     "fan_in_fan_out": False, "modules_to_save": None, "exclude_modules": None, "inference_mode": True,
                     # the series jpeft computes is PEFT 0.18's (PEFT warns of older files' series)
                     "peft_version": "0.18.0"}


def _peft_sizes(blocks: list[tuple[int, int]]) -> dict:
    """PEFT's `r` and `oft_block_size` (one of them 0) from which it builds blocks of these sizes for these input
    widths ([(width, b)]): a block size, else a block count, that PEFT's adjustment turns into each."""
    for b in sorted({b for _, b in blocks}):
        if all(dividing(width, b) == size for width, size in blocks):
            return {"r": 0, "oft_block_size": b}
    for r in sorted({width // b for width, b in blocks}):
        if all(dividing(width, r) == width // size for width, size in blocks):
            return {"r": r, "oft_block_size": 0}
    raise AdapterError(f"save_adapter: neither one oft_block_size nor one r makes PEFT build these OFT blocks "
                       f"(input width, block size: {sorted(blocks)})")


def from_peft(config: dict, tensors, modules: dict) -> dict:
    if "oft_block_size" not in config:
        raise AdapterError("this OFT adapter predates PEFT 0.14's OFT (its config has no oft_block_size), whose "
                           "parameterisation PEFT itself no longer reads; retrain it with a recent PEFT")
    if config.get("layers_to_transform"):
        raise AdapterError("OFT adapters with layers_to_transform are not supported; jpeft's OFT adapts whole "
                           "layer stacks")
    if config.get("module_dropout"):
        log.warning("this OFT adapter was trained with module_dropout, which jpeft does not implement: its outputs "
                    "are the same (it acts in training only), but training it further runs without it")
    method = OFT(config.get("oft_block_size"), config.get("r"), config["target_modules"],
                 config.get("block_share", False), config.get("use_cayley_neumann", True),
                 config.get("num_cayley_neumann_terms", 5))
    refuse_tied_head(method.targets, modules, AdapterError)
    out = dict(modules)
    for path in linear_stacks(method, modules):
        leaves = method.init_module(None, path, modules[path])  # then filled from the file
        rows = layer_rows(path, leaves["oft_R"])
        for i, name in enumerate(module_layers(path, leaves)):
            got = tensors.take(f"{name}.oft_R.weight")
            tensors.fits(f"{name}.oft_R.weight", got.shape, rows[i].shape)
            rows[i] = _projected(got, config.get("eps", 6e-5)) if config.get("coft") else got
            leaves.update(saved_base_weight(tensors, name, modules[path]))
        out[path] = {**leaves, "oft_R": from_layer_rows(path, rows)}
    return out
