"""The training loop: config in, adapter (or model) + metrics.jsonl + checkpoints out.

Re-running the same config on the same out_dir resumes from the latest checkpoint and
ends bit-identical to an uninterrupted run: the state (trainable leaves, optimizer
state, step) is checkpointed, everything else (frozen base, adapter init, data order,
dropout keys) is a pure function of the config and the step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from jpeft import forgetting
from jpeft import tree as T
from jpeft.config import RunConfig, config_to_dict
from jpeft.data import Examples, batches, load_rows, pad_id, render_all
from jpeft.data.prepare import RunData, prepare_rows, run_data
from jpeft.data.tasks import mixture_batches
from jpeft.errors import ConfigError, TrainingError
from jpeft.evaluate import evaluate_classifier, predict, text_metrics
from jpeft.generate import require_prompt_room
from jpeft.models.config import ModelConfig
from jpeft.models.hf import copy_tokenizer, from_pretrained, has_classifier, load_tokenizer, save_pretrained
from jpeft.parallel import (activation_sharding, batch_sharding, initialize, local_rows, make_mesh, place_batch,
                            state_shardings)
from jpeft.peft import count_parameters, parameter_report, sites
from jpeft.peft.classifier import Classifier, hf_unsupported, label_config, save_label_config, split_head
from jpeft.peft.hf_format import save_adapter
from jpeft.peft.llama_adapter import PEFT_MODEL_TYPES as PEFT_ADAPTION_PROMPT_TYPES, LlamaAdapter
from jpeft.peft.quant import QUANT_LEAVES
from jpeft.train import checkpoint
from jpeft.train.build import (build_method, build_optimizer, class_labels, init_method, run_model_config,
                               require_trainable, train_mask, uses_dropout)
from jpeft.train.lock import out_dir_lock
from jpeft.train.metrics import MetricsLog, Window
from jpeft.train.optimizer import applied_updates, schedule
from jpeft.train.stop import StopRequests
from jpeft.train.step import init_state, make_eval_step, make_train_step

log = logging.getLogger("jpeft.train")
BASE_WEIGHTS = ("kernel", "embedding", *QUANT_LEAVES)  # frozen leaves an adapter export never reads


def prepare(cfg: RunConfig, path: str, tokenizer, labels: list[str] | None = None,
            model_cfg: ModelConfig | None = None) -> Examples:
    """Rows of one data file as the run's data.* keys make them (jpeft.data.prepare.prepare_rows)."""
    return prepare_rows(cfg.data, load_rows(path), path, tokenizer, cfg.train.seq_len, cfg.train.seed, model_cfg,
                        labels, cfg.method.pooling).examples.with_loss_index()


def nll_sums(eval_step, params, examples: Examples, batch_size: int) -> tuple[float, float]:
    """(summed NLL, token count) over all examples (the last batch padded with zero weight)."""
    total, count = 0.0, 0.0
    n = len(examples.input_ids)
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size) % n
        batch = {k: v[index] for k, v in examples.arrays().items()}
        batch["loss_mask"] = batch["loss_mask"] * (np.arange(start, start + batch_size) < n)[:, None]
        s, c = eval_step(params, batch)
        total, count = total + float(s), count + float(c)
    return total, count


def mean_nll(eval_step, params, examples: Examples, batch_size: int) -> float:
    """Token-weighted mean NLL over all examples."""
    total, count = nll_sums(eval_step, params, examples, batch_size)
    return total / max(count, 1.0)


