"""The rules of a RunConfig that types alone cannot express: choices, value ranges and how keys
go together (a data source renders its rows one way; a mixture's entries are sources of their own;
a classifier trains on a label column). Every failure names the key and where its value came from.
"""
import dataclasses
import difflib
import logging
import math
import os
import re

from jpeft.config import KEY_TYPES, LORA_KEY, DataSection, RunConfig, coerce, method_options
from jpeft.errors import ConfigError
from jpeft.peft.quant import KINDS as QUANT_KINDS

CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "method.init": ("peft", "gaussian", "pissa", "olora"),
    "method.quant": QUANT_KINDS,
    "method.expert_quant": QUANT_KINDS,  # or none: the experts stay float
    "method.kind": ("houlsby", "pfeiffer", "parallel"),
    "method.pooling": ("last", "mean"),
    "train.on_nonfinite": ("stop", "skip"),
    "data.template_mode": ("random", "cycle"),
}
_POSITIVE = ("train.steps", "train.batch_size", "train.seq_len", "train.grad_accum", "train.keep_checkpoints",
             "method.rank", "train.log_every", "data.max_new_tokens", "method.num_virtual_tokens", "method.tasks",
             "method.adapter_len", "method.size", "method.num_labels", "method.hidden")
_NON_NEGATIVE = ("train.warmup", "train.save_every", "train.eval_every", "train.weight_decay",
                 "train.lr", "method.alpha", "data.eval_limit", "train.seed",
                 "model.router_aux_loss_coef")
_UNIT_INTERVAL = ("train.min_lr_ratio",)


def check(cfg: RunConfig, origins: dict[str, str]) -> None:
    """Value ranges, choices and cross-field rules that types alone cannot express."""
    def get(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    def fail(key, message):
        raise ConfigError(f"config key '{key}' (from {origins.get(key, 'defaults')}) {message}")

    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "out_dir"}
    for name, section in sections.items():  # NaN passes every range check below; inf is no learning rate
        for key, value in dataclasses.asdict(section).items():
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"{name}.{key}", f"must be a finite number, got {value}")
    if not cfg.out_dir:
        fail("out_dir", "must name the run's directory, e.g. out_dir=runs/my_run")
    if os.path.isfile(cfg.out_dir):
        fail("out_dir", f"is the file {cfg.out_dir}, not a directory")
    from jpeft.peft.registry import BY_NAME
    for key, choices in {**CHOICES, "method.name": tuple(BY_NAME)}.items():
        if get(key) is not None and get(key) not in choices:  # None: an optional key left unset
            fail(key, f"must be one of {', '.join(choices)}, got {get(key)!r}")
    for key in _POSITIVE:
        if get(key) is not None and get(key) <= 0:
            fail(key, f"must be positive, got {get(key)}")
    for key in _NON_NEGATIVE:
        if get(key) is not None and get(key) < 0:
            fail(key, f"must be >= 0, got {get(key)}")
    for key in _UNIT_INTERVAL:
        if not 0 <= get(key) <= 1:
            fail(key, f"must be between 0 and 1, got {get(key)}")
    if cfg.train.seq_len == 1:  # a row of one token has no next token to learn: every loss would be 0 of 0
        fail("train.seq_len", "must be at least 2, got 1")
    mesh = {k: get(k) for k in ("mesh.data", "mesh.fsdp", "mesh.tensor")}
    for key, size in mesh.items():
        if size == 0 or size < -1:
            fail(key, f"must be a positive number of devices or -1 (the devices left over), got {size}")
    if sum(size == -1 for size in mesh.values()) > 1:
        fail("mesh.data", f"only one mesh axis may be -1, got {mesh} (mesh.data is -1 unless set: "
                          "set it, e.g. mesh.data=1, to give the devices left over to another axis)")
    dist = cfg.dist
    if dist.coordinator is not None:
        if dist.num_processes is None or dist.process_id is None:
            fail("dist.coordinator", "needs dist.num_processes and dist.process_id too")
        if not 0 <= dist.process_id < dist.num_processes:
            fail("dist.process_id", f"must be in [0, dist.num_processes={dist.num_processes}), got {dist.process_id}")
        host, _, port = dist.coordinator.rpartition(":")
        if not host or not port.isdigit():
            fail("dist.coordinator", f"must be host:port of process 0, got {dist.coordinator!r}")
    else:  # without a coordinator every process would train alone, as process 0 of 1, into the same out_dir
        for key in ("num_processes", "process_id"):
            if getattr(dist, key) is not None:
                fail(f"dist.{key}", "needs dist.coordinator (host:port of process 0) too; on TPU pods and "
                                    "SLURM leave dist.* unset: JAX finds the processes itself")
    if not 0 <= cfg.method.dropout < 1:
        fail("method.dropout", f"must be in [0, 1), got {cfg.method.dropout}")
    if cfg.method.targets is not None and not cfg.method.targets and not cfg.method.target_parameters:
        fail("method.targets", "must name at least one module, e.g. [q_proj, v_proj] (or be [] beside "
                               "method.target_parameters, a LoRA on a mixture's experts alone)")
    if cfg.method.name == "prompt" and cfg.method.tasks > 1:
        fail("method.tasks", f"={cfg.method.tasks}: a run of jpeft train trains one prompt (its data has no task "
                             "column to route rows by); train one run per task, or several prompts from Python "
                             "with jpeft.select_task(params, task_ids) per batch")
    options = method_options(cfg.method.name)
    ignored = sorted(k for k in origins if k.startswith("method.") and k != "method.name"
                     and k.split(".")[1] not in options)
    if ignored:  # e.g. a LoRA config run with method.name=full: say so, do not stop
        logging.getLogger("jpeft.config").warning(
            "%s: not options of method.name=%s (its options: %s); ignored", ", ".join(ignored), cfg.method.name,
            ", ".join(sorted(options)) or "none")
    if cfg.method.lora is not None and "lora" in options:
        _check_lora(cfg.method.lora, origins)
    data = cfg.data
    evaluated = data.eval or data.split or data.mixture or cfg.eval.forgetting
    unused = [k for k in ("train.eval_every", "data.eval_limit") if k in origins and not evaluated]
    if unused:  # say so: the user expects evaluations the run cannot make
        logging.getLogger("jpeft.config").warning(
            "%s set, but the run has nothing to evaluate (no data.eval, data.split, data.mixture or "
            "eval.forgetting); no evaluation will run", " and ".join(unused))
    if data.mixture is not None:
        _check_mixture(cfg, fail)
    elif data.train is not None and (data.label is not None or cfg.method.name == "classifier"):
        if data.chat:
            fail("data.label", "conflicts with data.chat=true: chat rows train on the assistant turns of a "
                               "messages column or of data.prompt + data.target; set data.chat=false to classify")
        _check_classification(cfg, fail)
    elif data.train is not None:
        _check_source(data, lambda key, message: fail(f"data.{key}", message))


