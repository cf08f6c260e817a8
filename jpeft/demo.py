"""`jpeft demo`: the whole stack, offline, on DialogSum, in minutes on a laptop CPU.

No pretrained weights can be downloaded, so the demo builds its base honestly: a
byte-level BPE tokenizer and a small Llama trained (through the same trainer) on the
dialogues of the training rows. It then fine-tunes that base to summarize, once fully
and once with LoRA (or with each of `methods`, under one step budget), and scores the base
and every fine-tune on rows none of them ever saw: teacher-forced NLL of the reference
summaries and ROUGE/BLEU of greedy summaries, beside a lead baseline (the dialogue's
opening) for scale, and what each fine-tune forgot of the base's own task (the perplexity of
the held-out dialogues, before and after), in one `jpeft compare` table.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

import jax
import numpy as np

from jpeft import compare
from jpeft import tree as T
from jpeft.config import RunConfig, load_config
from jpeft.data import DIALOGSUM_SAMPLE, check_columns, load_rows
from jpeft.data.bpe import speaker_tags, train_bpe_tokenizer
from jpeft.errors import ConfigError, DataError, Stopped
from jpeft.evaluate import predict, text_metrics
from jpeft.forgetting import KEY_PREFIX, read_probe, record, score
from jpeft.hardware import reported_flags, resolve_dtype
from jpeft.models.config import ModelConfig
from jpeft.models.hf import build, from_pretrained, save_pretrained
from jpeft.models.llama import init_params
from jpeft.peft.hf_format import load_adapter
from jpeft.train.step import make_eval_step
from jpeft.train.trainer import load_tokenizer, mean_nll, prepare, train

log = logging.getLogger("jpeft.demo")
PROMPT = "{dialogue}\nSummary: "
METRICS = ("rouge1", "rouge2", "rougeL", "bleu")
# `finetune` is the one step budget every method gets; `methods` tweaks METHOD_PRESETS for a model size.
PRESETS = {
    # Small batches, many steps: on this little data the loss is limited by optimizer steps, not by examples per step.
    "default": dict(vocab=4096, hidden=256, layers=4, heads=4, mlp=704, held_out=50, max_new_tokens=60,
                    base=dict(steps=1440, batch_size=2, seq_len=256, lr=1e-3, warmup=72),
                    finetune=dict(steps=260, batch_size=2, seq_len=512, warmup=20)),
    "tiny": dict(vocab=400, hidden=32, layers=2, heads=2, mlp=64, held_out=4, max_new_tokens=8, rows=40,
                 base=dict(steps=4, batch_size=4, seq_len=64, lr=3e-3, warmup=1),
                 finetune=dict(steps=3, batch_size=4, seq_len=96, warmup=1),
                 methods={"lora": dict(lr=3e-3, rank=4, alpha=8), "road": dict(group_size=8)}),  # 32 wide
}
ALL_PROJECTIONS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
T5_PROJECTIONS = "[q,k,v,o,wi_0,wi_1,wo]"  # the same projections, as PEFT names them in T5
FAMILIES = ("llama", "t5")
LORA_PRESET = dict(lr=4e-3, rank=16, alpha=32, targets=ALL_PROJECTIONS)
DEFAULT_LR = 5e-3  # the learning rate of a method METHOD_PRESETS lacks (which also keeps its default options)
METHOD_PRESETS = {  # train.lr and method.* options per method
    "full": dict(lr=1e-3),
    "lora": LORA_PRESET,
    "qlora": LORA_PRESET,
    "vera": dict(lr=5e-2, targets=ALL_PROJECTIONS),  # at its default rank, PEFT's 256; 1e-2 to 2e-1 tried
    "loha": dict(lr=1e-2, targets=ALL_PROJECTIONS),  # PEFT's r=8, alpha=8 (LoRA r=16's count); 4e-3 to 4e-2 tried
    "lokr": dict(lr=2e-2, targets=ALL_PROJECTIONS),  # PEFT's r=8, alpha=8 (VeRA's count); 1e-2 to 1.2e-1 tried
    "oft": dict(lr=5e-3, targets=ALL_PROJECTIONS),  # PEFT's blocks of 32; 1e-3 to 3e-2 tried (from 2e-2 it diverges)
    "hra": dict(lr=6e-2, targets=ALL_PROJECTIONS),  # PEFT's r=8; 3e-3 to 1.2e-1 tried
    "ia3": dict(lr=2e-2),
    "road": dict(lr=1e-1, targets=ALL_PROJECTIONS),  # PEFT's road_1 in groups of 64; 5e-3 to 3e-1 tried
    "prompt": dict(lr=3e-2, num_virtual_tokens=20),  # PEFT's prompt-tuning examples use 3e-2
    "p_tuning": dict(lr=3e-3, num_virtual_tokens=20),  # its encoder's width the model's; 3e-4 to 3e-2 tried
    "prefix": dict(lr=1e-2, num_virtual_tokens=20),
    "llama_adapter": dict(lr=1e-2, adapter_len=10),  # the paper's 9e-3
    "bottleneck": dict(size=64),
    "classifier": dict(lr=1e-2),  # a linear head on the frozen base's last-token features
}
REPLAY = "+replay"  # `--replay` runs: a method's name and this
REPLAY_SHARE = 0.2  # ... fine-tune on a mixture: this share of the examples replays the base's own pre-training task
# The classifier has no summaries to score: it learns whether a summary belongs to its dialogue
# (each dialogue with its own summary and with another row's), on the base's frozen features.
CLASSIFIER = "classifier"
PAIR_PROMPT = "{dialogue}\nSummary: {summary}"


def lead(dialogue: str, sentences: int = 2) -> str:
    """The trivial extractive baseline: the dialogue's first sentences."""
    parts = re.split(r"(?<=[.!?])\s+|\n", dialogue.strip())
    return " ".join(parts[:sentences])


