"""AdamW with linear warmup then cosine decay, clipped by global norm; LoRA+ on top."""
import optax

from jpeft import tree as T


def schedule(lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=lr * min_lr_ratio)


NO_DECAY = ("bias", "scale")  # biases and norm weights: what transformers' Trainer leaves out of weight decay


def decayed(params):
    """Bool tree: the leaves weight decay applies to (all but biases and norm weights, as in HF's Trainer)."""
    return T.map_with_path(lambda path, _: T.leaf_name(path) not in NO_DECAY, params)


def adamw(lr: float, steps: int, warmup: int, weight_decay: float = 0.0, min_lr_ratio: float = 0.1,
          clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Built only over the trainable partition, so frozen leaves get no optimizer state."""
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule(lr, steps, warmup, min_lr_ratio), b1=0.9, b2=0.999,
                                   weight_decay=weight_decay, mask=decayed))


def lora_plus(optimizer: optax.GradientTransformation, trainable, ratio: float) -> optax.GradientTransformation:
    """LoRA+: LoRA's B factors (and DoRA's magnitudes, as PEFT's `create_loraplus_optimizer` groups its 1-D
    parameters with B) learn `ratio` times faster. Scaling AdamW's update equals scaling its learning rate
    (the decoupled weight decay is part of the update)."""
    if ratio == 1.0:
        return optimizer
    return optax.chain(optimizer, optax.masked(optax.scale(ratio), T.named(trainable, ("lora_b", "lora_magnitude"))))
