"""Mixtures of experts (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, GraniteMoE(-Shared)) against transformers: logits,
gradients of every weight, the routers' weights in bfloat16, checkpoint files both ways (their experts read slice by
slice), and what jpeft refuses."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jpeft
from conftest import FAMILIES, jit_logits, make_hf_model, perturb, save_hf_model
from jpeft import tree as T
from jpeft.models import moe
from jpeft.models.config import ModelConfig
from jpeft.generate import generate
from jpeft.models.hf_experts import Mxfp4, Stacked, Transposed
from jpeft.peft.qlora import QuantizedExperts
from jpeft.train import step

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "granitemoeshared")
CASES = {
    **{family: (family, FAMILIES[family]) for family in MOE},
    "mixtral-top1-sliding-tied": ("mixtral", dict(num_local_experts=3, num_experts_per_tok=1, sliding_window=4,
                                                  tie_word_embeddings=True)),
    "qwen3_moe-unnormalised-all-experts": ("qwen3_moe", dict(FAMILIES["qwen3_moe"], norm_topk_prob=False,
                                                             num_experts_per_tok=4)),
    "qwen2_moe-no-qkv-bias": ("qwen2_moe", dict(FAMILIES["qwen2_moe"], qkv_bias=False)),
}
IDS = np.random.RandomState(0).randint(0, 97, (2, 12))


def torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    ref_model = make_hf_model(model_type, **overrides)
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(out), torch_logits(ref_model), atol=2e-4, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_gradients_of_router_experts_and_attention_match_torch(family, tmp_path):
    """The full fine-tune's gradients: through the top-k choice into the router, through each expert's rows."""
    ref_model = make_hf_model(family, **FAMILIES[family], initializer_range=0.2)
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    probe = np.random.RandomState(1).normal(size=(*IDS.shape, 97)).astype(np.float32)
    grads = jax.grad(lambda p: (model.apply({"params": p}, jnp.asarray(IDS)) * probe).sum())(params)
    (ref_model(torch.tensor(IDS)).logits * torch.tensor(probe)).sum().backward()
    layers = T.flatten(grads["model"]["layers"])
    for layer, torch_layer in enumerate(ref_model.model.layers):
        mlp = torch_layer.mlp
        for path, weight in (("mlp/gate/weight", mlp.gate.weight), ("mlp/experts/gate_up_proj/weight", mlp.experts.gate_up_proj),
                             ("mlp/experts/down_proj/weight", mlp.experts.down_proj),
                             ("self_attn/q_proj/kernel", torch_layer.self_attn.q_proj.weight)):
            expected = weight.grad.numpy()
            got = np.asarray(layers[path][layer])
            got = got.T if path.endswith("kernel") else got
            assert np.abs(expected).max() > 1e-3, path  # every expert path carries gradient here
            np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max(), rtol=0, err_msg=path)


@pytest.mark.parametrize("family,weight_dtype", [("mixtral", torch.float32), ("qwen3_moe", torch.bfloat16)])
def test_routers_weigh_experts_as_transformers_in_bfloat16(family, weight_dtype):
    """Mixtral keeps the chosen experts' weights in float32, Qwen rounds them to the compute dtype; both take a
    float32 softmax of bf16 logits."""
    ref_model = make_hf_model(family, **FAMILIES[family], initializer_range=0.5).to(torch.bfloat16)
    router = ref_model.model.layers[0].mlp.gate
    x = torch.randn(40, 32).to(torch.bfloat16)
    with torch.no_grad():
        logits, weights, experts = router(x)
    cfg = ModelConfig.from_hf(ref_model.config.to_dict())
    got_weights, got_experts = moe.route(cfg, jnp.asarray(logits.float().numpy(), jnp.bfloat16))
    assert weights.dtype == weight_dtype and got_weights.dtype == jnp.dtype(str(weight_dtype).split(".")[1])
    np.testing.assert_array_equal(np.asarray(got_experts), experts.numpy())
    # float32 softmaxes may differ in their last bit (exp's implementations); the rounding to bf16 hides that
    np.testing.assert_allclose(np.asarray(got_weights, np.float32), weights.float().numpy(), rtol=3e-7, atol=0)


@pytest.mark.parametrize("family,expert_name", [("mixtral", ".experts.3."), ("qwen2_moe", ".experts.3."),
                                                ("gpt_oss", ".experts.gate_up_proj_bias"),
                                                ("granitemoe", ".block_sparse_moe.input_linear.weight"),
                                                ("granitemoeshared", ".shared_mlp.output_linear.weight")])
def test_saved_files_are_transformers_own_and_load_back(family, expert_name, tmp_path):
    """Per-expert tensors under the family's own names (Mixtral's block_sparse_moe.experts.{e}.w1/w3/w2; GPT-OSS's
    stacks [E, in, out] and biases; GraniteMoE's whole stacks `input_linear`, `output_linear`), the same names and bits transformers writes, read back by transformers to the
    same logits."""
    ref_model = make_hf_model(family, **FAMILIES[family])
    path = save_hf_model(ref_model, tmp_path / "hf")
    model, params = jpeft.from_pretrained(path)
    jpeft.save_pretrained(str(tmp_path / "jpeft"), model, params)
    ours, theirs = load_file(tmp_path / "jpeft" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    assert any(expert_name in name for name in ours)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "jpeft", dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(reloaded), torch_logits(ref_model), atol=1e-6, rtol=0)


def test_stacked_experts_read_any_slice_from_their_parts(tmp_path):
    """What a device's shard of a sharded load reads: experts stacked, gate and up joined along their rows."""
    rng = np.random.default_rng(0)
    gate, up = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    save_file({f"{name}{e}": a[e] for name, a in (("g", gate), ("u", up)) for e in range(3)}, tmp_path / "w.safetensors")
    whole = np.concatenate([gate, up], axis=1)  # [E, 2I, D]
    with safe_open(tmp_path / "w.safetensors", "np") as f:
        stacked = Stacked([[f.get_slice(f"g{e}"), f.get_slice(f"u{e}")] for e in range(3)])
        assert stacked.get_shape() == list(whole.shape) and stacked.get_dtype() == "F32"
        for index in [(), (slice(1, 3),), (slice(0, 3), slice(3, 8), slice(1, 3)), (slice(2, 3), slice(0, 4)),
                      (slice(0, 1), slice(5, 10), slice(0, 4))]:
            np.testing.assert_array_equal(stacked[index], whole[index])


