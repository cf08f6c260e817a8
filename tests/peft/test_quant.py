"""NF4 / int8 frozen weights: exact against bitsandbytes, within the table's error bound, really small."""
import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from jpeft.peft import quant
from conftest import jit_logits

LUT_STEP = 2 / 65535  # bitsandbytes' CPU 8-bit kernel rounds x in [-1, 1] to this grid, then takes the nearest code


def weight(shape, seed=0):
    """Normal weights whose rows have different scales, so absmax values spread as in a real model."""
    rs = np.random.RandomState(seed)
    return (rs.standard_normal(shape) * np.exp(rs.uniform(-1, 1, shape[:-1] + (1,)))).astype(np.float32)


def bnb_nf4(w, double_quant):
    """bitsandbytes' packed codes [out, in/2], its state and its dequantized weight, for a torch weight [out, in]."""
    packed, state = bnbf.quantize_4bit(torch.tensor(w), blocksize=64, quant_type="nf4",
                                       compress_statistics=double_quant)
    return packed.numpy().reshape(w.shape[0], -1), state, bnbf.dequantize_4bit(packed, state).numpy()


def unpack(packed):
    return np.stack([packed >> 4, packed & 15], axis=-1).reshape(*packed.shape[:-1], -1)


def test_tables_are_bitsandbytes_own():
    np.testing.assert_array_equal(quant.NF4, bnbf.get_4bit_type("nf4", device="cpu").numpy())
    # to 2 float32 ulps: torch's vectorised linspace rounds some boundaries differently per CPU
    np.testing.assert_allclose(quant.DYNAMIC, bnbf.create_dynamic_map(signed=True).numpy(), rtol=2.5e-7, atol=0)


def test_nf4_codes_absmax_and_weights_equal_bitsandbytes():
    w = weight((96, 256))  # PyTorch's [out, in]; jpeft's kernel is its transpose
    theirs, state, reference = bnb_nf4(w, double_quant=False)
    ours = quant.quantize(w.T, "nf4")
    assert ours["kernel_nf4"].dtype == np.uint8 and ours["kernel_nf4"].shape == (128, 96)
    np.testing.assert_array_equal(ours["kernel_nf4"].T, theirs)          # same bytes, same nibble order
    np.testing.assert_array_equal(unpack(ours["kernel_nf4"].T), unpack(theirs))
    np.testing.assert_array_equal(ours["kernel_absmax"].T, state.absmax.numpy().reshape(96, 4))
    np.testing.assert_allclose(np.asarray(quant.dequantize(ours)).T, reference, rtol=1e-6, atol=0)


