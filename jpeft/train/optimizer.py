"""AdamW with linear warmup then cosine decay, clipped by global norm; LoRA+ on top."""
import optax

from jpeft import tree as T


def schedule(lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
    warmup = min(warmup, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=lr * min_lr_ratio)


def adamw(lr: float, steps: int, warmup: int, weight_decay: float = 0.0, min_lr_ratio: float = 0.1,
          clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Built only over the trainable partition, so frozen leaves get no optimizer state."""
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule(lr, steps, warmup, min_lr_ratio), b1=0.9, b2=0.999,
                                   weight_decay=weight_decay))


def lora_plus(optimizer: optax.GradientTransformation, trainable, ratio: float) -> optax.GradientTransformation:
    """LoRA+: LoRA's B factors learn `ratio` times faster. Scaling AdamW's update equals scaling its
    learning rate (the decoupled weight decay is part of the update)."""
    if ratio == 1.0:
        return optimizer
    return optax.chain(optimizer, optax.masked(optax.scale(ratio), T.named(trainable, ("lora_b",))))
