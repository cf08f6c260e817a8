"""AdamW with linear warmup then cosine decay, clipped by global norm; LoRA+ on top."""
import jax
import optax

from jpeft import tree as T


def schedule(lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=lr * min_lr_ratio)


def decayed(params):
    """Bool tree: the leaves weight decay applies to. transformers' Trainer spares norm weights (jpeft's `scale`
    leaves) and every parameter with "bias" anywhere in its name: a prefix encoder's `prefix_in_bias`, a
    bottleneck's `adapter_up_bias`, T5's `relative_attention_bias` table."""
    return T.map_with_path(lambda path, _: "bias" not in path.lower() and T.leaf_name(path) != "scale", params)


def applied_updates(opt_state) -> int:
    """How many updates the optimizer has applied (its schedule's position): a step skipped for a non-finite
    loss (train.on_nonfinite=skip) is not one, so the learning rate it applies next is `schedule(count)`."""
    return int(optax.tree_utils.tree_get(opt_state, "count", filtering=lambda path, _: (
        path[-1].tuple_name == "ScaleByScheduleState")))


def adamw(lr: float, steps: int, warmup: int, weight_decay: float = 0.0, min_lr_ratio: float = 0.1,
          clip_norm: float = 1.0, decays=decayed) -> optax.GradientTransformation:
    """Built only over the trainable partition, so frozen leaves get no optimizer state. `decays`: the leaves
    weight decay applies to (a bool tree, or a function of the params giving one)."""
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule(lr, steps, warmup, min_lr_ratio), b1=0.9, b2=0.999,
                                   weight_decay=weight_decay, mask=decays))


LORA_PLUS_EMBEDDING_LR = 1e-6  # PEFT's `loraplus_lr_embedding` default


def lora_plus(trainable, ratio: float, embedding_scale: float = 1.0, embeddings: frozenset[str] = frozenset(),
              **adamw_options) -> optax.GradientTransformation:
    """`adamw` (its options) with PEFT's `create_loraplus_optimizer` groups: both factors of a LoRA on an
    embedding (one of the modules `embeddings`) learn at `embedding_scale` times the rate; of the others, LoRA's
    B factors and every vector (one per layer: DoRA's magnitudes, an embedding's too, and biases) learn `ratio`
    times faster. Weight decay as those groups have it: every leaf but the faster ones `decayed` spares (T5's
    `relative_attention_bias` factors decay). Scaling AdamW's update equals scaling its learning rate (the
    decoupled weight decay is part of the update)."""
    def on_embedding(path: str) -> bool:
        return T.leaf_name(path) in ("lora_a", "lora_b") and path.rpartition("/")[0] in embeddings

    faster = T.map_with_path(lambda path, x: not on_embedding(path) and (
        T.leaf_name(path) == "lora_b" or x.ndim - T.is_stacked(path) == 1), trainable)
    decays = jax.tree.map(lambda fast, named: not fast or named, faster, decayed(trainable))
    embedding_factors = T.map_with_path(lambda path, _: on_embedding(path), trainable)
    return optax.chain(adamw(**adamw_options, decays=decays), optax.masked(optax.scale(ratio), faster),
                       optax.masked(optax.scale(embedding_scale), embedding_factors))
