"""A task's rows as training examples: checked and counted, rendered, tokenized.

Every run accounts for its rows (`Prepared.report`, logged and written to the run's
`data.json`): rows read, rows dropped by reason (a needed column missing or not a string;
`data.strict: true` makes any drop an error), examples truncated and the prompt and target
tokens the cuts removed.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jpeft.data.chat import conversations, tokenize_chat
from jpeft.data.examples import Examples
from jpeft.data.labels import label_ids
from jpeft.data.sources import usable_rows
from jpeft.data.tasks import (mixing_rates, needed_fields, phrasings, row_shares, run_tasks, split_rows,
                              task_rows, template_set)
from jpeft.data.tokenize import (Templates, check_last_not_pad, tokenize_classification, tokenize_seq2seq,
                                 tokenize_supervised, tokenize_text)
from jpeft.errors import ConfigError

log = logging.getLogger("jpeft.data")


@dataclasses.dataclass(frozen=True)
class Prepared:
    examples: Examples
    rows: Any  # the rows used, in order
    # The rows' prompt and target templates, to score greedy outputs (supervised rows; chat rows made from
    # them, whose prompts decoding then renders in the chat template after the `system` message).
    prompts: Templates | None
    targets: Templates | None
    report: dict
    chat: bool = False
    system: str | None = None


def prepare_rows(data, rows, where: str, tokenizer, seq_len: int, seed: int = 0, model_cfg=None,
                 labels: list[str] | None = None, pooling: str = "last") -> Prepared:
    """The rows of one task (`data`: its DataSection; `where`: the file, for messages) as Examples with
    the loss mask it asks for: a classifier's one class id per row (through the class names `labels`),
    an encoder-decoder's prompt into the encoder and target from the decoder (unpacked), chat rows'
    assistant turns (data.chat), a language model's every token (data.text), else the targets."""
    seq2seq = model_cfg is not None and model_cfg.is_encoder_decoder
    if seq2seq and (data.label or data.text or data.chat):
        raise ConfigError(f"{model_cfg.model_type} is an encoder-decoder: train it on data.prompt / data.target "
                          "rows, not data.text, data.label or data.chat")
    read = len(rows)
    if data.template is not None:
        template_set(data).check_columns(rows.column_names, where)
    rows, dropped = usable_rows(rows, where, needed_fields(data), data.strict)
    prompts, targets = phrasings(data, len(rows), seed)
    if data.label:
        text = data.prompt if data.prompt is not None else "{" + data.text + "}"
        examples = tokenize_classification(rows, tokenizer, text, seq_len, label_ids(rows, data.label, where, labels))
        if pooling == "last":
            check_last_not_pad(examples, tokenizer, where)
        prompts = targets = None
    elif data.text:
        examples = tokenize_text(rows, tokenizer, "{" + data.text + "}", seq_len, data.packing)
    elif data.chat:
        examples = tokenize_chat(conversations(rows, where, prompts, targets, data.system), tokenizer, seq_len,
                                 data.packing)
    elif seq2seq:
        examples = tokenize_seq2seq(rows, tokenizer, prompts, targets, seq_len, model_cfg.decoder_start_token_id)
    else:
        examples = tokenize_supervised(rows, tokenizer, prompts, targets, seq_len, data.packing)
    report = {"rows_read": read, "rows_used": len(rows), "rows_dropped": dropped,
              "examples_truncated": examples.n_truncated, "prompt_tokens_lost": examples.prompt_tokens_lost,
              "target_tokens_lost": examples.target_tokens_lost}
    log.info("%s: %s", where, describe(report))
    return Prepared(examples, rows, prompts, targets, report, bool(data.chat), data.system)


def describe(report: dict) -> str:
    """One line of a data report."""
    dropped = sum(report["rows_dropped"].values())
    reasons = "; ".join(f"{reason}: {n}" for reason, n in report["rows_dropped"].items())
    return (f"{report['rows_read']} rows read, {dropped} dropped" + (f" ({reasons})" if reasons else "")
            + f", {report['examples_truncated']} examples truncated ({report['prompt_tokens_lost']} prompt and "
              f"{report['target_tokens_lost']} target tokens lost)")


@dataclasses.dataclass(frozen=True)
class RunData:
    """What a run trains and evaluates on: every task's training rows as one Examples (a mixture's
    numbered by `task`, drawn at `draws`), each task's eval part, and the account of it all."""
    tasks: list
    train: Examples
    evals: dict  # task name -> Prepared
    draws: Any  # a mixture's share of the rows drawn per task, which gives each its share of examples (None: one task)
    report: dict  # "<task>/<part>" (or "<part>") -> a prepare_rows report
    splits: dict  # task name -> {"source", "seed", part: row ids}, for the tasks with data.split


def check_step_rows(train: Examples, tc) -> None:
    """A step draws train.batch_size × train.grad_accum distinct rows (packed rows, where examples are packed)."""
    step = tc.batch_size * tc.grad_accum
    if len(train) < step:
        packed = f" (packed from {int(train.examples_per_row().sum())} examples)" if train.positions is not None else ""
        raise ConfigError(f"{len(train)} training rows{packed} for a step of train.batch_size × train.grad_accum "
                          f"= {tc.batch_size} × {tc.grad_accum} = {step} rows; add data or lower them")


def run_data(cfg, tokenizer, labels: list[str] | None = None, model_cfg=None) -> RunData:
    """The configured run's data (jpeft.data.tasks), each part prepared by `prepare_rows`."""
    tasks, seed = run_tasks(cfg.data), cfg.train.seed
    trains, evals, report, splits = [], {}, {}, {}
    for task in tasks:
        for part in ("train", "eval"):
            found = task_rows(task, part, seed)
            if found is None:
                continue
            rows, where, ids = found
            prepared = prepare_rows(task.data, rows, where, tokenizer, cfg.train.seq_len, seed, model_cfg, labels,
                                    cfg.method.pooling)
            report["/".join(filter(None, (task.name, part)))] = prepared.report
            if part == "train":
                trains.append(prepared)
            else:
                evals[task.name] = prepared
        if task.data.split is not None:
            splits[task.name] = {"source": task.data.train, "seed": seed,
                                 **{part: ids for part, (_, ids) in split_rows(task.data.train, task.data.split,
                                                                               seed).items()}}
    if len(tasks) == 1:  # (a mixture draws its rows with replacement: any number makes a step)
        train = trains[0].examples.with_loss_index()
        check_step_rows(train, cfg.train)
        return RunData(tasks, train, evals, None, report, splits)
    used = [p.report["rows_used"] for p in trains]
    rates = mixing_rates(tasks, used)
    log.info("mixture: %s of the examples", ", ".join(f"{t.name} {r:.1%}" for t, r in zip(tasks, rates)))
    return RunData(tasks, Examples.concatenate([p.examples for p in trains]).with_loss_index(), evals,
                   row_shares(rates, used, [len(p.examples) for p in trains]), report, splits)