def evaluation(cfg: RunConfig, model, params, tokenizer, data: RunData, eval_step, generate: bool) -> dict:
    """The eval_* keys of a record: each task's held-out loss (a classifier's accuracy and F1), the
    token-weighted loss over all of them, and with `generate` ROUGE/BLEU of greedy outputs on the first
    data.eval_limit rows of each supervised task. A mixture's tasks get `eval_<task>_...` keys beside the overall `eval_loss`."""
    record, total, count = {}, 0.0, 0.0
    for name, prepared in data.evals.items():
        prefix = f"eval_{name}_" if name else "eval_"
        if prepared.examples.labels.ndim == 1:
            scores = evaluate_classifier(model, params, prepared.examples, cfg.train.batch_size)
            record.update({prefix + k: v for k, v in scores.items() if k != "n"})
            continue
        s, c = nll_sums(eval_step, params, prepared.examples, cfg.train.batch_size)
        record[prefix + "loss"], total, count = s / max(c, 1.0), total + s, count + c
        if generate and prepared.prompts is not None and cfg.data.eval_limit:
            n = min(cfg.data.eval_limit, len(prepared.rows))
            rows, prompts, targets = (prepared.rows.select(range(n)), *(
                t if isinstance(t, str) else t[:n] for t in (prepared.prompts, prepared.targets)))
            outputs = predict(model, params, tokenizer, rows, prompts, cfg.data.max_new_tokens, cfg.train.batch_size,
                              prepared.chat, prepared.system)
            scores = text_metrics(outputs, render_all(targets, rows))
            record.update({prefix + k: v for k, v in scores.items() if k != "n"})
    if count and "" not in data.evals:  # a mixture's tasks: their loss over all of them too
        record["eval_loss"] = total / count
    return record


def probe_scores(cfg: RunConfig, model, params, tokenizer, probes: list[forgetting.Probe]) -> list[float]:
    """Each eval.forgetting probe's score, at the run's train.seq_len, train.batch_size and data.max_new_tokens."""
    return [forgetting.score(model, params, tokenizer, probe, cfg.train.seq_len, cfg.train.batch_size,
                             cfg.data.max_new_tokens) for probe in probes]


def train(cfg: RunConfig, progress: bool = True) -> dict:
    """Run (or resume) the configured fine-tune; returns the final metrics record.

    A SIGTERM or SIGINT stops the run at the next step boundary with a checkpoint saved; the
    record then says `"stopped"` and no adapter is exported (the re-run finishes the job). A second run into
    the out_dir of a run still going is refused (`lock.out_dir_lock`).
    """
    if not cfg.model.path or not (cfg.data.train or cfg.data.mixture):
        raise ConfigError("model.path and data.train (or data.mixture) must be set (in the YAML file or as "
                          "key=value overrides)")
    tc = cfg.train
    if tc.warmup >= tc.steps:
        log.warning("train.warmup=%d is not below train.steps=%d: the learning rate warms up over %d steps and "
                    "never decays", tc.warmup, tc.steps, max(tc.steps - 1, 0))
    probes = forgetting.read_probes(cfg.eval.forgetting or [], "eval.forgetting")
    initialize(cfg.dist.coordinator, cfg.dist.num_processes, cfg.dist.process_id)
    primary = jax.process_index() == 0
    with contextlib.ExitStack() as held:  # out_dir's lock, taken where the run first writes there
        return _train(cfg, progress, probes, primary, held)


