"""One `jpeft train` on any mesh of 8 fake CPU devices equals the 1-device run; every leaf and its
optimizer state is sharded like the weight it modifies."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from jpeft.train import trainer
from conftest import family_run, read_metrics, run_config

MESHES = ((2, 2, 2), (8, 1, 1), (1, 8, 1), (2, 1, 4))
# LoRA runs on every mesh; full fine-tuning and QLoRA, to compile less, on the mesh of all three axes and
# one other each (fsdp alone; data x tensor).
METHOD_MESHES = {"lora": MESHES, "full": (MESHES[0], MESHES[2]), "qlora": (MESHES[0], MESHES[3])}
COMMON = ("train.steps=5", "train.batch_size=8", "train.log_every=1", "data.eval=null")

SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax
    sys.path.insert(0, {tests!r})
    from jpeft.train import trainer
    from conftest import read_metrics, run_config
    assert len(jax.devices()) == 8
    run, out, specs = json.loads({run!r}), {out!r}, {{}}
    real = trainer.make_train_step
    def spy(model, optimizer, seed, dropout, shardings, **options):
        leaves = jax.tree_util.tree_flatten_with_path(shardings)[0]
        specs[current] = {{jax.tree_util.keystr(path): str(s.spec) for path, s in leaves}}
        return real(model, optimizer, seed, dropout, shardings, **options)
    trainer.make_train_step = spy
    losses = {{}}
    for current, extra in json.loads({runs!r}).items():
        trainer.train(run_config(run, os.path.join(out, current), *extra), progress=False)
        losses[current] = [r["loss"] for r in read_metrics(os.path.join(out, current))]
    print(json.dumps({{"losses": losses, "specs": specs}}))
""")


def run_on_fake_devices(tiny_run, out, runs: dict) -> dict:
    tests = os.path.dirname(os.path.dirname(__file__))
    script = SCRIPT.format(tests=tests, run=json.dumps({k: str(v) for k, v in tiny_run.items()}), out=str(out),
                           runs=json.dumps(runs))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", METHOD_MESHES)
