"""`jpeft demo`: the whole stack, offline, on DialogSum, in minutes on a laptop CPU.

No pretrained weights can be downloaded, so the demo builds its base honestly: a
byte-level BPE tokenizer and a small Llama trained (through the same trainer) on the
dialogues of the training rows. It then fine-tunes that base to summarize, once fully
and once with LoRA, and scores base, full and LoRA on rows none of them ever saw:
teacher-forced NLL of the reference summaries and ROUGE/BLEU of greedy summaries,
beside a lead baseline (the dialogue's opening) for scale.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

import jax

from jpeft import tree as T
from jpeft.config import RunConfig, load_config
from jpeft.data import DIALOGSUM_SAMPLE, load_rows
from jpeft.data.bpe import speaker_tags, train_bpe_tokenizer
from jpeft.errors import DataError
from jpeft.evaluate import predict, text_metrics
from jpeft.models.config import ModelConfig
from jpeft.models.hf import build, from_pretrained, save_pretrained
from jpeft.models.llama import init_params
from jpeft.peft import count_parameters
from jpeft.peft.hf_format import load_adapter
from jpeft.train.step import make_eval_step
from jpeft.train.trainer import load_tokenizer, mean_nll, prepare, train

log = logging.getLogger("jpeft.demo")
PROMPT = "{dialogue}\nSummary: "
PRESETS = {
    "default": dict(vocab=4096, hidden=256, layers=4, heads=4, mlp=704, held_out=50, max_new_tokens=60,
                    base=dict(steps=220, batch_size=16, seq_len=256, lr=1e-3, warmup=20),
                    full=dict(steps=180, batch_size=8, seq_len=256, lr=1e-3, warmup=10),
                    lora=dict(steps=180, batch_size=8, seq_len=256, lr=5e-3, warmup=10, rank=16)),
    "tiny": dict(vocab=400, hidden=32, layers=2, heads=2, mlp=64, held_out=4, max_new_tokens=8, rows=40,
                 base=dict(steps=4, batch_size=4, seq_len=64, lr=3e-3, warmup=1),
                 full=dict(steps=3, batch_size=4, seq_len=96, lr=1e-3, warmup=1),
                 lora=dict(steps=3, batch_size=4, seq_len=96, lr=3e-3, warmup=1, rank=4)),
}
LORA_TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def lead(dialogue: str, sentences: int = 2) -> str:
    """The trivial extractive baseline: the dialogue's first sentences."""
    parts = re.split(r"(?<=[.!?])\s+|\n", dialogue.strip())
    return " ".join(parts[:sentences])


def write_jsonl(path: str, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def init_base(out_dir: str, tokenizer, p: dict, seed: int) -> str:
    """A randomly initialised Llama as an HF dir (with the tokenizer), ready for the trainer."""
    from transformers import LlamaConfig
    hf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=p["hidden"], intermediate_size=p["mlp"],
                     num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                     num_key_value_heads=p["heads"], max_position_embeddings=1024, tie_word_embeddings=True,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5).to_dict()
    model = build(ModelConfig.from_hf(hf))
    params = init_params(model, jax.random.key(seed))
    save_pretrained(out_dir, model, params)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def run_config(**sections) -> RunConfig:
    overrides = [f"{section}.{k}={v}" for section, values in sections.items() if section != "out_dir"
                 for k, v in values.items()]
    return load_config(None, overrides + [f"out_dir={sections['out_dir']}"])