def test_transposed_experts_read_any_slice_as_out_by_in(tmp_path):
    """GPT-OSS's stacks [E, in, out] read as jpeft holds them, [E, out, in], one device's slice at a time."""
    stack = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
    save_file({"w": stack}, tmp_path / "w.safetensors")
    whole = stack.transpose(0, 2, 1)
    with safe_open(tmp_path / "w.safetensors", "np") as f:
        transposed = Transposed(f.get_slice("w"))
        assert transposed.get_shape() == list(whole.shape) and transposed.get_dtype() == "F32"
        for index in [(), (slice(1, 3),), (slice(0, 3), slice(3, 8), slice(1, 3)), (slice(2, 3), slice(0, 4))]:
            np.testing.assert_array_equal(transposed[index], whole[index])


def mxfp4_checkpoint(path):
    """A tiny GPT-OSS whose experts its file holds MXFP4-quantized, as the hub's gpt-oss files do (random codes,
    scales 2^-9..2^-5), and the torch model holding transformers' dequantization of them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    ref_model = make_hf_model("gpt_oss", **dict(FAMILIES["gpt_oss"], intermediate_size=32))  # inputs: whole blocks
    save_hf_model(ref_model, path)
    rng = np.random.default_rng(0)
    tensors = load_file(path / "model.safetensors")
    for name, stack in list(tensors.items()):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, d_in, d_out = stack.shape
            blocks = rng.integers(0, 256, (experts, d_out, d_in // 32, 16), dtype=np.uint8)
            scales = rng.integers(118, 123, (experts, d_out, d_in // 32), dtype=np.uint8)
            tensors.update({f"{name}_blocks": blocks, f"{name}_scales": scales})
            dequantized = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32)
            with torch.no_grad():
                ref_model.get_parameter(name).copy_(dequantized)
            del tensors[name]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (path / "config.json").write_text(json.dumps(config))
    return ref_model


def test_gpt_oss_mxfp4_experts_are_read_dequantized_and_saved_as_floats(tmp_path):
    """The hub's gpt-oss layout: experts as MXFP4 blocks and scales read as transformers dequantizes them (logits
    equal), any slice of them alone (a device's shard), and saved back as a float checkpoint transformers loads."""
    ref_model = mxfp4_checkpoint(tmp_path / "mxfp4")
    model, params = jpeft.from_pretrained(str(tmp_path / "mxfp4"))
    np.testing.assert_allclose(jit_logits(model, params, IDS), torch_logits(ref_model),
                               atol=2e-5, rtol=0)
    whole = np.asarray(params["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["weight"][1])
    with safe_open(tmp_path / "mxfp4" / "model.safetensors", "np") as f:
        stack = Mxfp4(*(f.get_slice(f"model.layers.1.mlp.experts.gate_up_proj_{part}") for part in ("blocks", "scales")))
        assert stack.get_shape() == list(whole.shape)
        for index in [(), (slice(1, 3), slice(5, 20)), (slice(0, 4), slice(0, 32), slice(7, 29)), (slice(3, 4),)]:
            np.testing.assert_array_equal(stack[index], whole[index])
    jpeft.save_pretrained(str(tmp_path / "float"), model, params)
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(reloaded), torch_logits(ref_model), atol=1e-6, rtol=0)
    # QLoRA reading them straight into NF4 experts, a layer's blocks at a time: the codes of the dequantized load's
    qlora = jpeft.QLoRA(targets=["q_proj"], expert_quant="nf4")
    read = T.flatten(qlora.init(jax.random.key(0), jpeft.from_pretrained(str(tmp_path / "mxfp4"), quantize=qlora)[1]))
    quantized = T.flatten(qlora.init(jax.random.key(0), params))
    assert read.keys() == quantized.keys() and all(np.array_equal(read[p], v) for p, v in quantized.items())
    # ... or into MXFP4 experts: the values it ships, exactly; with LoRA on them it decodes what it predicts
    exact = jpeft.QLoRA(targets=["q_proj"], expert_quant="mxfp4", target_parameters=["mlp.experts.down_proj"])
    held = jpeft.from_pretrained(str(tmp_path / "mxfp4"), quantize=exact)[1]
    for name in ("gate_up_proj", "down_proj"):
        stored = QuantizedExperts.expert_weight(T.modules(held)[f"model/layers/mlp/experts/{name}"], jnp.float32)
        float_stack = params["model"]["layers"]["mlp"]["experts"][name]["weight"]
        np.testing.assert_array_equal(np.swapaxes(stored, -1, -2), float_stack)
    tuned = perturb(exact.init(jax.random.key(0), held), ("lora_b",))
    prompt = [5, 9, 14, 3]
    got = generate(model, tuned, [prompt], 6, eos_token_id=None)[0]
    assert np.argmax(jit_logits(model, tuned, [prompt + got[:-1]])[0, 3:], axis=-1).tolist() == got


def test_gpt_oss_gradients_of_sinks_biases_router_and_experts_match_torch(tmp_path):
    """A full fine-tune's gradients through attention sinks (strong ones), the clamped activation of interleaved
    gate/up columns, the experts' and router's biases."""
    ref_model = make_hf_model("gpt_oss", **dict(FAMILIES["gpt_oss"], swiglu_limit=0.5), initializer_range=0.2)
    with torch.no_grad():
        for layer in ref_model.model.layers:
            layer.self_attn.sinks.add_(torch.randn(4))
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    probe = np.random.RandomState(1).normal(size=(*IDS.shape, 97)).astype(np.float32)
    grads = jax.grad(lambda p: (model.apply({"params": p}, jnp.asarray(IDS)) * probe).sum())(params)
    logits = ref_model(torch.tensor(IDS)).logits
    np.testing.assert_allclose(jit_logits(model, params, IDS), logits.detach().numpy(),
                               atol=2e-5, rtol=0)
    (logits * torch.tensor(probe)).sum().backward()
    layers = T.flatten(grads["model"]["layers"])
    for layer, torch_layer in enumerate(ref_model.model.layers):
        mlp, attention = torch_layer.mlp, torch_layer.self_attn
        for path, weight in (("mlp/router/weight", mlp.router.weight), ("mlp/router/bias", mlp.router.bias),
                             ("mlp/experts/gate_up_proj/weight", mlp.experts.gate_up_proj),
                             ("mlp/experts/down_proj/weight", mlp.experts.down_proj),
                             ("mlp/experts/gate_up_proj_bias", mlp.experts.gate_up_proj_bias),
                             ("mlp/experts/down_proj_bias", mlp.experts.down_proj_bias),
                             ("self_attn/sinks", attention.sinks), ("self_attn/q_proj/kernel", attention.q_proj.weight)):
            expected = weight.grad.numpy()
            got = np.asarray(layers[path][layer])
            got = got.T if path.endswith("kernel") else got.transpose(0, 2, 1) if got.ndim == 3 else got
            assert np.abs(expected).max() > 1e-2, path
            np.testing.assert_allclose(got, expected, atol=4e-6 * np.abs(expected).max(), rtol=0, err_msg=path)


def test_a_checkpoint_in_transformers_stacked_layout_loads_too(tmp_path):
    """A file holding the experts as transformers runs them (`mlp.experts.gate_up_proj`) reads as the hub's."""
    ref_model = make_hf_model("qwen3_moe", **FAMILIES["qwen3_moe"])
    path = save_hf_model(ref_model, tmp_path)
    stacked = {k: v.detach().numpy().copy() for k, v in ref_model.state_dict().items()}
    save_file(stacked, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert any(k.endswith("experts.gate_up_proj") for k in stacked)
    model, params = jpeft.from_pretrained(path)
    np.testing.assert_allclose(jit_logits(model, params, IDS), torch_logits(ref_model),
                               atol=2e-4, rtol=0)


@pytest.mark.parametrize("fields,match", [
    (dict(mlp_only_layers=[1]), r"layers \[1\] have a dense MLP"),
    (dict(decoder_sparse_step=2), r"layers \[0\] have a dense MLP"),
    (dict(num_experts_per_tok=5), "between 1 and its number of experts"),
])
def test_what_jpeft_cannot_run_is_refused(fields, match):
    hf = {**make_hf_model("qwen3_moe", **FAMILIES["qwen3_moe"]).config.to_dict(), **fields}
    with pytest.raises(jpeft.CheckpointError, match=match):
        ModelConfig.from_hf(json.loads(json.dumps(hf)))


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "gpt_oss", "granitemoe"])
def test_the_load_balancing_loss_and_its_gradients_match_transformers(family, tmp_path):
    """A train step's loss with the routers' load-balancing loss (output_router_logits in config.json): the mean
    NLL plus the coefficient times transformers' aux_loss over the real tokens of every layer, padding left out,
    with torch's gradients of the router (whose probabilities alone the aux loss differentiates), experts and
    attention. An eval step's loss is the NLL alone."""
    ref_model = make_hf_model(family, **FAMILIES[family], initializer_range=0.2, output_router_logits=True,
                              router_aux_loss_coef=0.5)
    model, params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))
    assert model.config.router_aux_loss_coef == 0.5
    mask = np.ones_like(IDS)
    mask[1, 7:] = 0
    batch = {"input_ids": IDS, "attention_mask": mask, "labels": np.roll(IDS, -1, axis=1),
             "loss_mask": mask * np.roll(mask, -1, axis=1) * (np.arange(IDS.shape[1]) < IDS.shape[1] - 1)}
    batch = jax.tree.map(jnp.asarray, batch)
    out = ref_model(torch.tensor(IDS), attention_mask=torch.tensor(mask),
                    labels=torch.tensor(np.where(mask > 0, IDS, -100)))
    out.loss.backward()

    def mean_loss(p, router_loss=True):
        total, count, *balance = step.token_loss(model, p, batch, router_loss=router_loss)
        return total / count, balance

    (loss, [balance]), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-6)
    np.testing.assert_allclose(float(balance), out.aux_loss.item(), rtol=1e-6)  # the train step's aux_loss metric
    np.testing.assert_allclose(float(mean_loss(params, router_loss=False)[0]), (out.loss - 0.5 * out.aux_loss).item(),
                               rtol=1e-6)
    layers = T.flatten(grads["model"]["layers"])
    for layer, torch_layer in enumerate(ref_model.model.layers):
        block, router = model.config.moe_name, model.config.router_name
        moe_block = getattr(torch_layer, block)
        for path, weight in ((f"{block}/{router}/weight", getattr(moe_block, router).weight),
                             (f"{block}/experts/down_proj/weight", moe_block.experts.down_proj),
                             ("self_attn/q_proj/kernel", torch_layer.self_attn.q_proj.weight)):
            expected, got = weight.grad.numpy(), np.asarray(layers[path][layer])
            got = got.T if path.endswith("kernel") else got
            if got.shape != expected.shape:  # GPT-OSS's experts, [E, in, out] in torch
                got = got.transpose(0, 2, 1)
            np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max(), rtol=0, err_msg=path)