def test_every_mesh_matches_one_device(tiny_run, tmp_path, method):
    extra = (f"method.name={method}", "method.targets=[q_proj,v_proj,down_proj,embed_tokens]", *COMMON)
    runs = {f"{d}x{f}x{t}": [*extra, f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"]
            for d, f, t in METHOD_MESHES[method]}
    sharded = run_on_fake_devices(tiny_run, tmp_path, runs)
    trainer.train(run_config(tiny_run, tmp_path / "single", *extra), progress=False)
    single = [r["loss"] for r in read_metrics(tmp_path / "single")]
    assert len(single) == 5
    for name, losses in sharded["losses"].items():
        assert len(losses) == 5
        for a, b in zip(losses, single):
            assert abs(a - b) <= 1e-5 * abs(b), (name, losses, single)
    specs = sharded["specs"]["2x2x2"]
    if method == "full":
        assert specs["['trainable']['model']['layers']['mlp']['gate_proj']['kernel']"] == "P(None, 'fsdp', 'tensor')"
    else:  # factors follow their weight's axes, and so do both Adam moments
        q = "['model']['layers']['self_attn']['q_proj']"
        assert specs[f"['trainable']{q}['lora_a']"] == "P(None, 'fsdp', None)"
        assert specs[f"['trainable']{q}['lora_b']"] == "P(None, None, 'tensor')"
        moments = [v for k, v in specs.items() if k.startswith("['opt_state']") and k.endswith(f"{q}['lora_b']")]
        assert moments and all(m == "P(None, None, 'tensor')" for m in moments)
        emb = "['model']['embed_tokens']['lora_b']"
        assert specs[f"['trainable']{emb}"] == "P(None, 'fsdp')"


REBUILT = {"lokr": ["method.rank=2", "method.decompose_both=true"], "oft": ["method.block_size=8"],
           "hra": ["method.rank=4"]}


def cube_matches_one_device(run: dict, tmp_path, runs: dict) -> dict:
    """Each of `runs` (name -> overrides) on a 2x2x2 mesh of fake devices gives the 1-device run's losses; returns
    the sharded runs' losses and shardings."""
    sharded = run_on_fake_devices(run, tmp_path, {name: [*extra, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
                                                  for name, extra in runs.items()})
    for name, extra in runs.items():
        trainer.train(run_config(run, tmp_path / f"single-{name}", *extra), progress=False)
        single = [r["loss"] for r in read_metrics(tmp_path / f"single-{name}")]
        assert len(single) == 5
        for a, b in zip(sharded["losses"][name], single, strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (name, sharded["losses"][name], single)
    return sharded


def test_rebuilt_weights_on_a_mesh_match_one_device(tiny_run, tmp_path):
    """LoKr, OFT and HRA rebuild each weight from the sharded kernel and their leaves (HRA's vectors sharded as
    the weight's input axis, LoKr's and OFT's whole), and RoAd rotates pairs of the outputs the tensor axis
    splits: on a 2x2x2 mesh, the losses of one device."""
    sharded = cube_matches_one_device(tiny_run, tmp_path, {
        name: [f"method.name={name}", "method.targets=[q_proj,v_proj,down_proj]", "train.lr=3e-2", *options, *COMMON]
        for name, options in {**REBUILT, "road": ["method.variant=road_4", "method.group_size=8"]}.items()})
    assert sharded["specs"]["hra"]["['trainable']['model']['layers']['self_attn']['q_proj']['hra_u']"] == \
        "P(None, 'fsdp', None)"


SHARDINGS = textwrap.dedent("""
    import os, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, optax
    import jpeft
    from jpeft import tree as T
    from jpeft.models.config import ModelConfig
    from jpeft.models.hf import abstract_params
    from jpeft.models.llama import CausalLM, init_params
    from jpeft.parallel import make_mesh, param_shardings, state_shardings
    from jpeft.train.build import init_method
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    model, mesh = CausalLM(cfg), make_mesh(2, 2, 2)
    params = init_params(model, jax.random.key(0))
    params = jax.device_put(params, param_shardings(params, abstract_params(model), mesh))
    methods = {"lora": jpeft.LoRA(targets=["q_proj", "embed_tokens"]), "ia3": jpeft.IA3(),
               "norm": jpeft.NormTuning(), "bitfit": jpeft.BitFit(), "prompt": jpeft.PromptTuning(4),
               "prefix": jpeft.PrefixTuning(4), "llama_adapter": jpeft.LlamaAdapter(4),
               "bottleneck": jpeft.Bottleneck(size=8), "qlora": jpeft.QLoRA(targets=["q_proj"], double_quant=True)}
    out = {}
    for name, method in methods.items():
        tree = init_method(method, jax.tree.map(jax.numpy.copy, params), model, mesh, 0)  # it consumes its input
        trainable, _ = T.partition(tree, method.mask(tree))
        state = state_shardings(optax.adam(1e-3), trainable, mesh)
        moments = [s for p, s in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
                   if any(getattr(k, "key", None) == "model" for k in p)]
        out[name] = {"leaves": {p: str(x.sharding.spec) for p, x in T.flatten(tree).items()},
                     "trainable": {p: str(x.sharding.spec) for p, x in T.flatten(trainable).items()},
                     "moments": sorted(str(s.spec) for s in moments)}
    print(json.dumps(out))
""")


def test_method_leaves_and_optimizer_state_follow_their_weights():
    """One method per insertion point: dense (LoRA, IA3), embedding (LoRA), norm (norm tuning), bias (BitFit),
    embedding rows (prompt tuning), keys/values (prefix tuning), attention output (LLaMA-Adapter), residual
    (bottleneck), a quantized weight (QLoRA); leaves of modules without a weight name their axes themselves."""
    result = subprocess.run([sys.executable, "-c", SHARDINGS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {
        "lora": {"model/layers/self_attn/q_proj/lora_a": "P(None, 'fsdp', None)",
                 "model/layers/self_attn/q_proj/lora_b": "P(None, None, 'tensor')",
                 "model/embed_tokens/lora_a": "P('tensor', None)",
                 "model/embed_tokens/lora_b": "P(None, 'fsdp')"},
        "ia3": {"model/layers/self_attn/k_proj/ia3_out": "P(None, 'tensor')",
                "model/layers/mlp/down_proj/ia3_in": "P(None, 'tensor')"},
        "norm": {"model/layers/input_layernorm/scale": "P(None, 'fsdp')",
                 "model/norm/scale": "P('fsdp',)"},
        "bitfit": {"model/layers/mlp/gate_proj/bias": "P(None, 'tensor')",
                   "model/layers/self_attn/o_proj/bias": "P(None, 'fsdp')"},
        "prompt": {"model/embed_tokens/soft_prompt": "P(None, None, 'fsdp')"},
        "prefix": {"model/layers/self_attn/prefix_k": "P(None, None, 'tensor')"},
        "llama_adapter": {"model/layers/self_attn/adaption_prompt": "P(None, None, 'fsdp')"},
        "bottleneck": {"model/layers/mlp_adapter/adapter_down": "P(None, 'fsdp', None)",
                       "model/layers/attention_adapter/adapter_up": "P(None, None, 'fsdp')"},
        # the frozen codes lie as the kernels they replace (a QLoRA base is no larger per device than LoRA's)
        "qlora": {"model/layers/self_attn/q_proj/kernel_nf4": "P(None, 'fsdp', 'tensor')",
                  "model/layers/mlp/down_proj/kernel_nf4": "P(None, 'tensor', 'fsdp')",
                  "model/layers/mlp/down_proj/kernel_absmax_q": "P(None, 'tensor', 'fsdp')"},
    }
    for name, leaves in expected.items():
        for path, spec in leaves.items():
            assert out[name]["leaves"][path] == spec, (name, path, out[name]["leaves"][path])
        # Adam's two moments of every trained leaf lie exactly as the leaf does
        assert out[name]["moments"] == sorted(2 * list(out[name]["trainable"].values())), name


FUSED_ON_A_MESH = {"phi3": ("[qkv_proj,gate_up_proj]", "['model']['layers']['self_attn']['qkv_proj']"),
                   "gpt_neox": ("[query_key_value,dense_h_to_4h]",
                                "['gpt_neox']['layers']['attention']['query_key_value']"),
                   # BLOOM's too, with ALiBi's per-head biases beside heads split over `tensor`; Falcon's multi-query
                   # one, whose single KV head cannot split
                   **dict.fromkeys(("bloom", "falcon"), ("[query_key_value,dense_h_to_4h]",
                                                         "['transformer']['h']['self_attention']['query_key_value']"))}


@pytest.mark.parametrize("family", FUSED_ON_A_MESH)
def test_fused_projections_on_a_mesh_match_one_device(tiny_run, tmp_path, family):
    """Phi-3's qkv_proj and gate_up_proj, and GPT-NeoX's, BLOOM's and Falcon's query_key_value, are split after a
    tensor-sharded product: full fine-tuning and a LoRA on them, on a mesh of all three axes, equal the 1-device
    runs."""
    targets, qkv = FUSED_ON_A_MESH[family]
    sharded = cube_matches_one_device(family_run(tiny_run, tmp_path, family), tmp_path, {
        "full": ["method.name=full", *COMMON], "lora": ["method.name=lora", f"method.targets={targets}", *COMMON]})
    assert sharded["specs"]["lora"][f"['trainable']{qkv}['lora_b']"] == "P(None, None, 'tensor')"


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_mixtures_experts_on_a_mesh_match_one_device(tiny_run, tmp_path, family):
    """Mixtral's stacked experts (and GPT-OSS's, with biases and attention sinks), their widths over the tensor axis
    and the model width over fsdp, routed tokens grouped per expert: full fine-tuning with the routers'
    load-balancing loss, and a LoRA on the experts (PEFT's target_parameters), on a mesh of all three axes equal
    the 1-device runs."""
    sharded = cube_matches_one_device(family_run(tiny_run, tmp_path, family), tmp_path, {
        "full": ["method.name=full", "model.router_aux_loss_coef=0.1", *COMMON],
        "lora": ["method.name=lora", "method.targets=[q_proj]", "train.lr=3e-2",
                 "method.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]", *COMMON]})
    experts = "['trainable']['model']['layers']['mlp']['experts']"
    assert sharded["specs"]["full"][f"{experts}['gate_up_proj']['weight']"] == "P(None, None, 'tensor', 'fsdp')"
    assert sharded["specs"]["full"][f"{experts}['down_proj']['weight']"] == "P(None, None, 'fsdp', 'tensor')"
    # an expert's LoRA factors lie as its weight's input and output axes
    assert sharded["specs"]["lora"][f"{experts}['gate_up_proj']['lora_a']"] == "P(None, None, 'fsdp', None)"
    assert sharded["specs"]["lora"][f"{experts}['gate_up_proj']['lora_b']"] == "P(None, None, None, 'tensor')"
    if family == "gpt_oss":  # a sink per head, as the heads lie; each expert's biases as its outputs
        assert sharded["specs"]["full"]["['trainable']['model']['layers']['self_attn']['sinks']"] == "P(None, 'tensor')"
        assert sharded["specs"]["full"][f"{experts}['gate_up_proj_bias']"] == "P(None, None, 'tensor')"


EVAL = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jpeft.models.hf import from_pretrained
    from jpeft.parallel import make_mesh
    from jpeft.train.step import make_eval_step
    sys.path[:0] = [{tests!r}, os.path.join({tests!r}, "parallel")]  # conftest's folder, and this file's
    from test_sharded_train import eval_batch
    from jpeft.models import layers
    meshes, per_device_rows = [], layers.per_device_rows
    def spy(f, rows, shared):  # the mesh a mixture's experts see as the step is traced
        meshes.append(dict(jax.sharding.get_abstract_mesh().shape))
        return per_device_rows(f, rows, shared)
    layers.per_device_rows = spy
    mesh = make_mesh(2, 2, 2)
    model, params = from_pretrained({path!r}, mesh=mesh)
    meshes.clear()  # those of tracing the model's init
    loss = make_eval_step(model, mesh)(params, eval_batch())
    print(json.dumps({{"loss": [float(v) for v in loss], "meshes": meshes}}))
""")


def eval_batch() -> dict:
    import numpy as np
    ids = np.random.RandomState(0).randint(1, 90, (8, 16)).astype(np.int32)
    return {"input_ids": ids, "labels": np.roll(ids, -1, 1), "attention_mask": np.ones_like(ids),
            "loss_mask": np.ones(ids.shape, np.float32)}


def test_a_mixtures_eval_step_on_a_mesh_routes_each_devices_own_tokens(tmp_path):
    """A run's held-out loss on a 2x2x2 mesh, as its train step: each device sorts its own tokens for the experts
    (not the whole batch's on every device), and the loss is one device's."""
    import numpy as np
    import jpeft
    from conftest import FAMILIES, make_hf_model, save_hf_model
    from jpeft.train.step import make_eval_step
    path = save_hf_model(make_hf_model("mixtral", **FAMILIES["mixtral"]), tmp_path / "mixtral")
    script = EVAL.format(tests=os.path.dirname(os.path.dirname(__file__)), path=str(path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(result.stdout.strip().splitlines()[-1])
    assert sharded["meshes"] and all(m == {"data": 2, "fsdp": 2, "tensor": 2} for m in sharded["meshes"])
    model, params = jpeft.from_pretrained(path)
    np.testing.assert_allclose(sharded["loss"], [float(v) for v in make_eval_step(model)(params, eval_batch())],
                               rtol=1e-5)