def write_jsonl(path: str, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def init_base(out_dir: str, tokenizer, p: dict, seed: int, family: str = "llama") -> str:
    """A randomly initialised Llama (or FLAN-T5-style T5) as an HF dir with the tokenizer, ready for the trainer."""
    from transformers import LlamaConfig, T5Config
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "t5":
        hf = T5Config(vocab_size=len(tokenizer), d_model=p["hidden"], d_kv=p["hidden"] // p["heads"], d_ff=p["mlp"],
                      num_layers=p["layers"], num_heads=p["heads"], feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id, n_positions=1024,
                      **ids).to_dict()
    else:
        hf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=p["hidden"], intermediate_size=p["mlp"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                         num_key_value_heads=p["heads"], max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, rms_norm_eps=1e-5, **ids).to_dict()
    model = build(ModelConfig.from_hf(hf))
    params = init_params(model, jax.random.key(seed))
    save_pretrained(out_dir, model, params)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def run_config(**sections) -> RunConfig:
    overrides = [f"{section}.{k}={json.dumps(v) if isinstance(v, list | dict) else v}"
                 for section, values in sections.items() if section != "out_dir" for k, v in values.items()]
    return load_config(None, overrides + [f"out_dir={sections['out_dir']}"])


def parse_methods(text: str, family: str = "llama") -> list[str]:
    """`--methods` as method names (`all`: every method the family takes), checked before any training."""
    from jpeft.models.t5 import T5
    from jpeft.peft import sites
    from jpeft.peft.registry import BY_NAME
    available = list(BY_NAME)
    names = [n.strip() for n in text.split(",") if n.strip()]
    every = sites.usable(T5.insertion_points) if family == "t5" else available
    names = every if names == ["all"] else list(dict.fromkeys(names))
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        problem = f"no such method for the demo: {', '.join(unknown)}" if unknown else "names no method"
        raise ConfigError(f"--methods {text!r}: {problem}; available: {', '.join(available)} (or all)")
    return names


def method_config(name: str, p: dict, base_dir: str, task: dict, seed: int, out_dir: str,
                  family: str = "llama") -> RunConfig:
    """One method's fine-tune: the preset's shared step budget, the method's own lr and options."""
    options = {"lr": DEFAULT_LR, **METHOD_PRESETS.get(name, {}), **p.get("methods", {}).get(name, {})}
    if family == "t5" and "targets" in options:
        options["targets"] = T5_PROJECTIONS
    lr = options.pop("lr")
    return run_config(model={"path": base_dir, "dtype": "auto"}, method={"name": name, **options}, data=task,
                      train={**p["finetune"], "lr": lr, "seed": seed, "log_every": 10}, out_dir=out_dir)


def summary_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Each dialogue with its own summary (label "match") and with another row's ("mismatch")."""
    order = np.random.RandomState(seed).permutation(len(rows))
    other = {int(i): rows[int(j)]["summary"] for i, j in zip(order, np.roll(order, 1))}
    return [pair for i, r in enumerate(rows) for pair in
            ({"dialogue": r["dialogue"], "summary": r["summary"], "label": "match"},
             {"dialogue": r["dialogue"], "summary": other[i], "label": "mismatch"})]


def with_replay(task: dict, base_task: dict) -> dict:
    """The summarization task mixed with the base's own pre-training task (REPLAY_SHARE of the examples),
    FLAN's multi-task cure for catastrophic forgetting."""
    own = {k: v for k, v in task.items() if k != "eval_limit"}
    return {"mixture": [{"name": "summarize", **own, "weight": 1 - REPLAY_SHARE},
                        {"name": "replay", **base_task, "weight": REPLAY_SHARE}], "eval_limit": 0}


def trained_params(run_dir: str, method: str, base_params):
    """A fine-tune's tree: full fine-tuning exports a whole model, every other method an adapter."""
    if method.removesuffix(REPLAY) == "full":
        return from_pretrained(os.path.join(run_dir, "model"))[1]
    return load_adapter(os.path.join(run_dir, "adapter"), base_params)


def reset_peak_rss() -> None:
    """Restart Linux's peak-RSS count, so each run's summary.json has its own peak, not the demo's so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peaks stay cumulative
        pass


def as_row(name: str, scores: dict) -> dict:
    """Demo scores as a `jpeft compare` row (its keys as a run's summary.json names them)."""
    keys = {"nll": "eval_loss", **{k: k for k in scores if k.startswith(KEY_PREFIX)}}
    return {"name": name, **{keys.get(k, f"eval_{k}"): v for k, v in scores.items()}}


def continuation_rows(rows: list[dict]) -> list[dict]:
    """A T5 base's pre-training task: each dialogue's second half from its first (a prefix LM)."""
    out = []
    for r in rows:
        lines = r["dialogue"].split("\n")
        half = max(len(lines) // 2, 1)
        out.append({"context": "\n".join(lines[:half]), "continuation": "\n".join(lines[half:]) or lines[-1]})
    return out


def dialogue_probe(rows: list[dict], family: str, path: str):
    """The base's own task on held-out rows, as a forgetting probe scored by perplexity: each dialogue as
    text (a decoder, pre-trained as an LM on dialogues), or its second half given its first (T5's prefix LM)."""
    if family == "t5":
        probe_rows = [{"prompt": r["context"], "target": r["continuation"]} for r in continuation_rows(rows)]
    else:
        probe_rows = [{"text": r["dialogue"]} for r in rows]
    return read_probe(write_jsonl(path, probe_rows) + ":perplexity")


def check_family(family: str, methods: list[str]) -> None:
    """Refuse, before any training, a family the demo lacks or a method it cannot apply."""
    from jpeft.models.t5 import T5
    from jpeft.peft import sites
    from jpeft.peft.registry import BY_NAME
    if family not in FAMILIES:
        raise ConfigError(f"--family {family!r}: the demo builds {' or '.join(FAMILIES)}")
    if family == "t5":
        for name in methods:
            sites.require(BY_NAME[name], T5.insertion_points, "t5")


def run_demo(out: str, data: str | None = None, preset: str = "default", seed: int = 0,
             methods: str = "full,lora", family: str = "llama", replay: bool = False) -> dict:
    """`methods`: comma-separated method names (or all), each fine-tuned into `out/<method>/`; `family`:
    llama (a decoder) or t5 (an encoder-decoder, FLAN-T5's architecture, pre-trained as a prefix LM);
    `replay`: each summarizing method also fine-tuned with replay, into `out/<method>+replay/`."""
    started = time.time()
    methods = parse_methods(methods, family)
    check_family(family, methods)
    p = PRESETS[preset]
    data = data or DIALOGSUM_SAMPLE
    if not os.path.exists(data):
        raise DataError(f"{data}: demo data not found; pass --data with a DialogSum-shaped JSONL "
                        "(fields dialogue, summary)")
    found = load_rows(data, "--data")
    check_columns(found, data, ["dialogue", "summary"])
    rows = found.to_list()[: p.get("rows")]
    if len(rows) <= 2 * p["held_out"]:  # the held-out rows, and at least as many to train on
        raise DataError(f"{data}: {len(rows)} rows; the {preset} demo holds out {p['held_out']} for scoring and "
                        f"needs more than {2 * p['held_out']} in all")
    train_rows, test_rows = rows[: -p["held_out"]], rows[-p["held_out"]:]
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    train_file, test_file = os.path.join(work, "train.jsonl"), os.path.join(work, "test.jsonl")
    base_dir = os.path.join(out, "base")
    task = {"train": train_file, "eval": test_file, "prompt": PROMPT, "target": "summary", "eval_limit": 0}
    pair_task = {"train": os.path.join(work, "pairs_train.jsonl"), "eval": os.path.join(work, "pairs_test.jsonl"),
                 "prompt": PAIR_PROMPT, "label": "label", "eval_limit": 0}
    base_data = {"train": train_file, "text": "dialogue"}  # the base's pre-training task
    if family == "t5":
        base_data = {"train": os.path.join(work, "continuations.jsonl"), "prompt": "{context}",
                     "target": "continuation"}
    configs = {name: method_config(name, p, base_dir, pair_task if name == CLASSIFIER else task, seed,
                                   os.path.join(out, name), family) for name in methods}
    if replay:
        configs.update({name + REPLAY: method_config(name, p, base_dir, with_replay(task, base_data), seed,
                                                     os.path.join(out, name + REPLAY), family)
                        for name in methods if name != CLASSIFIER})
    dialogues = [r["dialogue"] for r in train_rows]
    log.info("demo: %d training rows, %d held-out rows from %s", len(train_rows), len(test_rows), data)

    tokenizer = train_bpe_tokenizer(dialogues, p["vocab"], speaker_tags(dialogues))
    write_jsonl(train_file, train_rows)
    write_jsonl(test_file, test_rows)
    write_jsonl(pair_task["train"], summary_pairs(train_rows, seed))
    write_jsonl(pair_task["eval"], summary_pairs(test_rows, seed))
    write_jsonl(os.path.join(work, "continuations.jsonl"), continuation_rows(train_rows))
    init_dir = init_base(os.path.join(work, "init"), tokenizer, p, seed, family)

    stages = len(configs) + 1
    log.info("demo: 1/%d training the base %s on dialogues", stages, "T5 (prefix LM)" if family == "t5" else "LM")
    base_run = os.path.join(work, "base_run")
    train_stage(run_config(model={"path": init_dir, "dtype": "auto"}, method={"name": "full"}, data=base_data,
                           train={**p["base"], "seed": seed, "log_every": 10}, out_dir=base_run), "the base")
    if os.path.exists(base_dir):
        shutil.rmtree(base_dir)
    os.replace(os.path.join(base_run, "model"), base_dir)

    for stage, (name, cfg) in enumerate(configs.items(), 2):
        log.info("demo: %d/%d %s fine-tuning to %s", stage, stages, name,
                 "tell matching summaries from others" if name == CLASSIFIER else "summarize")
        reset_peak_rss()
        train_stage(cfg, name)

    model, base_params = from_pretrained(base_dir)
    tokenizer = load_tokenizer(base_dir)
    summarisers = [name for name in configs if name != CLASSIFIER]
    task_cfg = method_config("full", p, base_dir, task, seed, out)  # every summariser shares data and seq_len
    examples = prepare(task_cfg, test_file, tokenizer, model_cfg=model.config)
    eval_step = make_eval_step(model)
    probe = dialogue_probe(test_rows, family, os.path.join(work, "dialogues.jsonl"))
    base_perplexity = score(model, base_params, tokenizer, probe, batch_size=8)
    summary, outputs = {}, {}
    references = [[r["summary"]] for r in test_rows]
    for name in ("base", *summarisers):
        params = base_params if name == "base" else trained_params(os.path.join(out, name), name, base_params)
        outputs[name] = predict(model, params, tokenizer, test_rows, PROMPT, p["max_new_tokens"])
        scores = text_metrics(outputs[name], references)
        summary[name] = {k: scores[k] for k in METRICS}
        summary[name]["nll"] = mean_nll(eval_step, params, examples, 8)
        perplexity = base_perplexity if name == "base" else score(model, params, tokenizer, probe, batch_size=8)
        summary[name].update(record([probe], [base_perplexity], [perplexity]))
    write_jsonl(os.path.join(out, "predictions.jsonl"),
                [{"fname": r.get("fname"), "reference": r["summary"], **{k: v[i] for k, v in outputs.items()}}
                 for i, r in enumerate(test_rows)])
    lead_scores = text_metrics([lead(r["dialogue"]) for r in test_rows], references)
    summary["lead"] = {k: lead_scores[k] for k in METRICS}
    runs = {name: compare.read_run(os.path.join(out, name)) for name in configs}
    summary["trainable_params"] = {name: run["trainable_params"] for name, run in runs.items()}
    summary["total_params"] = T.count(base_params)
    # summaries that depend on the dialogue differ from row to row; a collapsed model repeats one
    summary["distinct_outputs"] = {name: len(set(texts)) for name, texts in outputs.items()}
    summary["seconds"] = round(time.time() - started, 1)
    summary["machine"] = {"cpu_flags": reported_flags(), "cpu_count": os.cpu_count(), "dtype": resolve_dtype("auto")}
    summary["family"] = family
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_losses(out, {"base (LM)": base_run, **{name: os.path.join(out, name) for name in summarisers}})
    scored = [as_row("lead", summary["lead"]), as_row("base", summary["base"]),
              *({**runs[name], **as_row(name, summary[name])} for name in summarisers),  # the demo's scores win
              # the classifier's own held-out accuracy and F1; its loss is per row, not the summaries' NLL
              *({k: v for k, v in runs[name].items() if k != "eval_loss"} for name in methods if name == CLASSIFIER)]
    table = compare.comparison(scored, baseline="base")
    compare.write_comparison(table, out)
    print(compare.format_markdown(table))
    print("distinct outputs of %d held-out rows: %s" % (len(test_rows), ", ".join(
        f"{name} {n}" for name, n in summary["distinct_outputs"].items())))
    machine = summary["machine"]
    print(f"total params {summary['total_params']:,d} · {summary['seconds']:.0f} s on {machine['cpu_count']} cores "
          f"(flags: {' '.join(machine['cpu_flags']) or 'none reported'}; compute dtype {machine['dtype']})")
    return summary


def train_stage(cfg: RunConfig, name: str) -> None:
    """One of the demo's trainings. A stop request it honoured (its checkpoint saved) ends the demo there:
    running the same command again resumes that training and goes on."""
    if stopped := train(cfg).get("stopped"):
        raise Stopped(stopped, f"stopped by {stopped} while training {name}, with its checkpoint saved; run the "
                               "same command again to resume from it")


def plot_losses(out: str, runs: dict[str, str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run_dir in runs.items():
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=label)
    ax.set_xlabel("step"), ax.set_ylabel("train loss (nats/token)"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=120)
    plt.close(fig)
