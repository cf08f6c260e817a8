"""Adapter leaves take their logical axes from the weight they modify (one rules table shards all)."""
import jax

import jpeft
from jpeft import tree as T
from jpeft.models.config import ModelConfig
from jpeft.models.hf import abstract_params
from jpeft.models.llama import CausalLM, init_params
from jpeft.parallel.mesh import logical_axes


def test_every_methods_leaves_follow_their_weights_axes():
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    model = CausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    dora = jpeft.LoRA(rank=4, targets=["q_proj"], use_dora=True, dropout=0.1).init(jax.random.key(1), params)
    lora = jpeft.LoRA(rank=4, targets=["embed_tokens"]).init(jax.random.key(1), dora)
    tree = jpeft.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"]).init(None, lora)
    quantized = jpeft.QLoRA(rank=4, targets=["o_proj"]).init(jax.random.key(2), params)
    axes = {**logical_axes(tree, abstract_params(model)), **logical_axes(quantized, abstract_params(model))}
    q, emb = "model/layers/self_attn/q_proj/", "model/embed_tokens/"
    assert axes[q + "kernel"] == ("layers", "embed", "heads")
    assert axes[q + "lora_a"] == ("layers", "embed", None) and axes[q + "lora_b"] == ("layers", None, "heads")
    assert axes[q + "lora_magnitude"] == ("layers", "heads") and axes[q + "lora_scale"] == ("layers",)
    assert axes[emb + "lora_a"] == ("vocab", None) and axes[emb + "lora_b"] == (None, "embed")
    assert axes["model/layers/self_attn/k_proj/ia3_out"] == ("layers", "kv")
    assert axes["model/layers/mlp/down_proj/ia3_in"] == ("layers", "mlp")
    o = "model/layers/self_attn/o_proj/"
    assert axes[o + "lora_a"] == ("layers", "heads", None) and axes[o + "kernel_nf4"] == ("layers", "heads", "embed")
    assert axes[o + "kernel_absmax"] == ("layers", "heads", "embed")
    assert set(axes) == set(T.flatten(tree)) | set(T.flatten(quantized))


def test_subpackages_are_attributes_of_a_plain_import():
    """The README's `jpeft.parallel.make_mesh(...)` after `import jpeft` alone (a fresh interpreter)."""
    import subprocess
    import sys
    code = "import jpeft; print(jpeft.parallel.make_mesh.__name__, jpeft.data.load_rows.__name__); jpeft.nope"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["make_mesh", "load_rows"] and "no attribute 'nope'" in out.stderr
