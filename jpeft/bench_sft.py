"""`jpeft bench --sft FILE`: supervised LoRA fine-tuning on a DialogSum-shaped file, jpeft against HF PEFT.

The raw step throughput of `jpeft bench` says little about a real fine-tune, where examples have
different lengths: HF PEFT's standard collator pads each batch to its longest example and runs the
LM head everywhere, jpeft packs several examples into a row (`tokenize_supervised(pack=True)`) and
runs the head only on loss positions (`with_loss_index`). This bench trains both on the same data:

- The parent (neither jax nor torch) trains one byte-level BPE tokenizer on the training rows and
  tokenizes them with it, by one truncation rule, into the packed rows for jpeft and one padded
  row per example for HF PEFT: the same token ids and loss positions, written to files the
  workers read (the test checks both see the same target tokens). The last `held_out`
  rows are held out on both sides.
- A torch process writes one random Llama checkpoint (jpeft.bench_torch's model) that both load.
- Each side trains in its own process under the same malloc settings as `jpeft bench`, on `batch`
  examples a step: HF PEFT as `batch` padded rows, jpeft as the packed rows that hold that many
  examples on average (`packed_rows_per_step`): an optimizer step sees about the same examples on
  both sides, so their held-out losses after a step compare (from random weights the loss is
  limited by steps, not by examples a step). LoRA on the same targets, AdamW at the same constant
  lr and weight decay with grads clipped at 1.0, the same number of steps (not the same wall-clock
  budget, so a run repeats whatever the machine's noise).
- Held-out loss (mean NLL over target tokens) is taken before training and at `EVALS` evenly
  spaced steps, off the training clock. Time to loss: the worse of the two final held-out losses,
  and each side's training-clock seconds (its first, compiling, step included: a user waits for
  it) at the first eval point at or below it.
- Target tok/s: loss tokens trained per second of step time, after the first `warmup` steps.

`seq` is the length of a packed row and the longest example (longer ones lose prompt tokens from
the left): with this tokenizer DialogSum examples run ~190 tokens (median), 340 at the 90th
percentile, so 512 truncates ~1% of rows and packs ~2.4 examples a row, where 256 truncates ~25%.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from jpeft import allocator
from jpeft.bench import _environ
from jpeft.data import Examples, batches, check_columns, load_rows, tokenize_supervised
from jpeft.errors import ConfigError, DataError, JpeftError
from jpeft.hardware import reported_flags
from jpeft.jax_env import matmul_precision, worker_env
from jpeft.roofline import torch_device

PROMPT, TARGET = "{dialogue}\nSummary: ", "{summary}"  # the demo's template
HELD_OUT = 50  # last rows of the file, evaluated by both sides
EVALS = 8  # held-out evaluations after the one before training
LR, WEIGHT_DECAY = 1e-3, 0.01  # constant lr; torch.optim.AdamW's default weight decay
SIDES = (("jpeft", "jpeft"), ("hf_peft", "hf-peft"))  # (JSON key prefix, table name)


def _rows(path: str, held_out: int) -> tuple[list, list]:
    """(training rows, held-out rows) of a DialogSum-shaped file, or a DataError saying what is wrong."""
    if not os.path.isfile(path):
        raise DataError(f"bench --sft: '{path}' not found; pass a DialogSum-shaped JSONL file "
                        "(fields dialogue, summary)")
    rows = load_rows(path)
    check_columns(rows, path, ["dialogue", "summary"])
    rows = rows.to_list()
    if len(rows) <= held_out:
        raise DataError(f"bench --sft: '{path}' has {len(rows)} rows; the last {held_out} are held out for "
                        "evaluation, so it needs more to train on")
    return rows[:-held_out], rows[-held_out:]


def _tokenize(path: str, train_rows: list, test_rows: list, vocab: int, seq: int, batch: int) -> dict:
    """{"jpeft": packed training rows with loss_index, "hf_peft": one padded row per training example,
    "held_out": one per held-out example, "tokenizer_size": ...}, all from one tokenizer and one
    truncation, so both sides train on the same target tokens."""
    from jpeft.data.bpe import speaker_tags, train_bpe_tokenizer

    texts = [r["dialogue"] + "\n" + r["summary"] for r in train_rows]
    try:
        tokenizer = train_bpe_tokenizer(texts, vocab, speaker_tags(texts))
    except ConfigError as e:
        raise ConfigError(f"bench --sft: the tokenizer must fit the model's --vocab {vocab}: {e}") from None
    if len(train_rows) < batch:
        raise DataError(f"bench --sft: '{path}' has {len(train_rows)} training rows, fewer than --batch {batch} "
                        "(examples a step); add rows or lower --batch")
    packed = tokenize_supervised(train_rows, tokenizer, PROMPT, TARGET, seq, pack=True).with_loss_index()
    return {"jpeft": packed, "hf_peft": tokenize_supervised(train_rows, tokenizer, PROMPT, TARGET, seq, report=False),
            "held_out": tokenize_supervised(test_rows, tokenizer, PROMPT, TARGET, seq),
            "tokenizer_size": len(tokenizer)}


def packed_rows_per_step(packed: Examples, examples: int) -> int:
    """The packed rows that hold `examples` examples on average (at least one)."""
    return max(1, round(examples / packed.examples_per_row().mean()))


def load_examples(path: str) -> Examples:
    return Examples(**dict(np.load(path)))


def eval_steps(steps: int) -> set[int]:
    return {round(i * steps / EVALS) for i in range(1, EVALS + 1)} - {0}


def train_loop(a: dict, data, train, held_out_loss) -> dict:
    """Train a["steps"] steps, timing `train(batch)` (which returns once the step is done) and
    evaluating `held_out_loss()` off the clock. `data` yields (batch, (target tokens, real tokens,
    token slots, examples)); the batch is placed where the step reads it before the clock starts."""
    evals = [{"step": 0, "train_s": 0.0, "loss": held_out_loss()}]
    times, counts = [], []
    at = eval_steps(a["steps"])
    for step in range(1, a["steps"] + 1):
        batch, count = next(data)
        t0 = time.perf_counter()
        train(batch)
        times.append(time.perf_counter() - t0)
        counts.append([float(c) for c in count])
        if step in at:
            evals.append({"step": step, "train_s": sum(times), "loss": held_out_loss()})
    targets, real, slots, examples = np.sum(counts, axis=0)
    timed = slice(a["warmup"], None)
    return {"target_tok_s": sum(c[0] for c in counts[timed]) / sum(times[timed]), "step_s": times,
            "first_step_s": times[0], "train_s": sum(times), "evals": evals, "final_loss": evals[-1]["loss"],
            "target_tokens_trained": int(targets), "padding_fraction": 1 - real / slots,
            "examples_per_step": examples / a["steps"], "token_slots_per_step": slots / a["steps"]}


def _train_jpeft(a: dict) -> dict:
    """The jpeft side: its jitted train step on packed rows, the LM head on loss positions only."""
    import jax
    import jax.numpy as jnp

    from jpeft import tree as T
    from jpeft.models.hf import from_pretrained
    from jpeft.peft import LoRA
    from jpeft.train.optimizer import adamw
    from jpeft.train.step import init_state, make_eval_step, make_train_step
    from jpeft.train.trainer import mean_nll

    model, params = from_pretrained(a["checkpoint"], a["dtype"])  # bfloat16: the frozen base in bf16
    method = LoRA(a["rank"], a["alpha"], a["targets"])
    params = method.init(jax.random.key(a["seed"] + 1), params)
    trainable, frozen = T.partition(params, method.mask(params))
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
    optimizer = adamw(a["lr"], a["steps"], warmup=0, weight_decay=a["weight_decay"], min_lr_ratio=1.0)
    state = {"now": init_state(trainable, optimizer)}
    step, eval_step = make_train_step(model, optimizer, a["seed"], dropout=False), make_eval_step(model)
    rows, held_out = load_examples(a["jpeft"]), load_examples(a["held_out"])
    rows_per_step = packed_rows_per_step(rows, a["batch"])

    def data():
        for batch in batches(rows, rows_per_step, a["seed"]):
            count = (batch["loss_mask"].sum(), (batch["attention_mask"] > 0).sum(), batch["attention_mask"].size,
                     batch["attention_mask"].max(axis=1).sum())  # segment ids count each row's examples
            yield jax.device_put({k: v[None] for k, v in batch.items()}), count  # [grad_accum=1, batch, T]

    def train(batch):
        state["now"], metrics = step(state["now"], frozen, batch)
        jax.block_until_ready((state["now"], metrics))

    out = train_loop(a, data(), train,
                     lambda: mean_nll(eval_step, T.combine(state["now"]["trainable"], frozen), held_out, a["batch"]))
    # the loss positions the head really sees: the mask gathered at loss_index, over one epoch's rows
    seen = np.take_along_axis(rows.loss_mask, rows.loss_index, axis=1).sum()
    return {**out, "target_tokens_per_epoch": int(seen), "rows_per_epoch": len(rows),
            "rows_per_step": rows_per_step, "examples_per_epoch": int(rows.examples_per_row().sum()),
            "jax": jax.__version__, "platform": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def _run(module: str, a: dict, what: str, timeout: float) -> dict:
    """Run `python -m module --worker JSON` in a fresh interpreter; its last stdout line is the result."""
    env = worker_env()
    try:
        proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(a)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise JpeftError(f"bench --sft: {what} ran past {timeout:.0f}s; lower --steps/--seq") from None
    tail = proc.stderr.strip()[-2000:]
    if proc.returncode != 0:
        hint = "; it needs torch and peft: pip install torch peft" if "No module named" in tail else ""
        raise JpeftError(f"bench --sft: {what} ({module}) failed{hint}:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sft_bench(path: str, vocab: int = 32000, hidden: int = 512, layers: int = 8, heads: int = 8,
                  kv_heads: int = 8, mlp: int = 1408, batch: int = 8, seq: int = 512, rank: int = 8,
                  alpha: float = 16, targets=("q_proj", "v_proj"), steps: int = 100, warmup: int = 2,
                  dtype: str = "float32", held_out: int = HELD_OUT, tune_malloc: bool = True, seed: int = 0,
                  timeout: float = 1800) -> dict:
    """{"sft": {jpeft_target_tok_s, hf_peft_target_tok_s, ratio, target_loss, jpeft_s_to_loss,
    hf_peft_s_to_loss, time_to_loss_ratio, jpeft: {...}, hf_peft: {...}}, "settings": {...}}; ratio is
    jpeft / hf-peft target tok/s, time_to_loss_ratio hf-peft / jpeft seconds to target_loss."""
    if dtype not in ("float32", "bfloat16"):
        raise JpeftError(f"bench --sft: --dtype {dtype!r} is not supported; use float32 or bfloat16")
    if steps <= warmup:
        raise JpeftError(f"bench --sft: --steps {steps} must exceed --warmup {warmup} (steps left out of tok/s)")
    train_rows, test_rows = _rows(path, held_out)
    data = _tokenize(path, train_rows, test_rows, vocab, seq, batch)
    a = {"vocab": vocab, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "mlp": mlp,
         "batch": batch, "seq": seq, "rank": rank, "alpha": alpha, "targets": list(targets), "steps": steps,
         "warmup": warmup, "dtype": dtype, "lr": LR, "weight_decay": WEIGHT_DECAY, "seed": seed}
    env = allocator.tuned(os.environ) if tune_malloc else {}
    with tempfile.TemporaryDirectory(prefix="jpeft-bench-sft-") as tmp, _environ(env):
        for name in ("jpeft", "hf_peft", "held_out"):
            a[name] = os.path.join(tmp, f"{name}.npz")
            np.savez(a[name], **data[name].arrays())
        a["checkpoint"] = os.path.join(tmp, "checkpoint")
        _run("jpeft.bench_sft_torch", {**a, "mode": "checkpoint"}, "writing the random checkpoint", timeout)
        jp = _run("jpeft.bench_sft", a, "the jpeft side", timeout)
        a["device"] = torch_device(jp["platform"])  # HF PEFT trains on jax's kind of chip
        sides = {"jpeft": jp, "hf_peft": _run("jpeft.bench_sft_torch", {**a, "mode": "train"}, "the hf-peft side",
                                              timeout)}
    target = max(s["final_loss"] for s in sides.values())
    reached = {k: next(e["train_s"] for e in s["evals"] if e["loss"] <= target) for k, s in sides.items()}
    jp, hf = sides["jpeft"], sides["hf_peft"]
    sft = {"jpeft_target_tok_s": jp["target_tok_s"], "hf_peft_target_tok_s": hf["target_tok_s"],
           "ratio": jp["target_tok_s"] / hf["target_tok_s"], "target_loss": target,
           "jpeft_s_to_loss": reached["jpeft"], "hf_peft_s_to_loss": reached["hf_peft"],
           "time_to_loss_ratio": reached["hf_peft"] / reached["jpeft"] if reached["jpeft"] else None, **sides}
    settings = {**{k: v for k, v in a.items() if k not in ("jpeft", "hf_peft", "held_out", "checkpoint")},
                "data": path, "train_rows": len(train_rows), "held_out_rows": len(test_rows),
                "tokenizer_size": data["tokenizer_size"], "prompt": PROMPT, "target": TARGET, "grad_clip": 1.0,
                "evals": EVALS, "malloc_env": env, "cpu_flags": reported_flags(), "cpu_count": os.cpu_count(),
                "matmul_precision": matmul_precision(),
                "machine": platform.machine(), "jax": jp["jax"], "devices": jp["devices"], "torch": hf["torch"],
                "torch_device": a["device"], "torch_threads": hf["threads"]}
    return {"sft": sft, "settings": settings}


def format_sft_table(result: dict) -> str:
    """One line per side, the ratios, then the settings behind them."""
    r, s = result["sft"], result["settings"]
    reach = f"s to {r['target_loss']:.3f}"
    lines = [f"{'side':<9}{'target tok/s':>14}{'examples/step':>15}{'padding':>9}{'first step s':>14}"
             f"{'held-out loss':>22}{reach:>12}"]
    for key, name in SIDES:
        side = r[key]
        loss = f"{side['evals'][0]['loss']:.3f} → {side['final_loss']:.3f}"
        lines.append(f"{name:<9}{side['target_tok_s']:>14.1f}{side['examples_per_step']:>15.1f}"
                     f"{100 * side['padding_fraction']:>8.1f}%{side['first_step_s']:>14.1f}{loss:>22}"
                     f"{r[f'{key}_s_to_loss']:>12.1f}")
    speedup = "n/a" if r["time_to_loss_ratio"] is None else f"{r['time_to_loss_ratio']:.2f}x"
    malloc = " ".join(f"{k}={v}" for k, v in s["malloc_env"].items()) or "default glibc malloc"
    jp = r["jpeft"]
    lines += [
        f"jpeft/hf-peft target tok/s {r['ratio']:.2f}x; hf-peft/jpeft seconds to held-out loss "
        f"{r['target_loss']:.3f} (the worse final loss, first reached at an eval point) {speedup}",
        f"data: {s['data']}, {s['train_rows']} training rows ({jp['target_tokens_per_epoch']:,d} target tokens an "
        f"epoch on both sides; jpeft packs them into {jp['rows_per_epoch']} rows of {s['seq']}), last "
        f"{s['held_out_rows']} held out; BPE tokenizer of {s['tokenizer_size']} tokens",
        f"model: vocab {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads "
        f"({s['kv_heads']} kv), mlp {s['mlp']}, dtype {s['dtype']}; LoRA r={s['rank']} alpha={s['alpha']} on "
        f"{', '.join(s['targets'])}; {s['batch']} examples a step (jpeft: {jp['rows_per_step']} packed rows), "
        f"{s['steps']} steps, AdamW lr {s['lr']} constant, weight decay {s['weight_decay']}, grads clipped at "
        f"{s['grad_clip']}",
        f"target tok/s: loss tokens over step time after {s['warmup']} warm-up steps; seconds: training steps "
        f"only (first step and jpeft's compile included), held-out loss at step 0 and {len(jp['evals']) - 1} "
        "points off the clock",
        f"each side in its own process under: {malloc}; jax {s['jax']} on {s['devices']}; torch {s['torch']} "
        f"on {s['torch_device']}, {s['torch_threads']} threads; {s['machine']}, {s['cpu_count']} cores, flags "
        f"{' '.join(s['cpu_flags']) or 'none'}",
    ]
    if s["dtype"] == "bfloat16":
        lines.append("bf16: jpeft keeps the frozen base in bf16 (LoRA float32); hf-peft a bf16 base with float32 "
                     "LoRA weights under torch.autocast('cpu', bfloat16)")
    return "\n".join(lines)


def main(args) -> None:
    """`jpeft bench --sft FILE` with the bench's size, step and malloc options."""
    if args.load or args.method:
        raise JpeftError("bench: --sft trains on a file against HF PEFT; drop --load/--method")
    result = run_sft_bench(args.sft, vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                           kv_heads=args.kv_heads, mlp=args.mlp, batch=args.batch, seq=args.seq, rank=args.rank,
                           steps=args.steps, warmup=args.warmup, dtype=args.dtype, tune_malloc=args.tune_malloc)
    print(json.dumps(result) if args.json else format_sft_table(result))


if __name__ == "__main__":
    print(json.dumps(_train_jpeft(json.loads(sys.argv[sys.argv.index("--worker") + 1]))))
