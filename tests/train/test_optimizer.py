"""AdamW's weight decay and LoRA+ groups, as transformers' Trainer and PEFT's create_loraplus_optimizer set them."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft import tree as T
from jpeft.train.optimizer import adamw, decayed, lora_plus

TREE = {"layers": {"q_proj": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3), "lora_a": jnp.ones((2, 1)),
                              "lora_b": jnp.ones((1, 3)), "lora_magnitude": jnp.ones(3)},
                   "input_layernorm": {"scale": jnp.ones(2)},
                   "mlp": {"adapter_up": jnp.ones((1, 2)), "adapter_up_bias": jnp.ones(2)}},
        "prefix_in_bias": jnp.ones(2)}


def step(optimizer, grads):
    updates, _ = optimizer.update(grads, optimizer.init(TREE), TREE)
    return T.flatten(optax.apply_updates(TREE, updates))


def test_weight_decay_spares_biases_and_norm_weights():
    after = step(adamw(0.1, 10, warmup=0, weight_decay=0.5, min_lr_ratio=1.0), jax.tree.map(jnp.zeros_like, TREE))
    for path, value in after.items():  # zero gradients: only the decay moves a leaf, by lr · wd
        expected = 1.0 if path.endswith(("bias", "/scale")) else 1.0 - 0.1 * 0.5
        np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=path)


def test_weight_decay_applies_where_the_trainers_does(tmp_path):
    """Over every weight of a T5 (whose relative-position tables are named `relative_attention_bias`), jpeft's
    decayed leaves are those transformers' Trainer decays."""
    from transformers import Trainer

    import jpeft
    from conftest import make_t5
    from jpeft.models.hf import hf_names
    torch_model, path = make_t5(tmp_path / "t5")
    theirs = set(Trainer.get_decay_parameter_names(None, torch_model))
    params = T.flatten(jpeft.from_pretrained(path)[1])
    for leaf, decays in T.flatten(decayed(T.unflatten(params))).items():
        for name in hf_names(leaf, len(params[leaf]) if T.is_stacked(leaf) else 1):
            assert (name in theirs) == decays, name


def test_lora_plus_speeds_up_b_and_doras_magnitudes():
    grads = jax.tree.map(jnp.ones_like, TREE)
    plain, plus = (step(lora_plus(adamw(0.1, 10, warmup=0, min_lr_ratio=1.0), TREE, ratio), grads) for ratio in (1.0, 4.0))
    for path in plain:
        ratio = 4.0 if path.endswith(("/lora_b", "/lora_magnitude")) else 1.0
        np.testing.assert_allclose(1.0 - plus[path], ratio * (1.0 - plain[path]), rtol=1e-5, err_msg=path)
