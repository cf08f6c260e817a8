"""The PyTorch / HF PEFT side of ``jpeft bench --against hf-peft``.

Runs as its own process (``python -m jpeft.bench_torch --json-args '{...}'``) and never
imports jax, so the two frameworks never share threads or memory in one measurement.
When several modes are asked for, the script re-launches itself once per mode so each
mode's ``peak_rss_mb`` (process-wide ``ru_maxrss``) is its own. Mode "roofline" times
torch.matmul on the step's GEMM shapes instead (jpeft/roofline.py).
Prints one JSON line: ``{"lora": {...}, "full": {...}, "torch": ..., "threads": ...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from jpeft.errors import JpeftError
from jpeft.jax_env import worker_env
from jpeft.roofline import DTYPES, gemm_shapes, synchronize, torch_peak

DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 512, "num_layers": 8, "num_heads": 8,
    "num_kv_heads": 8, "intermediate_size": 1408, "batch": 8, "seq": 256,
    "rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"],
    "steps": 5, "warmup": 2, "modes": ["lora", "full"], "seed": 0, "dtype": "float32", "device": "cpu",
}


def _build(a: dict, mode: str):
    """A random-initialised Llama, LoRA-wrapped for mode 'lora', in the precision a PEFT user picks
    for a["dtype"] (the step runs under bf16 autocast for "bfloat16", see `_measure`).

    LoRA in bf16: the frozen base in bf16 and the adapters in float32 (get_peft_model's
    autocast_adapter_dtype). Full fine-tuning in bf16 keeps float32 weights and computes in bf16
    under autocast, as mixed precision with float32 master weights does (Trainer's bf16=True) and
    as jpeft's full mode does (trainable leaves stay float32): AdamW on bf16 weights would drop
    updates smaller than bf16's precision, which is not what either side's user would run.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a["seed"])
    cfg = LlamaConfig(
        vocab_size=a["vocab_size"], hidden_size=a["hidden_size"],
        num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"],
        num_key_value_heads=a["num_kv_heads"], intermediate_size=a["intermediate_size"],
        tie_word_embeddings=False, max_position_embeddings=max(2048, a["seq"]),
    )
    model = LlamaForCausalLM(cfg).float()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        if a["dtype"] == "bfloat16":
            model = model.to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(
            r=a["rank"], lora_alpha=a["alpha"], target_modules=list(a["targets"]),
            lora_dropout=0.0), autocast_adapter_dtype=True)
    elif mode != "full":
        raise JpeftError(f"bench_torch: unknown mode {mode!r}; use 'lora', 'full' or 'roofline'")
    return model.train()


def _dtypes(params) -> list[str]:
    """The dtypes among params, so the result shows which precision each side trained in."""
    return sorted({str(p.dtype).removeprefix("torch.") for p in params})


def _measure(a: dict, mode: str) -> dict:
    """Time forward + next-token cross-entropy + backward + clip + AdamW step + zero_grad; the forward and
    loss under torch.autocast for bf16, backward outside it, as autocast's docs prescribe."""
    import torch

    device = a["device"]
    model = _build(a, mode).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(a["seed"])
    ids = torch.randint(0, a["vocab_size"], (a["batch"], a["seq"]), generator=gen).to(device)
    bf16 = a["dtype"] == "bfloat16"
    times = []
    for i in range(a["warmup"] + a["steps"]):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # jpeft's adamw clips at 1.0 too
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = times[a["warmup"]:]
    tokens = a["batch"] * a["seq"]
    return {
        "tok_s": statistics.median(tokens / s for s in step_s),
        "step_s": step_s,
        "first_step_s": times[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_dtypes": _dtypes(params),
        "frozen_dtypes": _dtypes(p for p in model.parameters() if not p.requires_grad),
        "autocast": "bfloat16" if bf16 else None,
    }


def _roofline(a: dict) -> dict:
    """torch.matmul's peak GFLOP/s per dtype on the step's GEMM shapes."""
    head_dim = a["hidden_size"] // a["num_heads"]
    return torch_peak(gemm_shapes(a["batch"] * a["seq"], a["hidden_size"], a["num_kv_heads"] * head_dim,
                                  a["intermediate_size"], a["vocab_size"]), a["device"])


def run_hf_peft(args: dict, timeout: float) -> dict:
    """Run the benchmark in a fresh interpreter, so torch never loads next to jax."""
    env = worker_env()
    cmd = [sys.executable, "-m", "jpeft.bench_torch", "--json-args", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise JpeftError(f"hf-peft benchmark ran past {timeout:.0f}s; "
                         "lower --steps/--seq or raise the timeout") from None
    tail = proc.stderr.strip()[-2000:]
    if proc.returncode != 0:
        if "No module named 'torch'" in tail or "No module named 'peft'" in tail:
            raise JpeftError("--against hf-peft needs torch and peft: "
                             f"pip install torch peft\n{tail}")
        raise JpeftError(f"hf-peft benchmark (jpeft/bench_torch.py) failed:\n{tail}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise JpeftError(f"hf-peft benchmark printed no JSON result:\n{tail}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-args", default="{}", help="JSON dict overriding defaults")
    for key, value in DEFAULTS.items():
        kind = type(value[0]) if isinstance(value, list) else type(value)
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind,
                            nargs="+" if isinstance(value, list) else None)
    ns = parser.parse_args(argv)
    json_args = json.loads(ns.json_args)
    unknown = set(json_args) - set(DEFAULTS)
    if unknown:
        raise JpeftError(f"bench_torch --json-args: unknown keys {sorted(unknown)}; "
                         f"known keys are {sorted(DEFAULTS)}")
    a = {**DEFAULTS, **json_args,
         **{k: v for k, v in vars(ns).items() if k in DEFAULTS and v is not None}}
    if a["dtype"] not in DTYPES:
        raise JpeftError(f"bench_torch: dtype {a['dtype']!r} is not supported; use float32 or bfloat16")
    if len(a["modes"]) > 1:
        runs = {mode: run_hf_peft({**a, "modes": [mode]}, timeout=None) for mode in a["modes"]}
        last = runs[a["modes"][-1]]
        print(json.dumps({**{m: r[m] for m, r in runs.items()},
                          "torch": last["torch"], "threads": last["threads"]}))
        return
    import torch

    torch.set_num_threads(os.cpu_count())
    result = {mode: _roofline(a) if mode == "roofline" else _measure(a, mode) for mode in a["modes"]}
    print(json.dumps({**result, "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