def _check_source(data: DataSection, fail) -> None:
    """One source of rows renders them one way: a template set, prompt + target, or text; a split
    of its file replaces data.eval. `fail(key, message)` names the key within its section."""
    if data.template is not None:
        if data.prompt is not None or data.target is not None:
            fail("template", "conflicts with data.prompt/data.target: a template set brings its own prompt and "
                             "target phrasings; set one or the other")
        if data.text is not None:
            fail("text", "conflicts with data.template: set a template set (supervised) or text (language "
                         "modelling), not both")
    elif data.columns is not None:
        fail("columns", "maps the fields of a template set; set data.template too")
    else:
        supervised = data.prompt is not None or data.target is not None
        if supervised and (data.prompt is None or data.target is None):
            fail("target" if data.target is None else "prompt",
                 "is required: supervised data needs both data.prompt and data.target templates, e.g. "
                 "prompt: 'Summarize: {dialogue}', target: '{summary}' (or data.template: summarization)")
        if supervised and data.text is not None:
            fail("text", "conflicts with data.prompt/data.target: set either prompt+target (supervised, loss on "
                         "the target) or text (language modelling, loss everywhere), not both")
        if not supervised and data.text is None and not data.chat:
            fail("train", "needs templates: set data.prompt+data.target (supervised, e.g. prompt: 'Summarize: "
                          "{dialogue}', target: '{summary}'), data.template (a set of phrasings, e.g. "
                          "summarization), data.text (language modelling, e.g. text: '{dialogue}') or "
                          "data.chat=true (rows with a messages column)")
    if data.chat and data.text is not None:
        fail("text", "conflicts with data.chat=true: chat rows train on the assistant turns of a messages column "
                     "or of data.prompt + data.target; set data.chat=false for language modelling")
    if data.system is not None and not data.chat:
        fail("system", "needs data.chat=true: a system message is rendered by the tokenizer's chat template")
    if data.split is not None:
        from jpeft.data.tasks import check_split
        check_split(data.split, data.eval, fail)


MIXTURE_OWN = {"name": str | None, "weight": float | None, "cap": int | None}  # an entry's own keys
NOT_PER_TASK = ("mixture", "label", "eval_limit", "max_new_tokens")  # run-wide data.* keys


