"""The training loop: config in, adapter (or model) + metrics.jsonl + checkpoints out.

Re-running the same config on the same out_dir resumes from the latest checkpoint and
ends bit-identical to an uninterrupted run: the state (trainable leaves, optimizer
state, step) is checkpointed, everything else (frozen base, adapter init, data order,
dropout keys) is a pure function of the config and the step.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from jpeft import tree as T
from jpeft.config import RunConfig, config_to_dict, method_kwargs
from jpeft.data import (Examples, batches, check_columns, load_rows, template_columns, tokenize_supervised,
                        tokenize_text)
from jpeft.errors import ConfigError
from jpeft.evaluate import evaluate_generation
from jpeft.models.hf import abstract_params, copy_tokenizer, from_pretrained, save_pretrained
from jpeft.parallel import batch_placer, make_mesh, param_shardings
from jpeft.peft import BY_NAME, parameter_report
from jpeft.peft.hf_format import save_adapter
from jpeft.train import checkpoint
from jpeft.train.optimizer import adamw, lora_plus, schedule
from jpeft.train.step import init_state, make_eval_step, make_train_step

log = logging.getLogger("jpeft.train")


def build_method(cfg: RunConfig):
    return BY_NAME[cfg.method.name](**method_kwargs(cfg.method))


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={model_dir}: no usable tokenizer files ({e}); "
                          "copy the base model's tokenizer files into it") from None


def prepare(cfg: RunConfig, path: str, tokenizer) -> Examples:
    """Rows of a data file -> fixed-shape token arrays with the loss mask the config asks for."""
    d = cfg.data
    rows = load_rows(path)
    if d.text:
        check_columns(rows, path, [d.text])
        return tokenize_text(rows, tokenizer, "{" + d.text + "}", cfg.train.seq_len)
    check_columns(rows, path, sorted(set(template_columns(d.prompt)) | {d.target}))
    return tokenize_supervised(rows, tokenizer, d.prompt, "{" + d.target + "}", cfg.train.seq_len)


def mean_nll(eval_step, params, examples: Examples, batch_size: int) -> float:
    """Token-weighted mean NLL over all examples (the last batch padded with zero weight)."""
    total, count = 0.0, 0.0
    n = len(examples.input_ids)
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size) % n
        batch = {k: getattr(examples, k)[index] for k in ("input_ids", "labels", "loss_mask", "attention_mask")}
        batch["loss_mask"] = batch["loss_mask"] * (np.arange(start, start + batch_size) < n)[:, None]
        s, c = eval_step(params, batch)
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def generation_metrics(cfg: RunConfig, model, params, tokenizer) -> dict:
    """ROUGE/BLEU of greedy outputs on the first `data.eval_limit` eval rows, keys prefixed `eval_`."""
    rows = load_rows(cfg.data.eval)
    rows = rows.select(range(min(cfg.data.eval_limit, len(rows))))
    scores = evaluate_generation(model, params, tokenizer, rows, cfg.data.prompt, [cfg.data.target],
                                 cfg.data.max_new_tokens, cfg.train.batch_size)
    return {f"eval_{k}": v for k, v in scores.items() if k != "n"}


def save_on_interrupt(mngr, state, out_dir: str) -> None:
    """Keep the work done so far: checkpoint the last completed step unless it is already saved."""
    try:
        step = int(state["step"])
        if step and mngr.latest_step() != step:
            checkpoint.save(mngr, step, state)
        log.warning("interrupted after step %d; re-run the same command on %s to resume", step, out_dir)
    except Exception as e:  # noqa: BLE001 - the interrupt matters more than a failed rescue
        log.warning("interrupted; could not checkpoint the last step (%s)", e)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: str, resume_step: int):
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.file = open(path, "w")
        self.file.writelines(kept)
        self.file.flush()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(cfg: RunConfig, progress: bool = True) -> dict:
    """Run (or resume) the configured fine-tune; returns the final metrics record."""
    if not cfg.model.path or not cfg.data.train:
        raise ConfigError("model.path and data.train must be set (in the YAML file or as key=value overrides)")
    tc = cfg.train
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)

    model, params = from_pretrained(cfg.model.path, dtype=cfg.model.dtype)
    model = model.clone(config=model.config.replace(remat=cfg.model.remat))
    tokenizer = load_tokenizer(cfg.model.path)
    train_examples = prepare(cfg, cfg.data.train, tokenizer)
    eval_examples = prepare(cfg, cfg.data.eval, tokenizer) if cfg.data.eval else None

    method = build_method(cfg)
    params = method.init(jax.random.key(tc.seed), params)
    mask = method.mask(params)
    log.info("%s: %s", method, parameter_report(params, mask))
    mesh = make_mesh(fsdp=tc.fsdp, tensor=tc.tensor)
    params = jax.device_put(params, param_shardings(params, abstract_params(model), mesh))
    trainable, frozen = T.partition(params, mask)
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    place_batch = batch_placer(mesh, tc.batch_size)

    optimizer = lora_plus(adamw(tc.lr, tc.steps, tc.warmup, tc.weight_decay, tc.min_lr_ratio), trainable,
                          getattr(method, "lr_ratio", 1.0))
    lr_at = schedule(tc.lr, tc.steps, tc.warmup, tc.min_lr_ratio)
    state = jax.jit(init_state, static_argnums=1)(trainable, optimizer)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    mngr = checkpoint.manager(cfg.out_dir)
    restored = checkpoint.restore_latest(mngr, state)
    if restored is not None:
        state = restored
        log.info("resuming %s from step %d", cfg.out_dir, int(state["step"]))
    start = int(state["step"])
    train_step = make_train_step(model, optimizer, tc.seed, getattr(method, "dropout", 0) > 0, state_shardings)
    eval_step = make_eval_step(model)
    data = batches(train_examples, tc.batch_size * tc.grad_accum, tc.seed, start_step=start)
    metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), start)
    record: dict = {}
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, desc="train", unit="step")
    tick, tokens = time.perf_counter(), 0
    try:
        for step in range(start + 1, tc.steps + 1):
            batch = place_batch({k: v.reshape(tc.grad_accum, tc.batch_size, -1) for k, v in next(data).items()})
            state, out = train_step(state, frozen, batch)
            tokens += batch["input_ids"].size
            last = step == tc.steps
            if step % tc.log_every == 0 or last:
                out = jax.device_get(out)
                now = time.perf_counter()
                record = {"step": step, "loss": float(out["loss"]), "lr": float(lr_at(step - 1)),
                          "grad_norm": float(out["grad_norm"]), "tokens_per_s": tokens / (now - tick)}
                tick, tokens = now, 0
                if eval_examples is not None and ((tc.eval_every and step % tc.eval_every == 0) or last):
                    params = T.combine(state["trainable"], frozen)
                    record["eval_loss"] = mean_nll(eval_step, params, eval_examples, tc.batch_size)
                    if last and cfg.data.target and cfg.data.eval_limit:
                        record.update(generation_metrics(cfg, model, params, tokenizer))
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if (tc.save_every and step % tc.save_every == 0) or last:
                checkpoint.save(mngr, step, state)
            bar.update(1)
    except KeyboardInterrupt:
        save_on_interrupt(mngr, state, cfg.out_dir)
        raise
    bar.close()
    metrics.close()
    export(cfg, model, method, T.combine(state["trainable"], frozen))
    return record


def export(cfg: RunConfig, model, method, params) -> str:
    """out_dir/model (HF dir) for full fine-tuning, else out_dir/adapter (HF PEFT dir where PEFT has
    the method, jpeft's own otherwise)."""
    if cfg.method.name == "full":
        out = os.path.join(cfg.out_dir, "model")
        save_pretrained(out, model, params, tokenizer_from=cfg.model.path)
    else:
        out = os.path.join(cfg.out_dir, "adapter")
        save_adapter(out, params, base_model_name_or_path=os.path.abspath(cfg.model.path), method=method)
        copy_tokenizer(cfg.model.path, out)
    return out
