"""`jpeft bench --generate`: greedy decoding tokens/s of jpeft against transformers' generate.

A torch process builds the train bench's random Llama (bench_torch's) and saves it as an HF
checkpoint without an EOS id; jpeft (`jpeft.from_pretrained` + KV-cache `generate`) and
transformers (`generate(do_sample=False)`) each load it in a process of their own, so jax and
torch never share one, and continue the same random prompts by exactly `new_tokens` tokens.
Each side's time is the median of `steps` whole calls (prefill + decode) after `warmup` untimed
ones, jpeft's first of them compiling; a 1-token call times the prefill alone, so the rest is
the per-token decode cost. Both sides must produce the same tokens (`same_tokens`).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from jpeft import allocator
from jpeft.bench import _environ
from jpeft.errors import JpeftError
from jpeft.hardware import REPORTED_FLAGS, reported_flags
from jpeft.jax_env import matmul_precision, worker_env
from jpeft.roofline import DTYPES, torch_device

SIDES = ("jpeft", "hf")  # row prefixes: jpeft_tok_s, hf_tok_s, ...
COLUMNS = (("batch", "<7"), ("side", "<14"), ("tok/s", ">9"), ("call s", ">9"), ("prefill s", ">11"),
           ("decode ms/token", ">17"), ("first call s", ">14"), ("jpeft/hf", ">10"), ("same tokens", ">13"))


def run_generate_bench(vocab: int = 32000, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 8,
                       mlp: int = 1408, dtype: str = "float32", batches=(1, 8), prompt: int = 128,
                       new_tokens: int = 64, steps: int = 5, warmup: int = 1, tune_malloc: bool = True,
                       seed: int = 0, timeout: float = 1800) -> dict:
    """{"generate": {"batch_N": {jpeft_tok_s, hf_tok_s, ratio, same_tokens, ...}}, "settings": {...}}."""
    if dtype not in DTYPES:
        raise JpeftError(f"bench --generate: --dtype {dtype!r} is not supported; use float32 or bfloat16")
    if steps < 1:
        raise JpeftError(f"bench --generate: --steps (timed generate calls) must be at least 1, got {steps}")
    if prompt < 1 or new_tokens < 2 or not batches or min(batches) < 1:
        raise JpeftError(f"bench --generate: need a prompt of >= 1 token, >= 2 new tokens and batch sizes >= 1; "
                         f"got prompt={prompt}, new_tokens={new_tokens}, batches={list(batches)}")
    import numpy as np

    prompts = np.random.default_rng(seed).integers(0, vocab, (max(batches), prompt)).tolist()
    a = {"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
         "num_kv_heads": kv_heads, "intermediate_size": mlp, "seq": prompt + new_tokens, "seed": seed,
         "dtype": dtype, "batches": list(batches), "new_tokens": new_tokens, "steps": steps,
         "warmup": max(warmup, 1), "prompts": prompts}
    env = allocator.tuned(os.environ) if tune_malloc else {}
    with tempfile.TemporaryDirectory(prefix="jpeft-bench-generate-") as ckpt, _environ(env):
        a["checkpoint"] = ckpt
        _run("build", a, timeout)
        jp = _run("jpeft", a, timeout)
        a["device"] = torch_device(jp["versions"]["platform"])  # transformers runs on jax's kind of chip
        sides = {"jpeft": jp, "hf": _run("hf", a, timeout)}
    rows = {}
    for batch in batches:
        key = f"batch_{batch}"
        row = {"batch": batch}
        for side, result in sides.items():
            r = result["rows"][key]
            row.update({f"{side}_{k}": v for k, v in r.items() if k != "tokens"},
                       **{f"{side}_tok_s": batch * new_tokens / r["call_s"]})
        row.update(ratio=row["jpeft_tok_s"] / row["hf_tok_s"],
                   jpeft_compile_s=row["jpeft_first_call_s"] - row["jpeft_call_s"],
                   same_tokens=sides["jpeft"]["rows"][key]["tokens"] == sides["hf"]["rows"][key]["tokens"])
        rows[key] = row
    settings = {k: v for k, v in a.items() if k not in ("prompts", "checkpoint")}
    settings.update(prompt=prompt, malloc_env=env, cpu_flags=reported_flags(), cpu_count=os.cpu_count(),
                    matmul_precision=matmul_precision(),
                    machine=platform.machine(), **sides["jpeft"]["versions"], **sides["hf"]["versions"])
    return {"generate": rows, "settings": settings}


def format_generate_table(result: dict) -> str:
    """Two lines per batch size (jpeft, transformers), then the settings behind them."""
    lines = ["".join(f"{name:{fmt}}" for name, fmt in COLUMNS)]
    for r in result["generate"].values():
        for side, name in zip(SIDES, ("jpeft", "transformers")):
            decode_ms = 1e3 * (r[f"{side}_call_s"] - r[f"{side}_prefill_s"]) / (result["settings"]["new_tokens"] - 1)
            cells = (r["batch"], name, f"{r[f'{side}_tok_s']:.1f}", f"{r[f'{side}_call_s']:.2f}",
                     f"{r[f'{side}_prefill_s']:.3f}", f"{decode_ms:.1f}", f"{r[f'{side}_first_call_s']:.2f}",
                     f"{r['ratio']:.2f}x" if side == "hf" else "", str(r["same_tokens"]).lower() if side == "hf" else "")
            lines.append("".join(f"{cell:{fmt}}" for cell, (_, fmt) in zip(cells, COLUMNS)))
    s = result["settings"]
    flags = " ".join(s["cpu_flags"]) or "none (or no /proc/cpuinfo)"
    malloc = " ".join(f"{k}={v}" for k, v in s["malloc_env"].items()) or "default glibc malloc"
    lines += [
        f"model: vocab {s['vocab_size']}, hidden {s['hidden_size']}, {s['num_layers']} layers, {s['num_heads']} "
        f"heads ({s['num_kv_heads']} kv), mlp {s['intermediate_size']}, {s['dtype']} weights on both sides; "
        f"greedy, prompt {s['prompt']} tokens -> {s['new_tokens']} new tokens (no EOS)",
        f"tok/s: batch x new tokens / median of {s['steps']} whole calls after {s['warmup']} untimed; prefill s: a "
        "1-token call; decode ms/token: (call - prefill) / (new tokens - 1); first call s: jpeft's includes its "
        "XLA compile",
        f"jax {s['jax']} on {s['devices']}; torch {s['torch']} on {s['device']}, {s['torch_threads']} threads; "
        f"both under: {malloc}; jax's float32 matmul precision {s['matmul_precision']}",
        f"cpu: {s['machine']}, {s['cpu_count']} cores; matmul flags present (of {', '.join(REPORTED_FLAGS)}): {flags}",
    ]
    return "\n".join(lines)


def main(args) -> None:
    """`jpeft bench --generate`, from bench's parsed options."""
    if args.against or args.method or args.load or args.sft:
        raise JpeftError("bench: --generate compares against transformers by itself; "
                         "drop --against/--method/--load/--sft")
    result = run_generate_bench(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                kv_heads=args.kv_heads, mlp=args.mlp, dtype=args.dtype, steps=args.steps,
                                warmup=args.warmup, tune_malloc=args.tune_malloc)
    print(json.dumps(result) if args.json else format_generate_table(result))


