"""`model.dtype: auto`: bfloat16 only where matmuls in it are native."""
import functools
import re
import pytest

from jpeft.hardware import auto_dtype, cpu_flags, resolve_dtype, wide_vectors
from conftest import dot_operand_types


@pytest.mark.parametrize("backend, flags, want", [
    ("gpu", frozenset(), "bfloat16"),
    ("tpu", frozenset(), "bfloat16"),
    ("cpu", frozenset({"avx2", "avx512f", "avx512bw"}), "float32"),  # AVX-512 without BF16: emulated
    ("cpu", frozenset({"avx2", "fma"}), "float32"),
    ("cpu", frozenset({"avx512f", "avx512_bf16"}), "bfloat16"),
    ("cpu", frozenset({"amx_bf16", "amx_tile"}), "bfloat16"),
    ("cpu", frozenset({"asimd", "bf16"}), "bfloat16"),  # Arm FEAT_BF16
    ("cpu", frozenset(), "float32"),  # no /proc/cpuinfo (macOS): the safe choice
])
def test_auto_picks_bf16_only_where_native(backend, flags, want):
    assert auto_dtype(backend, flags) == want


def test_resolve_keeps_explicit_choices_and_reads_this_machine():
    assert resolve_dtype("float32") == "float32" and resolve_dtype(None) is None
    assert resolve_dtype("auto") == ("bfloat16" if {"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags() else "float32")


def test_auto_is_the_default_and_from_pretrained_takes_it(tiny_llama):
    from jpeft.config import RunConfig
    from jpeft.models.hf import from_pretrained
    assert RunConfig().model.dtype == "auto"
    model, params = from_pretrained(tiny_llama[1], dtype="auto")
    assert model.config.dtype == resolve_dtype("auto")


def test_wide_vectors_only_on_avx512():
    assert wide_vectors(frozenset({"avx2", "avx512f"})) == {"xla_cpu_prefer_vector_width": 512}
    assert wide_vectors(frozenset({"avx2", "fma"})) == {} and wide_vectors(frozenset()) == {}


def test_decoding_loop_compiles_with_this_cpus_vector_width(tiny_llama):
    """The option reaches XLA (an unknown one would fail the compile) and the tokens are unchanged by it."""
    import jax
    import jax.numpy as jnp

    from jpeft import generate as G
    from jpeft.models.hf import from_pretrained
    model, params = from_pretrained(tiny_llama[1], dtype="float32")
    args = (params, jnp.ones((1, 32), jnp.int32), jnp.ones((1, 32), jnp.int32), jnp.full((8,), -1, jnp.int32),
            jnp.float32(1.0), jnp.float32(1.0), jax.random.key(0), jnp.int32(0))
    plain = jax.jit(G._decode, static_argnums=(0, 1, 2))
    assert (G._decoder("float32")(model, 4, None, *args) == plain(model, 4, None, *args)).all()


@functools.cache
def _compiled_bf16_step(mode: str, **sizes) -> str:
    """The HLO of the bench's tiny bf16 train step, compiled for this CPU."""
    import jax

    from jpeft.bench_jpeft import _batch, _step
    a = dict(vocab=128, hidden=32, layers=2, heads=2, kv_heads=2, mlp=48, batch=2, seq=16, rank=4, alpha=8,
             targets=["q_proj", "v_proj"], remat="none", seed=0, dtype="bfloat16", warmup=0, steps=1) | sizes
    _, _, step, trees = _step(a, mode)
    _, state, frozen = jax.eval_shape(trees)
    return step.lower(state, frozen, _batch(a)).compile().as_text()


def test_bf16_train_step_moves_frozen_weights_in_bf16():
    """On CPU the compiled bf16 LoRA step slices each frozen bf16 weight stack as it is: no float32 copy."""
    hlo = _compiled_bf16_step("lora")
    assert "bf16[2,32,48]" in hlo  # the frozen gate/up kernels, stacked over the 2 layers
    assert "f32[2,32,48]" not in hlo


def test_bf16_lm_head_weight_gradient_is_a_bf16_product():
    """Full fine-tuning's chunked loss takes the LM head's [hidden, vocab] weight gradient from each chunk's
    hidden states transposed: on CPU they are materialised row-major, so the product reads both operands
    in bf16 (XLA:CPU converts the operands of a bf16 product whose left one is transposed to float32)."""
    assert dot_operand_types(_compiled_bf16_step("full", seq=20), "f32[32,128]") == [["bf16", "bf16"]]


def test_bf16_step_computes_no_transcendental_in_bf16():
    """XLA:CPU runs a bf16 exp or divide several times slower than a float32 one: the MLP's activation
    (and so its gradient) runs in float32 and rounds once, so the compiled bf16 step has none."""
    hlo = _compiled_bf16_step("lora")
    assert not re.findall(r"bf16\[[\d,]*\]\{[\d,]*\} (?:logistic|exponential|tanh|divide)\(", hlo)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_every_product_of_the_bf16_step_reads_bf16(mode):
    """Attention's products included: its key and value gradients (gᵀ·q, pᵀ·g) read their transposed
    operand materialised, and q, k, v are laid out row-major for its batched products; otherwise XLA:CPU
    converts some of those products' operands to float32 (rows of 256: two query blocks)."""
    operands = dot_operand_types(_compiled_bf16_step(mode, vocab=512, hidden=128, mlp=256, seq=256))
    assert len(operands) > 30 and {dtype for pair in operands for dtype in pair} == {"bf16"}, operands
