"""Rematerialisation is a memory knob only: same values, same gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals lists


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_gradients(tiny_llama, policy):
    model, params = jpeft.from_pretrained(tiny_llama[1])
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 8)))

    def loss(m, p):
        return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, ids))[..., 0])

    rematted = model.clone(config=model.config.replace(remat=policy))
    g_plain = jax.grad(lambda p: loss(model, p))(params)
    g_remat = jax.grad(lambda p: loss(rematted, p))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_remat_gives_same_gradients_in_every_family(tmp_path, family):
    from conftest import GPT2, make_hf_model, make_t5, save_hf_model
    path = make_t5(tmp_path)[1] if family == "t5" else save_hf_model(make_hf_model("gpt2", **GPT2), tmp_path)
    model, params = jpeft.from_pretrained(path)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 8)))
    args = (ids, ids) if family == "t5" else (ids,)

    def grads(m):
        return jax.grad(lambda p: jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, *args))[..., 0]))(params)

    rematted = model.clone(config=model.config.replace(remat="full"))
    plain, again = grads(model), grads(rematted)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(again)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)  # float32 recomputation
    saved = [sum(aval.size for aval, why in saved_residuals(
        lambda p: jnp.mean(m.apply({"params": p}, *args)), params) if not why.startswith("from the argument"))
        for m in (model, rematted)]
    assert saved[1] < saved[0], saved  # the knob really reaches this family's blocks


def test_remat_really_saves_less_for_the_backward_pass(tmp_path):
    """Remat must change what the backward pass keeps, not only leave gradients alone: fewer activation
    bytes saved as residuals and less scratch memory in the compiled gradient, full < dots < none."""
    from conftest import make_hf_model, save_hf_model

    hf = make_hf_model("llama", num_hidden_layers=4, hidden_size=64, intermediate_size=128, head_dim=16)
    model, params = jpeft.from_pretrained(save_hf_model(hf, tmp_path))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (4, 64)))
    saved, temp = {}, {}
    for policy in ("none", "dots", "full"):
        rematted = model.clone(config=model.config.replace(remat=policy))

        def loss(p):
            return jnp.mean(jax.nn.log_softmax(rematted.apply({"params": p}, ids))[..., 0])

        saved[policy] = sum(aval.size * aval.dtype.itemsize for aval, why in saved_residuals(loss, params)
                            if not why.startswith("from the argument"))  # activations, not the weights
        temp[policy] = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
    assert saved["full"] < saved["dots"] < saved["none"] / 2, saved
    assert temp["full"] < temp["dots"] < temp["none"] / 2, temp


@pytest.mark.parametrize("name", ["activate", "_rms_normed", "_layer_normed"])
def test_float32_math_on_bf16_inputs_saves_only_its_inputs(name):
    """The layers' float32 math on bf16 activations (MLP activation, norms) keeps only its bf16 inputs for
    the backward pass, which recomputes it, where plain autodiff keeps its float32 intermediates (stacked
    for every layer by the scan); the gradients are the plain math's."""
    from jpeft.models import layers as L

    r = np.random.RandomState(0)
    x, up = (jnp.asarray(r.randn(4, 6, 16), jnp.bfloat16) for _ in range(2))
    w, b = (jnp.asarray(r.randn(16), jnp.float32) for _ in range(2))
    fn = getattr(L, name)
    call = {"activate": lambda f, x, w: f("silu", x, up * w.astype(jnp.bfloat16)),
            "_rms_normed": lambda f, x, w: f(x, w, 1e-5, False, False),
            "_layer_normed": lambda f, x, w: f(x, w, b, 1e-5)}[name]

    def loss(f):
        return lambda x, w: jnp.sum(call(f, x, w).astype(jnp.float32) * jnp.arange(16.0))

    def float32_saved(f):
        return [str(aval) for aval, why in saved_residuals(loss(f), x, w)
                if aval.dtype == jnp.float32 and aval.shape == x.shape]

    assert float32_saved(fn.__wrapped__), "the plain math keeps float32 intermediates"
    assert float32_saved(fn) == []
    for got, want in zip(jax.grad(loss(fn), (0, 1))(x, w), jax.grad(loss(fn.__wrapped__), (0, 1))(x, w)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_a_float32_norm_scale_acts_below_bf16s_resolution():
    """Llama's RMSNorm on bf16 activations multiplies a float32 scale (a trained one: full fine-tuning, norm tuning)
    in float32 and rounds once, as torch promotes w · x.to(bf16): a change below bf16's resolution at 1 reaches the
    output, where rounding the scale to bf16 first dropped it; the output is torch's rounded to bf16."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from jpeft.models import layers as L

    x = jnp.asarray(np.random.RandomState(0).randn(64, 32), jnp.bfloat16)
    scale = jnp.full(32, 1 + 3e-3, jnp.float32)  # 1 in bf16 (its spacing there: 2⁻⁷)
    ours = np.asarray(L._rms_normed(x, scale, 1e-6, False, False), np.float32)
    assert (ours != np.asarray(L._rms_normed(x, jnp.ones(32), 1e-6, False, False), np.float32)).any()
    norm = LlamaRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.fill_(1 + 3e-3)
        theirs = norm(torch.tensor(np.asarray(x, np.float32)).to(torch.bfloat16)).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2 ** -8, atol=0)  # rsqrt's last bit may round either way


def test_attention_values_keep_one_bf16_copy_of_the_probabilities():
    """softmax(scores)·v keeps only the bf16 probabilities for the backward pass (the product's own gradient
    needs them), where plain autodiff keeps softmax's float32 output beside them; its gradient (softmax's
    row term from the output, FlashAttention's) is autodiff's to float32 rounding in float32 and to bf16's
    precision in bf16, and masked keys get none."""
    from jpeft.models.attention import attention_values

    r = np.random.RandomState(0)
    scores = jnp.asarray(3 * r.randn(2, 3, 5, 7), jnp.float32).at[..., -2:].set(-1e30)  # masked keys
    values = jnp.asarray(r.randn(2, 3, 7, 4), jnp.float32)
    weights = jnp.asarray(r.randn(2, 3, 5, 4), jnp.float32)

    def plain(s, v):
        return jnp.einsum("...qs,...sd->...qd", jax.nn.softmax(s, axis=-1).astype(v.dtype), v,
                          preferred_element_type=jnp.float32).astype(v.dtype)

    def loss(f, dtype):
        return lambda s, v: jnp.sum(f(s, v.astype(dtype)).astype(jnp.float32) * weights)

    def kept(f, dtype):
        return sorted(str(aval.dtype) for aval, why in saved_residuals(loss(f, dtype), scores, values)
                      if aval.shape == scores.shape)

    assert kept(plain, jnp.bfloat16) == ["bfloat16", "float32"]
    assert kept(attention_values, jnp.bfloat16) == ["bfloat16"]
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        got = jax.grad(loss(attention_values, dtype), (0, 1))(scores, values)
        want = jax.grad(loss(plain, dtype), (0, 1))(scores, values)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(jnp.abs(w).max()))
        assert float(jnp.abs(got[0][..., -2:]).max()) == 0.0