def _run(side: str, a: dict, timeout: float) -> dict:
    """One side in a fresh interpreter (`python -m jpeft.bench_generate SIDE JSON`); its JSON line."""
    env = worker_env()
    cmd = [sys.executable, "-m", "jpeft.bench_generate", side, json.dumps(a)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise JpeftError(f"bench --generate ({side}) ran past {timeout:.0f}s; lower the model sizes") from None
    if proc.returncode != 0:
        raise JpeftError(f"bench --generate ({side}) failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(generate, a: dict) -> dict:
    """{"batch_N": {first_call_s, call_s, prefill_s, tokens}} of `generate(prompts, n) -> new token lists`."""
    def timed(prompts, n):
        t0 = time.perf_counter()
        tokens = generate(prompts, n)
        return time.perf_counter() - t0, tokens

    rows = {}
    for batch in a["batches"]:
        prompts = a["prompts"][:batch]
        first, _ = timed(prompts, a["new_tokens"])
        for _ in range(a["warmup"] - 1):
            timed(prompts, a["new_tokens"])
        timed(prompts, 1)  # jpeft compiles the 1-token call here
        calls, prefills = [], []
        for _ in range(a["steps"]):
            seconds, tokens = timed(prompts, a["new_tokens"])
            calls.append(seconds)
            prefills.append(timed(prompts, 1)[0])
        rows[f"batch_{batch}"] = {"first_call_s": first, "call_s": statistics.median(calls),
                                  "prefill_s": statistics.median(prefills), "tokens": tokens}
    return rows


def _build(a: dict) -> dict:
    """Save the train bench's random Llama (float32) as an HF checkpoint that never stops at an EOS."""
    from jpeft.bench_torch import _build as build_torch

    model = build_torch(a, "full")
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    model.save_pretrained(a["checkpoint"])
    return {}


def _jpeft(a: dict) -> dict:
    import jax

    import jpeft
    from jpeft.generate import generate

    model, params = jpeft.from_pretrained(a["checkpoint"], a["dtype"])
    rows = _measure(lambda prompts, n: generate(model, params, prompts, n, eos_token_id=None), a)
    return {"rows": rows, "versions": {"jax": jax.__version__, "platform": jax.default_backend(),
                                       "devices": [str(d) for d in jax.devices()]}}


def _hf(a: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())  # as bench_torch does
    device = a["device"]
    model = AutoModelForCausalLM.from_pretrained(a["checkpoint"], dtype=getattr(torch, a["dtype"])).to(device).eval()

    def generate(prompts, n):
        ids = torch.tensor(prompts, device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()  # to the host: waits for the device

    return {"rows": _measure(generate, a),
            "versions": {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}}


if __name__ == "__main__":
    side, args = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"build": _build, "jpeft": _jpeft, "hf": _hf}[side](args)))
