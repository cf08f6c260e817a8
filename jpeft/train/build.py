"""What a run config builds before training: the model config as the run trains it, the method (defaulted for
the base's family) with its leaves and what it trains, and the optimizer (AdamW, or LoRA+ where the method asks for it)."""
from __future__ import annotations

import operator
import os
import warnings

import jax

from jpeft import tree as T
from jpeft.config import RunConfig, method_kwargs
from jpeft.data import label_names, load_rows
from jpeft.errors import ConfigError
from jpeft.models.config import ModelConfig, read_config
from jpeft.models.hf import abstract_params
from jpeft.parallel import param_shardings
from jpeft.peft import BY_NAME, saved_modules
from jpeft.peft.registry import FAMILY_DEFAULTS
from jpeft.train.optimizer import LORA_PLUS_EMBEDDING_LR, adamw, lora_plus


def run_model_config(cfg: RunConfig, config: ModelConfig) -> ModelConfig:
    """The checkpoint's model config as a run trains it: the run's remat, its weight of a mixture's
    load-balancing loss where it sets one, and no dropout of the model's own where `model.dropout` is false."""
    config = config.replace(remat=cfg.model.remat)
    coef = cfg.model.router_aux_loss_coef
    if coef and not config.num_experts:
        raise ConfigError(f"config key 'model.router_aux_loss_coef' weighs the load-balancing loss of a mixture of "
                          f"experts' routers; {cfg.model.path} is a {config.model_type} model without experts")
    if coef is not None:
        config = config.replace(router_aux_loss_coef=float(coef))
    return config if cfg.model.dropout else config.without_dropout()


def uses_dropout(method, model) -> bool:
    """Does the train step need a dropout key: the method's own dropout (LoRA's) or the model's?"""
    return getattr(method, "dropout", 0) > 0 or bool(model.config.dropout_rates)


def build_method(cfg: RunConfig, labels: list[str] | None = None):
    """The configured method, its unset options defaulted for the base's family (`FAMILY_DEFAULTS`: T5's and
    GPT-2's projection names); a classifier also gets its class names (`class_labels`)."""
    model_type = cfg.model.path and read_config(os.path.join(cfg.model.path, "config.json")).model_type
    defaults = FAMILY_DEFAULTS.get(model_type, {})
    options = {**defaults.get(cfg.method.name, {}), **method_kwargs(cfg.method)}
    if isinstance(options.get("lora"), dict):  # a classifier's LoRA, defaulted as LoRA itself is
        options["lora"] = {**defaults.get("lora", {}), **options["lora"]}
    if "init_text" in options:  # prompt tuning from a text: tokenized by the base model's tokenizer
        options["tokenizer"] = cfg.model.path
    if labels is not None:
        options["labels"] = labels
    return BY_NAME[cfg.method.name](**options)


def class_labels(cfg: RunConfig) -> list[str] | None:
    """A classifier's class names in id order, from data.label of the training file; None otherwise."""
    if cfg.data.label is None:
        return None
    return label_names(load_rows(cfg.data.train), cfg.data.label, cfg.data.train, cfg.method.num_labels)


def build_optimizer(cfg: RunConfig, method, trainable, frozen):
    """AdamW on the configured schedule; LoRA+ where the method sets `lr_ratio` ≠ 1 or an `lr_embedding`: B learns
    faster, and a LoRA on an embedding (a module whose frozen `embedding` table sits beside it) at its own rate."""
    tc = cfg.train
    options = dict(lr=tc.lr, steps=tc.steps, warmup=tc.warmup, weight_decay=tc.weight_decay,
                   min_lr_ratio=tc.min_lr_ratio)
    ratio, lr_embedding = getattr(method, "lr_ratio", 1.0), getattr(method, "lr_embedding", None)
    if ratio == 1.0 and lr_embedding is None:
        return adamw(**options)
    embeddings = frozenset(module for module, leaves in T.modules(frozen).items() if "embedding" in leaves)
    return lora_plus(trainable, ratio, (lr_embedding or LORA_PLUS_EMBEDDING_LR) / tc.lr, embeddings, **options)


def train_mask(method, saved: list[str] | None, params):
    """What a run trains: the method's leaves (its `mask`) and the weights of the modules `saved` names
    (`method.modules_to_save`)."""
    mask = method.mask(params)
    return jax.tree.map(operator.or_, mask, saved_modules.selected_mask(params, saved)) if saved else mask


def require_trainable(method, mask) -> None:
    """Refuse a run whose method, added to the model, trains nothing (norm tuning of OLMo 1, whose norms learn
    nothing): it would go through its steps changing nothing."""
    if not any(jax.tree.leaves(mask)):
        raise ConfigError(f"{method} trains no parameter of this model (its norms or targets are not there); "
                          "pick another method or other targets")


def run_init(method, saved: list[str] | None):
    """A run's init: the method's, then the marks of the modules `saved` names (`method.modules_to_save`)."""
    def init(key, params):
        params = method.init(key, params)
        return saved_modules.modules_to_save(params, saved) if saved else params
    return init


def init_method(method, params, model, mesh, seed: int, saved: list[str] | None = None):
    """The run's leaves (`run_init`) added under jit, each born with the sharding its weight implies."""
    init, key = run_init(method, saved), jax.random.key(seed)
    shardings = param_shardings(jax.eval_shape(init, key, params), abstract_params(model), mesh)
    with warnings.catch_warnings():  # weights a method replaces (QLoRA's kernels) cannot be reused: fine
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        return jax.jit(init, out_shardings=shardings, donate_argnums=1)(key, params)
