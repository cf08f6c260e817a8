"""`jpeft bench`: train-step throughput and memory of a random Llama, optionally against HF PEFT.

Each jpeft mode runs in a fresh interpreter (``python -m jpeft.bench --worker JSON``), as
each HF PEFT mode does (jpeft/bench_torch.py), so every ``peak_rss_mb`` is one process's
own ``ru_maxrss`` and both sides run under the same environment. On CPU that environment
matters: by default glibc malloc returns ~2 GB to the OS and re-faults it every step, so
unless ``tune_malloc=False`` both sides run with `MALLOC_ENV`, which keeps memory
(docs/design.md §8), and the result reports the settings used.

``--load`` measures loading instead (jpeft/bench_load.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from jpeft.bench_torch import run_hf_peft
from jpeft.errors import JpeftError

MODES = ("lora", "full", "qlora")
# Dense bf16 peak TFLOP/s per chip, by device_kind substring: the denominator of MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0,
               "TPU v6 lite": 918.0, "TPU v4": 275.0}
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
              "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(256 * 2**20)}


def _model(a: dict):
    """The random Llama that bench_torch builds, as a jpeft module and float32 tree."""
    import jax

    from jpeft.models.config import ModelConfig
    from jpeft.models.llama import CausalLM, init_params

    cfg = ModelConfig(
        model_type="llama", vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["mlp"],
        num_layers=a["layers"], num_heads=a["heads"], num_kv_heads=a["kv_heads"],
        head_dim=a["hidden"] // a["heads"], max_position_embeddings=max(2048, a["seq"]),
        dtype=a["dtype"], remat=a["remat"])
    model = CausalLM(cfg)
    return model, init_params(model, jax.random.key(a["seed"]))


def _measure(a: dict, mode: str) -> dict:
    """Time one full jitted train step (forward, loss, backward, clip + AdamW) per timed step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jpeft import tree as T
    from jpeft.peft import Full, LoRA, QLoRA, count_parameters
    from jpeft.train.flops import train_step_flops
    from jpeft.train.optimizer import adamw
    from jpeft.train.step import init_state, make_train_step

    model, params = _model(a)
    method = {"lora": lambda: LoRA(a["rank"], a["alpha"], a["targets"]), "full": Full,
              "qlora": lambda: QLoRA(a["rank"], a["alpha"], a["targets"], quant="nf4")}[mode]()
    params = method.init(jax.random.key(a["seed"] + 1), params)
    trainable, frozen = T.partition(params, method.mask(params))
    if a["dtype"] == "bfloat16" or mode == "qlora":  # frozen floats in bf16; trainable leaves stay float32
        frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                              frozen)
    # torch.optim.AdamW's default weight decay; jpeft's adamw also clips, as a trainer would.
    optimizer = adamw(1e-4, a["warmup"] + a["steps"], warmup=0, weight_decay=0.01, min_lr_ratio=1.0)
    state = init_state(trainable, optimizer)
    step = make_train_step(model, optimizer, a["seed"], dropout=False)
    ids = np.random.default_rng(a["seed"]).integers(0, a["vocab"], (1, a["batch"], a["seq"]), dtype=np.int32)
    mask = np.ones(ids.shape, np.float32)
    mask[..., -1] = 0  # next-token loss over seq - 1 positions, as HF's labels=input_ids
    batch = {"input_ids": ids, "labels": np.roll(ids, -1, axis=-1), "loss_mask": mask,
             "attention_mask": np.ones(ids.shape, np.int32)}
    batch = jax.device_put(batch)

    times = []
    for i in range(max(a["warmup"], 1) + a["steps"]):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = times[max(a["warmup"], 1):]
    tokens = a["batch"] * a["seq"]
    tflops = train_step_flops(model.config, params, method.mask(params), tokens, a["seq"]) / 1e12
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in jax.devices()[0].device_kind), None)
    return {
        "tok_s": statistics.median(tokens / s for s in step_s),
        "model_tflop_per_step": tflops,
        "mfu": tflops / statistics.median(step_s) / peak if peak else None,
        "step_s": step_s,
        "compile_s": times[0],
        "loss": float(metrics["loss"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "frozen_mb": sum(x.nbytes for x in jax.tree.leaves(frozen)) / 2**20,
        "trainable_params": count_parameters(params, method.mask(params))[0],
        "total_params": count_parameters(params, method.mask(params))[1],
    }


@contextlib.contextmanager
def _environ(overrides: dict):
    """Set env vars for the subprocesses started inside (run_hf_peft reads os.environ)."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_worker(a: dict, mode: str, timeout: float) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "jpeft.bench", "--worker", json.dumps({**a, "mode": mode})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise JpeftError(f"jpeft benchmark ({mode}) ran past {timeout:.0f}s; "
                         "lower --steps/--seq or raise the timeout") from None
    if proc.returncode != 0:
        raise JpeftError(f"jpeft benchmark ({mode}) failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(vocab: int = 32000, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 8,
              mlp: int = 1408, batch: int = 8, seq: int = 256, rank: int = 8, alpha: float = 16,
              targets=("q_proj", "v_proj"), steps: int = 5, warmup: int = 2, modes=("lora", "full"),
              dtype: str = "float32", remat: str = "none", against: str | None = None,
              tune_malloc: bool = True, seed: int = 0, timeout: float = 1800) -> dict:
    """{mode: {jpeft_tok_s, compile_s, peak_rss_mb, ... [hf_peft_tok_s, ratio]}, "settings": {...}}."""
    if against not in (None, "hf-peft"):
        raise JpeftError(f"bench: --against {against!r} is not supported; use 'hf-peft'")
    if dtype not in ("float32", "bfloat16"):
        raise JpeftError(f"bench: dtype {dtype!r} is not supported; use float32 or bfloat16")
    if remat not in ("none", "full", "dots"):
        raise JpeftError(f"bench: remat {remat!r} is not supported; use none, full or dots")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise JpeftError(f"bench: unknown modes {sorted(unknown)}; use {', '.join(MODES)}")
    a = {"vocab": vocab, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
         "mlp": mlp, "batch": batch, "seq": seq, "rank": rank, "alpha": alpha, "targets": list(targets),
         "steps": steps, "warmup": warmup, "dtype": dtype, "remat": remat, "seed": seed}
    hf_args = {"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
               "num_kv_heads": kv_heads, "intermediate_size": mlp, "batch": batch, "seq": seq, "rank": rank,
               "alpha": alpha, "targets": list(targets), "steps": steps, "warmup": warmup, "seed": seed}
    env = MALLOC_ENV if tune_malloc else {}
    result, settings = {}, {**a, "against": against, "malloc_env": env, "cpu_count": os.cpu_count(),
                            "machine": platform.machine(), "process_per_mode": True}
    # Each jpeft mode runs right next to its HF PEFT twin, so load from elsewhere drifts less between them.
    with _environ(env):
        for mode in modes:
            r = _run_worker(a, mode, timeout)
            settings.update(jax=r.pop("jax"), devices=r.pop("devices"))
            out = result[mode] = {"jpeft_tok_s": r.pop("tok_s"), **r}
            if against == "hf-peft" and mode != "qlora":
                hf = run_hf_peft({**hf_args, "modes": [mode]}, timeout=timeout)
                h = hf[mode]
                out.update(hf_peft_tok_s=h["tok_s"], ratio=out["jpeft_tok_s"] / h["tok_s"],
                           hf_peft_step_s=h["step_s"], hf_peft_peak_rss_mb=h["peak_rss_mb"],
                           hf_peft_trainable_params=h["trainable_params"],
                           hf_peft_total_params=h["total_params"])
                settings.update(torch=hf["torch"], torch_threads=hf["threads"], hf_peft_dtype="float32")
    result["settings"] = settings
    return result


def format_table(result: dict) -> str:
    """A few human-readable lines: one row per mode, then the settings that shaped them."""
    hf = any("hf_peft_tok_s" in r for k, r in result.items() if k != "settings")
    head = (f"{'mode':<6}{'jpeft tok/s':>13}{'TFLOP/s':>9}{'MFU':>7}{'compile s':>11}{'peak RSS MB':>13}"
            f"{'frozen MB':>11}{'trainable':>13}{'total':>13}")
    tokens = result["settings"]["batch"] * result["settings"]["seq"]
    if hf:
        head += f"{'hf-peft tok/s':>15}{'ratio':>8}{'hf RSS MB':>11}"
    lines = [head]
    for mode, r in result.items():
        if mode == "settings":
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        line = (f"{mode:<6}{r['jpeft_tok_s']:>13.1f}{r['model_tflop_per_step'] * r['jpeft_tok_s'] / tokens:>9.3f}"
                f"{mfu:>7}{r['compile_s']:>11.1f}{r['peak_rss_mb']:>13.0f}"
                f"{r['frozen_mb']:>11.1f}{r['trainable_params']:>13,d}{r['total_params']:>13,d}")
        if "hf_peft_tok_s" in r:
            line += f"{r['hf_peft_tok_s']:>15.1f}{r['ratio']:>7.2f}x{r['hf_peft_peak_rss_mb']:>11.0f}"
        lines.append(line)
    s = result["settings"]
    malloc = " ".join(f"{k}={v}" for k, v in s["malloc_env"].items()) or "default glibc malloc"
    lines.append(f"model: vocab {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers, "
                 f"batch {s['batch']}x{s['seq']}, dtype {s['dtype']}, remat {s['remat']}; median of {s['steps']} steps after {s['warmup']} warm-up")
    lines.append(f"each mode in its own process, both sides under: {malloc}; devices {s['devices']}")
    lines.append("TFLOP/s: model FLOPs the step really does (jpeft/train/flops.py: no weight gradients for frozen "
                 "weights, no remat recomputation); MFU against the device's dense bf16 peak, where known")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """Options of `jpeft bench`; `main(args)` runs them."""
    parser.add_argument("--against", choices=["hf-peft"], default=None,
                        help="also run the same model, batch, optimizer and LoRA through HF PEFT (PyTorch)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--load", action="store_true",
                        help="instead of train steps: peak host RSS of loading a random HF checkpoint onto "
                             "8 fake CPU devices (mesh.fsdp=8), whole then sharded vs "
                             "sharded from birth; uses the model sizes, --dtype and malloc options")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["lora", "full"])
    parser.add_argument("--method", choices=["qlora"], default=None,
                        help="qlora: NF4-base QLoRA beside LoRA on a bf16 base (memory and speed); sets --modes")
    for name, default in (("steps", 5), ("warmup", 2), ("batch", 8), ("seq", 256), ("hidden", 512),
                          ("layers", 8), ("heads", 8), ("kv-heads", 8), ("mlp", 1408), ("vocab", 32000),
                          ("rank", 8)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="frozen base and matmul dtype (trainable leaves stay float32)")
    parser.add_argument("--remat", choices=["none", "full", "dots"], default="none")
    parser.add_argument("--no-tune-malloc", dest="tune_malloc", action="store_false",
                        help="run both sides under the caller's glibc malloc settings")


def main(args) -> None:
    if args.load:
        from jpeft.bench_load import format_load_table, run_load_bench
        if args.against or args.method:
            raise JpeftError("bench: --load measures loading only; drop --against/--method")
        result = run_load_bench(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                kv_heads=args.kv_heads, mlp=args.mlp, dtype=args.dtype,
                                tune_malloc=args.tune_malloc)
        print(json.dumps(result) if args.json else format_load_table(result))
        return
    modes, dtype = (("lora", "qlora"), "bfloat16") if args.method == "qlora" else (tuple(args.modes), args.dtype)
    result = run_bench(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, mlp=args.mlp, batch=args.batch, seq=args.seq, rank=args.rank,
                       steps=args.steps, warmup=args.warmup, modes=modes, dtype=dtype,
                       remat=args.remat, against=args.against, tune_malloc=args.tune_malloc)
    print(json.dumps(result) if args.json else format_table(result))


def _worker(a: dict) -> None:
    import jax

    from jpeft.bench_load import LOAD_WAYS, load

    mode = a.pop("mode")
    out = load(a, mode) if mode in LOAD_WAYS else _measure(a, mode)
    print(json.dumps({**out, "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jpeft.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        _worker(json.loads(ns.worker))
    else:
        main(ns)