def _train(cfg: RunConfig, progress: bool, probes: list[forgetting.Probe], primary: bool,
           held: contextlib.ExitStack) -> dict:
    tc = cfg.train
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    labels = class_labels(cfg)
    method = build_method(cfg, labels)
    trained = partial(train_mask, method, cfg.method.modules_to_save)
    # base leaves the run trains (full, BitFit, norms, modules_to_save) are read in float32: trained, they stay so;
    # QLoRA's are read as its codes, a layer at a time (the float base is never on the devices whole)
    model, params = from_pretrained(cfg.model.path, dtype=cfg.model.dtype, mesh=mesh, keep_float32=trained,
                                    quantize=method if hasattr(method, "quantizes") else None)
    model = model.clone(config=run_model_config(cfg, model.config))
    log.info("compute dtype %s (model.dtype=%s)", model.config.dtype, cfg.model.dtype)
    if rates := model.config.dropout_rates:
        log.info("the model's own dropout in training, from config.json (model.dropout=false turns it off): %s",
                 ", ".join(f"{k}={v}" for k, v in rates.items()))
    if model.config.router_aux_loss_coef:
        log.info("the routers' load-balancing loss in training, weighted %g (model.router_aux_loss_coef)",
                 model.config.router_aux_loss_coef)
    tokenizer = load_tokenizer(cfg.model.path)
    data = run_data(cfg, tokenizer, labels, model.config)
    base_scores = probe_scores(cfg, model, params, tokenizer, probes)  # the weights as loaded, before the method

    sites.require(method, model.insertion_points, model.config.model_type)
    params = init_method(method, params, model, mesh, tc.seed, cfg.method.modules_to_save)
    generates = (cfg.data.eval_limit and any(e.prompts is not None for e in data.evals.values())
                 or any(p.metric != "perplexity" for p in probes))
    check_positions(model.config, [data.train, *(e.examples for e in data.evals.values())],
                    sum(sites.virtual_tokens(params)), cfg, generates)
    mask = trained(params)
    require_trainable(method, mask)
    log.info("%s: %s", method, parameter_report(params, mask))
    trainable, frozen = T.partition(params, mask)
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    optimizer = build_optimizer(cfg, method, trainable, frozen)
    lr_at = schedule(tc.lr, tc.steps, tc.warmup, tc.min_lr_ratio)
    shardings = state_shardings(optimizer, trainable, mesh)
    state = jax.jit(init_state, static_argnums=1, out_shardings=shardings)(trainable, optimizer)

    if primary:  # one process writes out_dir; a run still going there holds it
        held.enter_context(out_dir_lock(cfg.out_dir))
    os.makedirs(cfg.out_dir, exist_ok=True)
    mngr = checkpoint.manager(cfg.out_dir, tc.keep_checkpoints)
    inputs, defaults = checkpoint.run_fingerprint(cfg)
    restored = checkpoint.restore_latest(mngr, state, inputs, defaults)
    if restored is not None:
        state = restored
        log.info("resuming %s from step %d", cfg.out_dir, int(state["step"]))
    if primary:
        with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        write_data_files(cfg.out_dir, data)
    start = int(state["step"])
    train_step = make_train_step(model, optimizer, tc.seed, uses_dropout(method, model), shardings,
                                 tasks=0 if data.draws is None else len(data.tasks))
    eval_step = make_eval_step(model, mesh)
    in_sharding = batch_sharding(mesh, tc.batch_size)
    shape = (tc.grad_accum, tc.batch_size, tc.seq_len)
    rows = local_rows(in_sharding, shape)
    draw = batches if data.draws is None else partial(mixture_batches, shares=data.draws)
    stream = draw(data.train, batch_size=tc.batch_size * tc.grad_accum, seed=tc.seed, start_step=start,
                  rows=_accumulated_rows(rows, tc.batch_size, tc.grad_accum))
    metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), start, enabled=primary)
    record: dict = {}
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and primary), desc="train", unit="step")
    tick, tokens, skipped = time.perf_counter(), 0, 0
    window = Window(data.tasks)
    loop_started = tick  # summary.json's train_seconds: the loop's wall time, first-step compile and evals included
    with StopRequests() as stop, _finishing(mngr):
        for step in range(start + 1, tc.steps + 1):
            local = {k: v.reshape(tc.grad_accum, rows.stop - rows.start, *v.shape[1:])
                     for k, v in next(stream).items()}
            with activation_sharding(mesh):
                state, out = train_step(state, frozen, place_batch(in_sharding, local, shape))
            out = jax.device_get(out)
            tokens += int(out["tokens"])
            if not out["finite"]:
                skipped = _non_finite(cfg, step, out, skipped, mngr)
            else:
                window.add(out)
            last = step == tc.steps
            logged, evaluated = step % tc.log_every == 0 or last, (bool(data.evals) or bool(probes)) and (
                (tc.eval_every and step % tc.eval_every == 0) or last)
            if logged or evaluated:
                now = time.perf_counter()
                lr = float(lr_at(applied_updates(state["opt_state"]) - 1))  # the rate of the last update applied
                record = {"step": step, **window.losses(out), "lr": lr, "grad_norm": float(out["grad_norm"]),
                          "tokens_per_s": tokens / (now - tick)}
                if skipped:
                    record["skipped_steps"] = skipped
                tick, tokens, window = now, 0, Window(data.tasks)
                if evaluated:
                    params = T.combine(state["trainable"], frozen)
                    record.update(evaluation(cfg, model, params, tokenizer, data, eval_step, generate=last))
                    record.update(forgetting.record(probes, base_scores,
                                                    probe_scores(cfg, model, params, tokenizer, probes)))
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            signal_name = None if last else stop.requested()
            if (tc.save_every and step % tc.save_every == 0) or last or signal_name:
                checkpoint.save(mngr, step, state, inputs)
            if signal_name:
                log.warning("%s: stopped after step %d with a checkpoint saved; run the same command again to "
                            "resume from it", signal_name, step)
                metrics.close()
                return {**record, "step": step, "stopped": signal_name}
    bar.close()
    metrics.close()
    train_seconds = time.perf_counter() - loop_started
    params = T.combine(state["trainable"], frozen)
    export(cfg, model, method, params, mask)
    finished = not record  # a re-run of a finished run trained nothing: its last record is the result
    if finished:
        log.info("%s finished already at step %d; nothing to train", cfg.out_dir, start)
    if primary and not (finished and os.path.exists(os.path.join(cfg.out_dir, "summary.json"))):
        # (a finished run killed during its export wrote no summary: it is written now)
        write_summary(cfg, method, count_parameters(params, mask), int(state["step"]), record or metrics.last,
                      train_seconds)
    return record or metrics.last


