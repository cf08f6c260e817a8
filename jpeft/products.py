"""Matrix products in the compute dtype, accumulated in float32, whose gradients stay in it.

Autodiff through a bfloat16 product with a float32 result pulls the float32 cotangent back
through float32 products (XLA converts the bfloat16 operands to meet it), at half of bf16's
matmul speed on CPUs with bf16 units. These products round the cotangent to the operands'
dtype first, as `torch.autocast` does, and compute each gradient only when it is wanted. In
float32 they are exactly autodiff's products.
"""
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint


def _product(spec: str, a, b, out):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out)


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum(spec: str, a, b, out=None):
    """`jnp.einsum(spec, a, b)` for two operands of one dtype, rounded to `out` (default: theirs).
    Every index of `spec` appears in two of its three terms (no traces, no sums of one operand), and
    the axes `...` stands for are the same in both operands (no broadcasting)."""
    return _product(spec, a, b, out or a.dtype)


def _einsum_fwd(spec, a, b, out):
    return _product(spec, a.value, b.value, out or a.value.dtype), (a.value if b.perturbed else None,
                                                                    b.value if a.perturbed else None)


def _einsum_bwd(spec, out, res, g):
    a, b = res
    terms, result = spec.split("->")
    left, right = terms.split(",")
    dtype = (a if b is None else b).dtype
    g = g.astype(dtype)
    return (None if b is None else _product(*_leading_row_major(f"{result},{right}->{left}", g, b), dtype),
            None if a is None else _product(*_leading_row_major(f"{result},{left}->{right}", g, a), dtype))


def _leading_row_major(spec: str, a, b):
    """(spec, a, b) with the operand the result's leading axes come from, which XLA makes the product's
    left one, first, laid out [..., kept axes, contracted axes] and materialised row-major on CPU: XLA:CPU
    runs a product whose left operand is contracted along another axis off its fast path, in float32 when
    it is bf16 and as a generic loop when float32 (in attention the key's and value's gradients, gᵀ·q and
    pᵀ·g: 160 GFLOP/s against 500; in-process A/B, the bench's float32 LoRA step 0.98x)."""
    if not _cpu_layouts():
        return spec, a, b
    terms, result = spec.split("->")
    left, right = terms.split(",")
    prefix = "..." if result.startswith("...") else ""
    if result[len(prefix)] not in left:
        left, right, a, b = right, left, b, a
    axes = left[len(prefix):]
    order = "".join(sorted(axes, key=lambda c: c not in result))  # stable: kept axes, then contracted
    if order == axes:
        return f"{left},{right}->{result}", a, b
    return f"{prefix}{order},{right}->{result}", row_major(jnp.einsum(f"{left}->{prefix}{order}", a)), b


einsum.defvjp(_einsum_fwd, _einsum_bwd, symbolic_zeros=True)


def matmul(x, w):
    """x·w in x's dtype with float32 accumulation, as one 2-D product over all leading axes: XLA:CPU
    runs [B·T, in]·[in, out] and its weight gradient about twice as fast as the same product with
    separate batch and time axes (docs/design.md §8)."""
    y = _matmul_2d(x.reshape(-1, x.shape[-1]), w.astype(x.dtype), w.shape[1] < w.shape[0])
    return y.reshape(*x.shape[:-1], w.shape[-1])


# rows [N, in] against each group's w: [G, in, out] (jpeft's kernels), or [G, out, in] (transformers' Linear layout)
_GROUPED = {transposed: jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2 if transposed else 1]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0]) for transposed in (False, True)}


def grouped(rows, w, sizes, transposed: bool = False):
    """rows [N, in] grouped in order (`sizes[g]` rows for group g) times their group's w, in the rows' dtype: a
    mixture's experts (a grouped matmul where the backend has one; XLA:CPU computes every group's product and
    keeps each row's)."""
    return jax.lax.ragged_dot_general(rows, w.astype(rows.dtype), sizes, _GROUPED[transposed])


def row_major(a):
    """`a` materialised row-major on CPU: XLA:CPU's bf16 matmul takes no transposed left operand (it
    would run in float32), and XLA otherwise folds a transpose into the product that reads it or lays
    it out as a free column-major view, inside a loop body (the chunked LM-head loss) as anywhere; in
    attention it even converted some bf16 products' operands to float32 (`attention._attend`)."""
    return with_layout_constraint(a, Layout(tuple(range(a.ndim)))) if _cpu_layouts() else a


def _cpu_layouts() -> bool:
    """Whether products lay their operands out for XLA:CPU: on a one-device CPU. Other backends choose their
    own layouts; and a layout constraint is not partitioned, so under a mesh of CPU devices XLA gathers
    the whole array to every device to apply it (the memory plan's test step: 3.7 -> 7.4 MB)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_2d(x, w, narrow: bool):
    return _product("mk,kn->mn", x, w, x.dtype)


def _matmul_2d_fwd(x, w, narrow):
    """A trained weight's gradient xᵀ·g keeps what that product reads, laid out as it reads it: xᵀ
    row-major (`row_major`), or for a `narrow` weight (fewer outputs than inputs: LoRA's A, [in, r]) x
    itself, its gradient then (gᵀ·x)ᵀ: transposing g [m, r] and the result costs far less than x [m, in]
    (in-process A/B, the bench's bf16 LoRA step 0.96x; full fine-tuning's down_proj 0.99x)."""
    kept = None if not w.perturbed else x.value if narrow else row_major(x.value.T)
    return _product("mk,kn->mn", x.value, w.value, x.value.dtype), (kept, w.value if x.perturbed else None)


def _matmul_2d_bwd(narrow, res, g):
    kept, w = res
    dx = None if w is None else _product("mn,kn->mk", g, w, g.dtype)
    if kept is None:
        return dx, None
    if narrow:
        return dx, _product("nm,mk->nk", row_major(g.T), kept, g.dtype).T
    return dx, _product("km,mn->kn", kept, g, g.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd, symbolic_zeros=True)