def test_the_load_balancing_loss_moves_the_router_toward_balance():
    """Its gradient alone, on logits that send every token to experts 0 and 1: descending it takes probability
    from those two and gives it to the others, and leaves padding alone; uniform routing scores k."""
    cfg = ModelConfig(model_type="mixtral", vocab_size=1, hidden_size=1, num_layers=2, num_heads=1, num_kv_heads=1,
                      head_dim=1, intermediate_size=1, num_experts=4, experts_per_token=2)
    real = jnp.array([True] * 5 + [False])
    skewed = jnp.tile(jnp.array([3.0, 1.0, 0.0, 0.0]), (2, 6, 1))
    grad = jax.grad(lambda z: moe.balance_loss(cfg, z, real))(skewed)
    assert (grad[:, :5, :2] > 0).all() and (grad[:, :5, 2:] < 0).all() and (grad[:, 5] == 0).all()
    balanced = jnp.tile(jnp.zeros(4), (2, 6, 1))
    np.testing.assert_allclose(float(moe.balance_loss(cfg, balanced, real)), 2.0, rtol=1e-6)


def test_a_run_sets_the_load_balancing_weight_for_a_mixture_alone(tiny_run, tmp_path):
    """`model.router_aux_loss_coef` replaces config.json's weight (unset: config.json's stays); a dense model
    refuses a weight above 0, and no weight is negative."""
    from conftest import run_config
    from jpeft.train.build import run_model_config
    mixture = ModelConfig.from_hf(make_hf_model("mixtral", **FAMILIES["mixtral"], output_router_logits=True,
                                                router_aux_loss_coef=0.5).config.to_dict())
    dense = ModelConfig.from_hf(make_hf_model("llama").config.to_dict())
    assert run_model_config(run_config(tiny_run, tmp_path), mixture).router_aux_loss_coef == 0.5
    weighed = run_config(tiny_run, tmp_path, "model.router_aux_loss_coef=0.02")
    assert run_model_config(weighed, mixture).router_aux_loss_coef == 0.02
    with pytest.raises(jpeft.ConfigError, match="llama model without experts"):
        run_model_config(weighed, dense)
    assert run_model_config(run_config(tiny_run, tmp_path, "model.router_aux_loss_coef=0"), dense) == dense
    with pytest.raises(jpeft.ConfigError, match="router_aux_loss_coef.*must be >= 0"):
        run_config(tiny_run, tmp_path, "model.router_aux_loss_coef=-1")