def test_double_quantized_state_of_bitsandbytes_dequantizes_to_its_weights():
    """bitsandbytes' own nested state, laid out as jpeft's leaves: the same weights (layout and 256-block order)."""
    w = weight((48, 512), seed=1)  # 8 absmax per output unit: 384 values, groups of 256 straddle output units
    packed, state, reference = bnb_nf4(w, double_quant=True)
    leaves = {"kernel_nf4": packed.T, "kernel_absmax_q": state.absmax.numpy().reshape(48, 8).T,
              "kernel_absmax_scale": state.state2.absmax.numpy(), "kernel_absmax_offset": state.offset.numpy()}
    np.testing.assert_allclose(np.asarray(quant.dequantize(leaves)).T, reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", [1, 2, 3])  # seed 2: bitsandbytes' CPU kernel picks 2 of 384 codes differently
def test_double_quantization_equals_bitsandbytes(seed):
    w = weight((48, 512), seed=seed)
    packed, state, reference = bnb_nf4(w, double_quant=True)
    ours = quant.quantize(w.T, "nf4", double_quant=True)
    assert "kernel_absmax" not in ours and ours["kernel_absmax_q"].dtype == np.uint8
    np.testing.assert_array_equal(ours["kernel_nf4"].T, packed)
    np.testing.assert_allclose(ours["kernel_absmax_offset"], state.offset.numpy(), rtol=1e-6)
    scale = state.state2.absmax.numpy()
    np.testing.assert_allclose(ours["kernel_absmax_scale"], scale, rtol=1e-6)

    # Codes: ours are the nearest; bitsandbytes' CPU kernel takes the code nearest to x rounded to a 2/65535
    # grid, so where they differ (rarely) its code is at most 2/65535 further from x than ours.
    ours_q, theirs_q = ours["kernel_absmax_q"].T.reshape(-1), state.absmax.numpy()
    absmax = np.abs(w.reshape(-1, 64)).max(axis=1)                  # bitsandbytes' block order
    group_scale = np.repeat(scale, 256)[: absmax.size]
    x = (absmax - state.offset.item()) / group_scale
    ours_err, theirs_err = np.abs(quant.DYNAMIC[ours_q] - x), np.abs(quant.DYNAMIC[theirs_q] - x)
    assert np.all(ours_err <= theirs_err + 1e-7) and np.all(theirs_err <= ours_err + LUT_STEP + 1e-7)
    assert np.mean(ours_q != theirs_q) < 0.02

    # Weights: equal where the absmax codes agree; elsewhere they differ by |NF4 value| · that code difference.
    code_gap = group_scale * np.abs(quant.DYNAMIC[ours_q] - quant.DYNAMIC[theirs_q])
    diff = np.abs(np.asarray(quant.dequantize(ours)).T - reference).reshape(-1, 64)
    assert np.all(diff <= 1e-6 * np.abs(reference).reshape(-1, 64) + code_gap[:, None] * (1 + 1e-6))


def test_mxfp4_takes_the_mx_scale_and_the_nearest_fp4_values_and_keeps_mxfp4_values_exactly():
    """Each block of 32 scaled by the power of two that puts its largest magnitude in [4, 8) (the OCP MX rule),
    every value the nearest FP4 (E2M1) one; weights that already are MXFP4 come back bit for bit."""
    w = weight((48, 256), seed=4).T  # a kernel [in, out]
    leaves = quant.quantize(w, "mxfp4")
    assert leaves["kernel_mxfp4"].shape == (128, 48) and leaves["kernel_exponent"].dtype == np.uint8
    scale = 2.0 ** (np.asarray(leaves["kernel_exponent"], np.float64) - 127)[:, None, :]  # [8, 1, 48]
    scaled = w.reshape(8, 32, 48) / scale
    assert (np.abs(scaled).max(axis=1) >= 4).all() and (np.abs(scaled).max(axis=1) < 8).all()
    nearest = quant.FP4[np.abs(scaled[..., None] - quant.FP4).argmin(-1)]  # ties to the lower, past 6 to 6
    np.testing.assert_array_equal(np.asarray(quant.dequantize(leaves)).reshape(8, 32, 48) / scale, nearest)
    exact = np.asarray(quant.dequantize(leaves))
    np.testing.assert_array_equal(quant.dequantize(quant.quantize(exact, "mxfp4")), exact)


def test_error_within_the_table_bound():
    w = weight((2, 128, 64), seed=1)
    for kind, bound in (("nf4", np.max(np.diff(quant.NF4)) / 2), ("int8", 0.5 / 127)):
        leaves = quant.quantize(w, kind)
        absmax = np.repeat(leaves["kernel_absmax"], 64, axis=-2)
        err = np.abs(np.asarray(quant.dequantize(leaves)) - w)
        assert np.all(err <= absmax * bound * (1 + 1e-6) + 1e-7), kind
        assert err.max() > 0.5 * bound * absmax.max(), kind  # the bound is tight, not vacuous


def test_stored_base_is_really_four_bit():
    w = weight((2, 256, 512), seed=2)
    bf16 = w.size * 2

    def ratio(*args):
        return sum(np.asarray(v).nbytes for v in quant.quantize(w, *args).values()) / bf16

    assert ratio("nf4") == pytest.approx(0.28125) and ratio("nf4") <= 0.3           # 4 bits + f32 per 64
    assert ratio("nf4", True) == pytest.approx(0.25795, abs=1e-5)                    # 4 bits + 8 bits per 64
    assert ratio("int8") == pytest.approx(0.53125) and ratio("int8") <= 0.6


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
def test_stacked_layers_quantize_like_each_layer(kind, double_quant):
    w = weight((3, 128, 64), seed=3)
    stacked = quant.quantize(w, kind, double_quant)
    for i in range(3):
        alone = quant.quantize(w[i], kind, double_quant)
        assert alone.keys() == stacked.keys()
        for name, value in alone.items():
            np.testing.assert_array_equal(stacked[name][i], value, err_msg=name)
    np.testing.assert_array_equal(quant.dequantize(stacked), np.stack([quant.dequantize(quant.quantize(
        w[i], kind, double_quant)) for i in range(3)]))


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
def test_quantize_under_jit_is_bit_identical(kind, double_quant):
    """The trainer quantizes under jit, on sharded weights: the same bytes as the eager (bitsandbytes-checked) path."""
    w = weight((3, 256, 384), seed=5)
    eager, jitted = quant.quantize(w, kind, double_quant), jax.jit(lambda w: quant.quantize(w, kind, double_quant))(w)
    assert eager.keys() == jitted.keys()
    for name in eager:
        np.testing.assert_array_equal(jitted[name], eager[name], err_msg=name)


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
def test_dequantize_under_jit_ignores_other_leaves(kind, double_quant):
    w = weight((2, 128, 96), seed=4)
    leaves = quant.quantize(w, kind, double_quant)
    module = {**leaves, "lora_a": jnp.ones((2, 128, 4)), "bias": jnp.zeros((2, 96))}
    eager = np.asarray(quant.dequantize(leaves))
    # to an ulp: XLA fuses double quantization's code · scale + offset into one fused multiply-add
    np.testing.assert_allclose(jax.jit(quant.dequantize)(module), eager, rtol=1e-6, atol=0)
    bf16 = jax.jit(lambda p: quant.dequantize(p, jnp.bfloat16))(module)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == w.shape
    np.testing.assert_allclose(np.asarray(bf16, np.float32), eager, rtol=2 ** -8, atol=0)


def test_names_counts_and_kind_detection():
    w = weight((2, 128, 96), seed=5)
    for args in (("nf4",), ("nf4", True), ("int8",)):
        leaves = quant.quantize(w, *args)
        assert set(leaves) <= set(quant.QUANT_LEAVES) and quant.is_quantized(leaves)
        assert quant.num_elements(leaves) == w.size
    assert not quant.is_quantized({"kernel": w, "lora_a": w})


def test_small_inputs_are_one_block_and_other_sizes_are_an_error():
    w = weight((32, 8), seed=6)  # input 32 < 64: one block per output unit
    leaves = quant.quantize(w, "nf4")
    np.testing.assert_array_equal(leaves["kernel_absmax"], np.abs(w).max(axis=0, keepdims=True))
    with pytest.raises(jpeft.JpeftError, match=r"shape \(96, 8\).*input size 96 .*block size 64"):
        quant.quantize(weight((96, 8)), "int8")
    with pytest.raises(jpeft.JpeftError, match=r"shape \(33, 8\).*input size 33"):
        quant.quantize(weight((33, 8)), "nf4")
    with pytest.raises(jpeft.JpeftError, match="unknown quantization 'fp4'"):
        quant.quantize(w, "fp4")


def test_qlora_keeps_t5s_wo_float_names_the_module_and_refuses_int8_double_quant(tmp_path):
    """transformers loads T5's feed-forward output `wo` unquantized under bitsandbytes (_keep_in_fp32_modules)."""
    from conftest import make_hf_model, make_t5, save_hf_model
    _, t5 = jpeft.from_pretrained(make_t5(tmp_path / "t5")[1])
    modules = jpeft.tree.modules(jpeft.QLoRA(2, 4, ["q", "wo"]).init(jax.random.key(0), t5))
    for path, leaves in modules.items():
        if "kernel" in leaves or quant.is_quantized(leaves):
            assert ("kernel" in leaves) == (path.endswith("/wo") or not jpeft.tree.is_stacked(path + "/kernel")), path
    assert any(path.endswith("/wo") and "lora_a" in leaves for path, leaves in modules.items())
    _, odd = jpeft.from_pretrained(save_hf_model(make_hf_model("llama", hidden_size=32, intermediate_size=96),
                                                 tmp_path / "odd"))
    with pytest.raises(jpeft.JpeftError, match=r"model.layers.mlp.down_proj: cannot quantize .* input size 96"):
        jpeft.QLoRA(2, 4, ["q_proj"]).init(jax.random.key(0), odd)
    with pytest.raises(jpeft.JpeftError, match="double_quant quantizes NF4's absmax blocks; int8 and MXFP4 have none"):
        jpeft.QLoRA(2, 4, ["q_proj"], quant="int8", double_quant=True)


@pytest.fixture
def qlora_base(tmp_path):
    from conftest import make_hf_model, save_hf_model
    return jpeft.from_pretrained(save_hf_model(make_hf_model("llama", hidden_size=64, intermediate_size=128),
                                               tmp_path / "base"))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_is_lora_on_the_dequantized_base(qlora_base, kind, caplog):
    """Same logits as LoRA on the dequantized weights; merge dequantizes; counts are PEFT's."""
    model, params = qlora_base
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 9)))
    method = jpeft.QLoRA(rank=4, alpha=8, targets=["q_proj", "down_proj"], quant=kind, double_quant=kind == "nf4")
    adapted = method.init(jax.random.key(0), params)
    layers = adapted["model"]["layers"]["self_attn"]["q_proj"]
    assert "kernel" not in layers and f"kernel_{kind}" in layers
    assert jpeft.count_parameters(adapted) == jpeft.count_parameters(
        jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "down_proj"]).init(jax.random.key(0), params))
    b = jax.random.normal(jax.random.key(1), layers["lora_b"].shape) * 0.1
    adapted["model"]["layers"]["self_attn"]["q_proj"] = {**layers, "lora_b": b}
    merged = jpeft.merge(adapted)
    assert "the base is quantized; it is dequantized to float32" in caplog.text
    assert merged["model"]["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(jit_logits(model, merged, ids), jit_logits(model, adapted, ids),
                               atol=2e-5, rtol=0)
    plain = jit_logits(model, params, ids)
    assert np.abs(np.asarray(model.apply({"params": adapted}, ids) - plain)).max() > 1e-3


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_experts_are_bitsandbytes_blocks_per_expert_and_qlora_on_them_merges_and_trains(tmp_path, kind):
    """`expert_quant`: a mixture's stacks stored in 4 or 8 bits, each expert's NF4 blocks bitsandbytes' over its
    own [out, in] weight; LoRA on attention and on the experts over them merges exactly and gets gradients; counts
    are LoRA's on the float base, and the quantized leaves lie on the mesh as the weight would."""
    from conftest import FAMILIES, check_merges_and_trains, make_hf_model, perturb, save_hf_model
    from jpeft import tree as T
    from jpeft.models.hf import abstract_params
    from jpeft.parallel.mesh import logical_axes
    from jpeft.peft.qlora import QuantizedExperts
    torch_model = make_hf_model("mixtral", **FAMILIES["mixtral"], hidden_size=64, intermediate_size=128)
    model, params = jpeft.from_pretrained(save_hf_model(torch_model, tmp_path / "base"))
    options = dict(rank=2, targets=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert "weight" in T.modules(jpeft.QLoRA(**options).init(jax.random.key(0), params))[
        "model/layers/mlp/experts/down_proj"]  # by default the stacks stay float, as under bitsandbytes
    adapted = jpeft.QLoRA(quant=kind, expert_quant=kind, **options).init(jax.random.key(0), params)
    for name, (out, d_in) in {"gate_up_proj": (256, 64), "down_proj": (64, 128)}.items():
        leaves = T.modules(adapted)[f"model/layers/mlp/experts/{name}"]
        stored = leaves[f"weight_{kind}"]
        assert "weight" not in leaves and stored.shape == (2, 4, d_in // (2 if kind == "nf4" else 1), out)
        dequantized = np.asarray(QuantizedExperts.expert_weight(leaves, jnp.float32))
        weights = getattr(torch_model.model.layers[1].mlp.experts, name).detach().numpy()
        for expert, w in enumerate(weights):
            if kind == "nf4":
                reference = bnb_nf4(w, double_quant=False)[2]
                np.testing.assert_allclose(dequantized[1, expert].T, reference, rtol=1e-6, atol=0)
            else:  # half a step of 1/127 of each block's absmax
                absmax = np.abs(w).max(axis=1, keepdims=True)
                assert (np.abs(dequantized[1, expert].T - w) <= absmax / 254 * (1 + 1e-6)).all()
    axes = logical_axes(adapted, abstract_params(model))
    assert axes[f"model/layers/mlp/experts/gate_up_proj/weight_{kind}"] == ("layers", "experts", "embed", "mlp")
    lora = jpeft.LoRA(**options).init(jax.random.key(0), params)
    assert jpeft.count_parameters(adapted) == jpeft.count_parameters(lora)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 9)))
    check_merges_and_trains(model, params, perturb(adapted, ("lora_b",)), ids)
    dense = jpeft.from_pretrained(save_hf_model(make_hf_model("llama"), tmp_path / "dense"))[1]
    with pytest.raises(jpeft.JpeftError, match="expert_quant: this model has no mixture of experts"):
        jpeft.QLoRA(expert_quant="nf4").init(jax.random.key(0), dense)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_quantized_load_reads_a_layer_at_a_time_the_codes_quantizing_the_loaded_base_gives(tmp_path, dtype):
    """from_pretrained(quantize=qlora): each quantized weight read one layer's slice at a time, into the leaves
    QLoRA.init makes of the loaded float base (codes bit for bit; double quantization's float statistics to an ulp:
    their mean over one layer's blocks or the whole stack's rounds apart), experts too; init then adds LoRA alone."""
    from conftest import FAMILIES, make_hf_model, save_hf_model
    from jpeft import tree as T
    from jpeft.models import hf
    path = save_hf_model(make_hf_model("mixtral", **FAMILIES["mixtral"], hidden_size=64, intermediate_size=128),
                         tmp_path / "base")
    method = jpeft.QLoRA(rank=2, targets=["q_proj", "down_proj"], double_quant=True, expert_quant="nf4",
                         target_parameters=["mlp.experts.gate_up_proj"])
    expected = T.flatten(method.init(jax.random.key(0), jpeft.from_pretrained(path, dtype=dtype)[1]))
    reads, real = [], hf._read_slice
    spy = lambda path, parts, index: reads.append((path, index)) or real(path, parts, index)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf, "_read_slice", spy)
        _, loaded = jpeft.from_pretrained(path, dtype=dtype, quantize=method)
    assert {p for p, _ in reads if method.quantizes(p)} == {
        f"model/layers/{m}" for m in ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel", "self_attn/v_proj/kernel",
                                      "self_attn/o_proj/kernel", "mlp/experts/gate_up_proj/weight",
                                      "mlp/experts/down_proj/weight")}
    assert all(index[0] in (slice(0, 1), slice(1, 2)) for p, index in reads if method.quantizes(p))
    loaded = T.flatten(method.init(jax.random.key(0), loaded))
    assert loaded.keys() == expected.keys()
    for p, v in expected.items():
        assert loaded[p].dtype == v.dtype, p
        if v.dtype == jnp.uint8:
            np.testing.assert_array_equal(loaded[p], v, err_msg=p)
        else:
            np.testing.assert_allclose(loaded[p], v, rtol=2e-7, atol=0, err_msg=p)