def check_positions(model_cfg: ModelConfig, parts: list[Examples], virtual: int, cfg: RunConfig,
                    generates: bool) -> None:
    """A model with learned positions (GPT-2's, OPT's) has none past its table: a longer example would train on NaN.
    A run that `generates` must leave its prompts room beside data.max_new_tokens (found now, not at its
    first evaluation)."""
    if generates:
        require_prompt_room(model_cfg, cfg.data.max_new_tokens, virtual, "data.max_new_tokens")
    if not model_cfg.learned_positions:
        return
    longest = max(part.longest() for part in parts)
    if longest + virtual > model_cfg.max_position_embeddings:
        room = model_cfg.max_position_embeddings - virtual
        raise ConfigError(f"the longest example has {longest} tokens{f' after {virtual} virtual ones' if virtual else ''}, "
                          f"but {cfg.model.path} has {model_cfg.max_position_embeddings} positions "
                          f"({model_cfg.positions_key}); set train.seq_len={room} (or less) so that longer examples "
                          "are cut to fit")


def write_data_files(out_dir: str, data: RunData) -> None:
    """out_dir/data.json: the account of every task's rows; out_dir/split.json: the row ids of each part
    of a split file (so evaluation can be checked never to see a training row)."""
    with open(os.path.join(out_dir, "data.json"), "w") as f:
        json.dump(data.report, f, indent=2)
    if data.splits:
        with open(os.path.join(out_dir, "split.json"), "w") as f:
            json.dump(data.splits, f)


def write_summary(cfg: RunConfig, method, counts: tuple[int, int], steps: int, record: dict,
                  train_seconds: float) -> None:
    """out_dir/summary.json: the few numbers `jpeft compare` tabulates, written only by a finished run
    (train_seconds is this process's loop: a resumed run's last leg)."""
    trainable, total = counts
    summary = {"method": cfg.method.name, "method_repr": repr(method), "trainable_params": trainable,
               "total_params": total, "train_seconds": round(train_seconds, 2), "peak_rss_bytes": peak_rss_bytes(),
               "steps": steps, **{k: v for k, v in record.items() if k.startswith(("eval_", forgetting.KEY_PREFIX))}}
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far, not this run's alone (a process that trains twice
    reports the larger peak unless it resets the count: jpeft.demo does). VmHWM where Linux has it:
    ru_maxrss carries over fork + exec from the parent."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


