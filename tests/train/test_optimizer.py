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


LORA_TREE = {"model": {"embed_tokens": {"lora_a": jnp.ones((5, 1)), "lora_b": jnp.ones((1, 2)),
                                        "lora_magnitude": jnp.ones(2)},
                       "layers": {"q_proj": {"lora_a": jnp.ones((3, 2, 1)), "lora_b": jnp.ones((3, 1, 2)),
                                             "lora_magnitude": jnp.ones((3, 2))}}},
             "score_hidden": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}


def test_lora_plus_groups_leaves_as_pefts_create_loraplus_optimizer():
    """B and every per-layer vector (DoRA's magnitudes, an embedding's too, a head's bias) `ratio` times A's rate;
    both factors of a LoRA on an embedding at their own rate; a stacked [layers, out] magnitude is a vector, a
    head's kernel not."""
    grads = jax.tree.map(jnp.ones_like, LORA_TREE)

    def moved(tx):
        updates, _ = tx.update(grads, tx.init(LORA_TREE), LORA_TREE)
        return T.flatten(jax.tree.map(lambda u: -u, updates))
    plain = moved(adamw(0.1, 10, warmup=0, min_lr_ratio=1.0))
    plus = moved(lora_plus(LORA_TREE, 4.0, 0.01, frozenset({"model/embed_tokens"}), lr=0.1, steps=10, warmup=0,
                           min_lr_ratio=1.0))
    want = {"model/embed_tokens/lora_a": 0.01, "model/embed_tokens/lora_b": 0.01,
            "model/embed_tokens/lora_magnitude": 4.0,
            "model/layers/q_proj/lora_a": 1.0, "model/layers/q_proj/lora_b": 4.0,
            "model/layers/q_proj/lora_magnitude": 4.0, "score_hidden/kernel": 1.0, "score_hidden/bias": 4.0}
    assert set(want) == set(plus)
    for path, scale in want.items():
        np.testing.assert_allclose(plain[path], 0.1, rtol=1e-5, err_msg=path)  # lora_plus off: one rate
        np.testing.assert_allclose(plus[path], 0.1 * scale, rtol=1e-5, err_msg=path)


def test_lora_plus_decays_as_pefts_groups():
    """PEFT's LoRA+ decays every leaf of A's group and an embedding's factors whatever their names (T5's
    relative_attention_bias), and of the faster ones those without "bias" in their names."""
    tree = {"encoder": {"relative_attention_bias": {"lora_a": jnp.ones((4, 1)), "lora_b": jnp.ones((1, 2)),
                                                    "lora_magnitude": jnp.ones(2)}},
            "q": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))},
            "score_hidden": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    tx = lora_plus(tree, 2.0, 0.5, frozenset({"encoder/relative_attention_bias"}), lr=0.1, steps=10, warmup=0,
                   weight_decay=0.4, min_lr_ratio=1.0)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, tree), tx.init(tree), tree)
    moved = T.flatten(jax.tree.map(lambda u: -u, updates))  # zero gradients: only the decay, by rate · 0.4
    want = {"encoder/relative_attention_bias/lora_a": 0.05, "encoder/relative_attention_bias/lora_b": 0.05,
            "encoder/relative_attention_bias/lora_magnitude": 0.0, "q/lora_a": 0.1, "q/lora_b": 0.2,
            "score_hidden/kernel": 0.1, "score_hidden/bias": 0.0}
    for path, rate in want.items():
        np.testing.assert_allclose(moved[path], rate * 0.4, rtol=1e-5, err_msg=path)


def test_lora_plus_step_equals_pefts(tmp_path):
    """One clipped, weight-decayed AdamW step of LoRA+ (DoRA) on a tiny Llama's embedding, q_proj and v_proj, from a
    PEFT adapter, moves every factor and magnitude as PEFT's `create_loraplus_optimizer` with torch's AdamW does."""
    import peft
    import torch
    from peft.optimizers import create_loraplus_optimizer

    import jpeft
    from conftest import make_hf_model, save_hf_model
    from jpeft.config import load_config
    from jpeft.train.build import build_method, build_optimizer

    torch_model = make_hf_model("llama")
    base_dir = save_hf_model(torch_model, tmp_path / "base")
    targets = ["embed_tokens", "q_proj", "v_proj"]
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                  use_dora=True, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "before")
    lr, ratio, lr_embedding, decay = 1e-2, 8.0, 1e-3, 0.1
    ids = np.random.RandomState(0).randint(0, 97, (2, 12))

    cfg = load_config(None, [f"train.lr={lr}", f"train.weight_decay={decay}", "train.warmup=0", "train.min_lr_ratio=1",
                             "method.rank=4", "method.alpha=8", f"method.targets=[{','.join(targets)}]",
                             "method.use_dora=true", f"method.lr_ratio={ratio}", f"method.lr_embedding={lr_embedding}"])
    method = build_method(cfg)
    model, base = jpeft.from_pretrained(base_dir)
    params = jpeft.load_adapter(str(tmp_path / "before"), base)
    trainable, frozen = T.partition(params, method.mask(params))

    def loss(trainable):
        logits = model.apply({"params": T.combine(trainable, frozen)}, jnp.asarray(ids))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(ids[:, 1:])).mean()
    optimizer = build_optimizer(cfg, method, trainable, frozen)
    updates, _ = optimizer.update(jax.grad(loss)(trainable), optimizer.init(trainable), trainable)
    ours = T.flatten(optax.apply_updates(trainable, updates))

    logits = peft_model(torch.tensor(ids)).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), torch.tensor(ids[:, 1:]).reshape(-1)
                                      ).backward()
    torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
    create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                              loraplus_lr_embedding=lr_embedding, loraplus_weight_decay=decay).step()
    peft_model.save_pretrained(tmp_path / "after")
    theirs = T.flatten(T.partition(jpeft.load_adapter(str(tmp_path / "after"), base), method.mask(params))[0])
    before = T.flatten(trainable)
    assert set(ours) == set(theirs) and "model/embed_tokens/lora_magnitude" in ours
    for path in ours:  # each step moves a factor by about its group's rate: a wrong group is off by 8x or 10x
        np.testing.assert_allclose(ours[path] - before[path], theirs[path] - before[path], rtol=1e-3,
                                   atol=1e-3 * lr_embedding, err_msg=path)


def test_an_lr_embedding_alone_turns_lora_plus_on():
    """method.lr_embedding with lr_ratio 1: PEFT's groups with B at A's rate (create_loraplus_optimizer's ratio 1)."""
    from jpeft.config import load_config
    from jpeft.train.build import build_method, build_optimizer
    trainable = {"model": {"embed_tokens": {"lora_a": jnp.ones((5, 1)), "lora_b": jnp.ones((1, 2))},
                           "q_proj": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}}}
    frozen = {"model": {"embed_tokens": {"embedding": jnp.ones((5, 2))}, "q_proj": {"kernel": jnp.ones((2, 2))}}}
    for extra, embedding_rate in (([], 0.1), (["method.lr_embedding=0.01"], 0.01)):
        cfg = load_config(None, ["train.lr=0.1", "train.warmup=0", "train.min_lr_ratio=1", *extra])
        tx = build_optimizer(cfg, build_method(cfg), trainable, frozen)
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), tx.init(trainable), trainable)
        for path, step in T.flatten(jax.tree.map(lambda u: -u, updates)).items():
            np.testing.assert_allclose(step, embedding_rate if "embed_tokens" in path else 0.1, rtol=1e-5, err_msg=path)
