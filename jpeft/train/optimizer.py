"""AdamW with linear warmup then cosine decay, clipped by global norm; LoRA+ on top."""
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
          clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Built only over the trainable partition, so frozen leaves get no optimizer state."""
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule(lr, steps, warmup, min_lr_ratio), b1=0.9, b2=0.999,
                                   weight_decay=weight_decay, mask=decayed))


def lora_plus(optimizer: optax.GradientTransformation, trainable, ratio: float, embedding_scale: float = 1.0,
              embeddings: frozenset[str] = frozenset()) -> optax.GradientTransformation:
    """LoRA+ with PEFT's `create_loraplus_optimizer` groups: both factors of a LoRA on an embedding (one of the
    modules `embeddings`) learn at `embedding_scale` times the rate; of the others, LoRA's B factors and every
    vector (one per layer: DoRA's magnitudes, an embedding's too, and biases) learn `ratio` times faster.
    Scaling AdamW's update equals scaling its learning rate (the decoupled weight decay is part of the update)."""
    if ratio == 1.0:
        return optimizer

    def on_embedding(path: str) -> bool:
        return T.leaf_name(path) in ("lora_a", "lora_b") and path.rpartition("/")[0] in embeddings

    faster = T.map_with_path(lambda path, x: not on_embedding(path) and (
        T.leaf_name(path) == "lora_b" or x.ndim - T.is_stacked(path) == 1), trainable)
    embedding_factors = T.map_with_path(lambda path, _: on_embedding(path), trainable)
    return optax.chain(optimizer, optax.masked(optax.scale(ratio), faster),
                       optax.masked(optax.scale(embedding_scale), embedding_factors))