@contextlib.contextmanager
def _finishing(mngr):
    """However the loop ends, a checkpoint being written is completed, never abandoned."""
    try:
        yield
    finally:
        mngr.wait_until_finished()


def _gathered(params, mask, whole: bool):
    """Leaves gathered whole onto every host for export; a frozen base weight (which an adapter
    does not need) only as its shape, unless the whole model is exported."""
    from jax.experimental import multihost_utils
    flat, trained = T.flatten(params), T.flatten(mask)
    skip = {p for p in flat if not whole and not trained[p] and p.rsplit("/", 1)[1] in BASE_WEIGHTS}
    gathered = multihost_utils.process_allgather({p: v for p, v in flat.items() if p not in skip}, tiled=True)
    return T.unflatten({**gathered, **{p: jax.ShapeDtypeStruct(flat[p].shape, flat[p].dtype) for p in skip}})


def _accumulated_rows(rows: slice, batch_size: int, accum: int) -> np.ndarray:
    """This process's rows of a [grad_accum * batch] draw, as they fall in each micro-batch."""
    return np.concatenate([np.arange(rows.start, rows.stop) + i * batch_size for i in range(accum)])


def _non_finite(cfg: RunConfig, step: int, out: dict, skipped: int, mngr) -> int:
    """Stop naming the step, or (train.on_nonfinite=skip) count it; the update was not applied either way."""
    what = f"loss {float(out['loss'])}, gradient norm {float(out['grad_norm'])}"
    if cfg.train.on_nonfinite == "skip":
        log.warning("step %d: %s; update skipped", step, what)
        return skipped + 1
    mngr.wait_until_finished()
    raise TrainingError(f"step {step}: {what} — the update was not applied and the run stopped (latest "
                        f"checkpoint: step {mngr.latest_step()}); lower train.lr, check the data, or set "
                        "train.on_nonfinite=skip to skip such steps")


def export(cfg: RunConfig, model, method, params, mask) -> str:
    """out_dir/model (HF dir) for full fine-tuning or a lone classification head HF can hold, else
    out_dir/adapter (HF PEFT dir where PEFT has the method, jpeft's own otherwise; a classifier's
    class names and pad id beside it). Every process takes part in gathering the leaves no one
    host holds whole; process 0 writes."""
    whole = cfg.method.name == "full" or getattr(method, "saves_model", False) and has_classifier(
        model.config.model_type)
    if jax.process_count() > 1:
        params = _gathered(params, mask, whole=whole)
    out = os.path.join(cfg.out_dir, "model" if whole else "adapter")
    if jax.process_index() != 0:
        return out
    fields = None
    if isinstance(method, Classifier):  # built with the data's labels (build_method)
        fields = label_config(method.labels, pad_id(load_tokenizer(cfg.model.path)))
    if whole:
        save_pretrained(out, model, params, tokenizer_from=cfg.model.path, config=fields)
    else:
        save_adapter(out, params, base_model_name_or_path=os.path.abspath(cfg.model.path), method=method)
        if isinstance(method, LlamaAdapter) and model.config.model_type not in PEFT_ADAPTION_PROMPT_TYPES:
            log.warning("%s holds a LLaMA-Adapter in PEFT's layout, but PEFT's adaption prompt takes only %s "
                        "models: jpeft loads it, PeftModel does not", out, ", ".join(PEFT_ADAPTION_PROMPT_TYPES))
        copy_tokenizer(cfg.model.path, out)
        if fields:
            save_label_config(out, fields)
            if reason := hf_unsupported(split_head(params)[1]):
                log.info("%s holds the classifier in jpeft's own format: HF cannot hold %s", out, reason)
    return out