def _check_mixture(cfg: RunConfig, fail) -> None:
    """Each entry: a mapping of its own keys and the data.* keys it sets for its task (typed here,
    in place), checked as a source of its own; no run-wide source beside them."""
    data = cfg.data
    for key in ("train", "eval", "prompt", "target", "text", "template", "split", "label"):
        if getattr(data, key) is not None:
            fail(f"data.{key}", "conflicts with data.mixture: each mixture entry names its own train file, "
                                f"templates and eval file; move data.{key} into the entries")
    if cfg.method.name == "classifier":
        fail("data.mixture", "mixes generation tasks; a classifier trains on one labelled file (data.label)")
    if not data.mixture:
        fail("data.mixture", "must list at least one task, e.g. [{train: a.jsonl, template: summarization}]")
    per_task = [f.name for f in dataclasses.fields(DataSection) if f.name not in NOT_PER_TASK]
    typed = []
    for i, entry in enumerate(data.mixture):
        where = f"data.mixture[{i}]"
        values = {}
        for key, value in entry.items():
            if key not in MIXTURE_OWN and key not in per_task:
                close = difflib.get_close_matches(str(key), [*MIXTURE_OWN, *per_task], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                fail("data.mixture", f"entry {i} has an unknown key {key!r}{hint}; an entry takes "
                                     f"{', '.join([*MIXTURE_OWN, *per_task])}")
            tp = MIXTURE_OWN.get(key) or KEY_TYPES[f"data.{key}"]
            values[key] = coerce(value, tp, f"{where}.{key}", "data.mixture")
        if values.get("train") is None:
            fail("data.mixture", f"entry {i} needs a train file (train: path)")
        for key in ("weight", "cap"):
            if values.get(key) is not None and values[key] <= 0:
                fail("data.mixture", f"entry {i}: {key} must be positive, got {values[key]}")
        typed.append(values)
    weighted = [entry.get("weight") is not None for entry in typed]
    if any(weighted) and not all(weighted):
        fail("data.mixture", "gives some entries a weight and not others; give every entry a weight (shares of the "
                             "examples), or none (each task's share is its number of examples, up to its cap)")
    if any(weighted) and any(entry.get("cap") is not None for entry in typed):
        fail("data.mixture", "sets a cap beside weights; a cap limits an examples-proportional share, so drop the "
                             "weights or the caps")
    data.mixture = typed
    from jpeft.data.tasks import run_tasks
    names = [task.name for task in run_tasks(data)]
    if len(set(names)) != len(names):
        fail("data.mixture", f"task names must differ, got {names}; give entries a name: key")
    for i, task in enumerate(run_tasks(data)):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", task.name):
            fail("data.mixture", f"entry {i}: name {task.name!r} may hold only letters, digits, '_', '.', '-' "
                                 "(it names the task's metrics)")
        _check_source(task.data, lambda key, message, i=i: fail("data.mixture", f"entry {i}: {key} {message}"))


def _check_lora(options: dict, origins: dict[str, str]) -> None:
    """A classifier's LoRA options, checked the sure way: by building `jpeft.LoRA` from them."""
    import inspect

    from jpeft.errors import JpeftError
    from jpeft.peft.lora import LoRA
    try:
        LoRA(**options)
    except TypeError:  # an option LoRA does not take
        valid = list(inspect.signature(LoRA).parameters)
        bad = next(name for name in options if name not in valid)
        close = difflib.get_close_matches(bad, valid, n=1)
        hint = f"; did you mean '{LORA_KEY}.{close[0]}'?" if close else ";"
        raise ConfigError(f"config key '{LORA_KEY}.{bad}' (from {origins[f'{LORA_KEY}.{bad}']}) is not an option "
                          f"of jpeft.LoRA{hint} its options: {', '.join(valid)}") from None
    except JpeftError as e:
        where = ", ".join(dict.fromkeys(o for k, o in origins.items() if k.startswith(LORA_KEY)))
        raise ConfigError(f"config key '{LORA_KEY}' (from {where}): {e}") from None


def _check_classification(cfg: RunConfig, fail) -> None:
    """A classifier trains on a label column, with an input text (data.prompt or data.text) and no target."""
    data = cfg.data
    if data.label is None:
        fail("data.label", "is required by method.name=classifier: name the column holding each row's class")
    if cfg.method.name != "classifier":
        fail("data.label", f"needs method.name=classifier (got {cfg.method.name!r}); a label column is "
                           "what a classification head trains on")
    if data.target is not None or data.template is not None:
        key = "data.target" if data.target is not None else "data.template"
        fail(key, "conflicts with data.label: a classifier predicts the label column, not a target text")
    if (data.prompt is None) == (data.text is None):
        fail("data.label", "needs the input text from exactly one of data.prompt (a template, e.g. "
                           "'Review: {review}') or data.text (a column, e.g. review)")