def run_demo(out: str, data: str | None = None, preset: str = "default", seed: int = 0) -> dict:
    started = time.time()
    p = PRESETS[preset]
    data = data or DIALOGSUM_SAMPLE
    if not os.path.exists(data):
        raise DataError(f"{data}: demo data not found; pass --data with a DialogSum-shaped JSONL "
                        "(fields dialogue, summary)")
    rows = load_rows(data).to_list()[: p.get("rows")]
    train_rows, test_rows = rows[: -p["held_out"]], rows[-p["held_out"]:]
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    dialogues = [r["dialogue"] for r in train_rows]
    log.info("demo: %d training rows, %d held-out rows from %s", len(train_rows), len(test_rows), data)

    tokenizer = train_bpe_tokenizer(dialogues, p["vocab"], speaker_tags(dialogues))
    train_file = write_jsonl(os.path.join(work, "train.jsonl"), train_rows)
    test_file = write_jsonl(os.path.join(work, "test.jsonl"), test_rows)
    init_dir = init_base(os.path.join(work, "init"), tokenizer, p, seed)

    log.info("demo: 1/3 training the base language model on dialogues")
    base_run = os.path.join(work, "base_run")
    train(run_config(model={"path": init_dir, "dtype": "bfloat16"}, method={"name": "full"},
                     data={"train": train_file, "text": "dialogue"}, train={**p["base"], "seed": seed,
                                                                           "log_every": 10},
                     out_dir=base_run))
    base_dir = os.path.join(out, "base")
    if os.path.exists(base_dir):
        shutil.rmtree(base_dir)
    os.replace(os.path.join(base_run, "model"), base_dir)

    task = {"train": train_file, "eval": test_file, "prompt": PROMPT, "target": "summary", "eval_limit": 0}
    log.info("demo: 2/3 full fine-tuning to summarize")
    full_cfg = run_config(model={"path": base_dir, "dtype": "bfloat16"}, method={"name": "full"}, data=task,
                          train={**p["full"], "seed": seed, "log_every": 10}, out_dir=os.path.join(out, "full"))
    train(full_cfg)
    log.info("demo: 3/3 LoRA fine-tuning to summarize")
    lora_p = dict(p["lora"])
    rank = lora_p.pop("rank")
    lora_cfg = run_config(model={"path": base_dir, "dtype": "bfloat16"},
                          method={"name": "lora", "rank": rank, "alpha": 2 * rank, "targets": LORA_TARGETS},
                          data=task, train={**lora_p, "seed": seed, "log_every": 10},
                          out_dir=os.path.join(out, "lora"))
    train(lora_cfg)

    model, base_params = from_pretrained(base_dir)
    _, full_params = from_pretrained(os.path.join(out, "full", "model"))
    lora_params = load_adapter(os.path.join(out, "lora", "adapter"), base_params)
    tokenizer = load_tokenizer(base_dir)
    examples = prepare(full_cfg, test_file, tokenizer)
    eval_step = make_eval_step(model)
    summary, outputs = {}, {}
    references = [[r["summary"]] for r in test_rows]
    for name, params in (("base", base_params), ("full", full_params), ("lora", lora_params)):
        outputs[name] = predict(model, params, tokenizer, test_rows, PROMPT, p["max_new_tokens"])
        scores = text_metrics(outputs[name], references)
        summary[name] = {k: scores[k] for k in ("rouge1", "rouge2", "rougeL", "bleu")}
        summary[name]["nll"] = mean_nll(eval_step, params, examples, 8)
    write_jsonl(os.path.join(out, "predictions.jsonl"),
                [{"fname": r.get("fname"), "reference": r["summary"], **{k: v[i] for k, v in outputs.items()}}
                 for i, r in enumerate(test_rows)])
    lead_scores = text_metrics([lead(r["dialogue"]) for r in test_rows], references)
    summary["lead"] = {k: lead_scores[k] for k in ("rouge1", "rouge2", "rougeL", "bleu")}
    summary["trainable_params"] = {"full": T.count(base_params),
                                   "lora": count_parameters(lora_params)[0]}
    summary["total_params"] = T.count(base_params)
    summary["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_losses(out, {"base (LM)": base_run, "full": os.path.join(out, "full"), "lora": os.path.join(out, "lora")})
    print(format_table(summary))
    return summary


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


def format_table(s: dict) -> str:
    rows = [("method", "trainable", "NLL", "ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU")]
    for name in ("lead", "base", "full", "lora"):
        m = s[name]
        trainable = {"base": "-", "lead": "-"}.get(name) or f"{s['trainable_params'][name]:,d}"
        nll = f"{m['nll']:.3f}" if "nll" in m else "-"
        rows.append((name, trainable, nll, *(f"{m[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL")),
                     f"{m['bleu']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:],
                      f"total params {s['total_params']:,d} · {s['seconds']:.0f} s"])