def test_mixtrals_jitter_scales_the_experts_input_in_training_as_transformers(monkeypatch, tmp_path):
    """router_jitter_noise in training: the block's input times uniform noise in [1 - j, 1 + j], before the router
    and the experts; transformers' block given jpeft's draw gives jpeft's output. Without a dropout key (eval,
    generate), or with the model's own dropout off, no noise."""
    from jpeft.models.llama import MLP
    ref_model = make_hf_model("mixtral", **FAMILIES["mixtral"], initializer_range=0.3, router_jitter_noise=0.3)
    cfg = ModelConfig.from_hf(ref_model.config.to_dict())
    assert cfg.router_jitter == 0.3 and cfg.without_dropout().router_jitter == 0
    params = jpeft.from_pretrained(save_hf_model(ref_model, tmp_path))[1]
    layer = jax.tree.map(lambda a: a[0], params["model"]["layers"]["mlp"])
    x = np.random.RandomState(2).normal(size=(2, 12, 32)).astype(np.float32)
    draws = []
    uniform = jax.random.uniform
    monkeypatch.setattr(jax.random, "uniform", lambda *a, **k: draws.append(uniform(*a, **k)) or draws[-1])
    ours = MLP(cfg).apply({"params": layer}, jnp.asarray(x), rngs={"dropout": jax.random.key(3)})
    (noise,) = draws
    assert 0.7 <= float(noise.min()) < 0.8 and 1.2 < float(noise.max()) <= 1.3
    block = ref_model.model.layers[0].mlp.train()
    empty_like = torch.empty_like

    class Draw:  # what the block's torch.empty_like(hidden_states).uniform_(1 - j, 1 + j) gives: jpeft's draw
        def uniform_(self, low, high):
            assert (low, high) == (0.7, 1.3)
            return torch.tensor(np.asarray(noise))

    monkeypatch.setattr(torch, "empty_like", lambda t, **k: Draw() if t.shape == x.shape else empty_like(t, **k))
    with torch.no_grad():
        theirs = block(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=0)
    plain = MLP(cfg).apply({"params": layer}, jnp.asarray(x))
    assert len(draws) == 1 and np.abs(np.asarray(plain) - np.asarray(ours)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(MLP(cfg.without_dropout()).apply(
        {"params": layer}, jnp.asarray(x), rngs={"dropout": jax.random.key(3)})))