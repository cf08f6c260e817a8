"""NF4 / int8 frozen weights: exact against bitsandbytes, within the table's error bound, really small."""
import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from jpeft.peft import quant


def weight(shape, seed=0):
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


def test_tables_are_bitsandbytes_own():
    np.testing.assert_array_equal(quant.NF4, bnbf.get_4bit_type("nf4", device="cpu").numpy())
    # to one float32 ulp: torch's vectorised linspace rounds some boundaries differently per CPU
    np.testing.assert_allclose(quant.DYNAMIC, bnbf.create_dynamic_map(signed=True).numpy(), rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_codes_and_dequantized_weights_equal_bitsandbytes(double_quant):
    w = weight((96, 256))  # PyTorch's [out, in]; jpeft's kernel is its transpose
    packed, state = bnbf.quantize_4bit(torch.tensor(w), blocksize=64, quant_type="nf4",
                                       compress_statistics=double_quant)
    ours = quant.quantize(w.T, "nf4", double_quant)
    theirs_codes = packed.numpy().reshape(96, 128)                      # [out, in/2]
    np.testing.assert_array_equal(ours["kernel_nf4"].T, theirs_codes)
    reference = bnbf.dequantize_4bit(packed, state).numpy()
    np.testing.assert_allclose(np.asarray(quant.dequantize(ours)).T, reference, rtol=1e-6, atol=1e-7)
    if double_quant:
        assert ours["kernel_absmax_q"].dtype == np.uint8 and "kernel_absmax" not in ours


def test_error_within_the_table_bound():
    w = weight((2, 128, 64), seed=1)
    for kind, bound in (("nf4", np.max(np.diff(quant.NF4)) / 2), ("int8", 0.5 / 127)):
        leaves = quant.quantize(w, kind)
        absmax = np.repeat(leaves["kernel_absmax"], 64, axis=-2)
        err = np.abs(np.asarray(quant.dequantize(leaves)) - w)
        assert np.all(err <= absmax * bound * (1 + 1e-6) + 1e-7), kind
        assert err.max() > 0


def test_stored_base_is_really_four_bit():
    w = weight((2, 256, 512), seed=2)
    bf16 = w.size * 2
    for double_quant, limit in ((False, 0.3), (True, 0.27)):
        stored = sum(np.asarray(v).nbytes for v in quant.quantize(w, "nf4", double_quant).values())
        assert stored <= limit * bf16, (double_quant, stored / bf16)
    assert sum(np.asarray(v).nbytes for v in quant.quantize(w, "int8").values()) <= 0.6 * bf16


def test_stacked_layers_quantize_like_each_layer_and_dequantize_under_jit():
    w = weight((3, 128, 64), seed=3)
    stacked = quant.quantize(w, "nf4", double_quant=True)
    for i in range(3):
        alone = quant.quantize(w[i], "nf4", double_quant=True)
        for name, value in alone.items():
            np.testing.assert_array_equal(stacked[name][i], value, err_msg=name)
    np.testing.assert_allclose(jax.jit(quant.dequantize)(stacked), quant.dequantize(stacked), rtol=1e-6)


def test_small_inputs_use_smaller_blocks_and_odd_ones_are_an_error():
    w = weight((32, 8), seed=4)  # input 32: one block of 32 per output unit
    leaves = quant.quantize(w, "nf4")
    assert leaves["kernel_absmax"].shape == (1, 8)
    np.testing.assert_allclose(leaves["kernel_absmax"][0], np.abs(w).max(axis=0))
    assert np.abs(np.asarray(quant.dequantize(leaves)) - w).max() <= np.abs(w).max() * 0.14
    with pytest.raises(jpeft.JpeftError, match="input size 33 is odd"):
        quant.quantize(weight((33, 8)), "nf4")


@pytest.fixture
def qlora_base(tmp_path):
    from conftest import make_hf_model, save_hf_model
    return jpeft.from_pretrained(save_hf_model(make_hf_model("llama", hidden_size=64, intermediate_size=128),
                                               tmp_path / "base"))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_is_lora_on_the_dequantized_base(qlora_base, kind):
    """Same logits as LoRA on the dequantized weights; merge dequantizes; counts are PEFT's."""
    model, params = qlora_base
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 9)))
    method = jpeft.QLoRA(rank=4, alpha=8, targets=["q_proj", "down_proj"], quant=kind, double_quant=True)
    adapted = method.init(jax.random.key(0), params)
    layers = adapted["model"]["layers"]["self_attn"]["q_proj"]
    assert "kernel" not in layers and f"kernel_{kind}" in layers
    assert jpeft.count_parameters(adapted) == jpeft.count_parameters(
        jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "down_proj"]).init(jax.random.key(0), params))
    b = jax.random.normal(jax.random.key(1), layers["lora_b"].shape) * 0.1
    adapted["model"]["layers"]["self_attn"]["q_proj"] = {**layers, "lora_b": b}
    merged = jpeft.merge(adapted)
    np.testing.assert_allclose(model.apply({"params": merged}, ids), model.apply({"params": adapted}, ids),
                               atol=2e-5, rtol=0)
    plain = model.apply({"params": params}, ids)
    assert np.abs(np.asarray(model.apply({"params": adapted}, ids) - plain)).max() > 1e-3
