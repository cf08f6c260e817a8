"""`jpeft bench`: train-step throughput and memory of a random Llama, optionally against HF PEFT.

Each jpeft mode runs in a fresh interpreter (jpeft/bench_jpeft.py), as each HF PEFT mode
does (jpeft/bench_torch.py), so every ``peak_rss_mb`` is one process's
own ``ru_maxrss`` and both sides run under the same environment. On CPU that environment
matters: by default glibc malloc returns ~2 GB to the OS and re-faults it every step, so
unless ``tune_malloc=False`` both sides run with `jpeft.allocator`'s settings, which keep memory
(docs/design.md §8), and the result reports the settings used. Each side's throughput is the
median of ``rounds`` rounds, the sides alternating, with its min and max; each is set against
the machine's matmul peak in its own framework (jpeft/roofline.py).

``--load`` measures loading instead (jpeft/bench_load.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys

from jpeft import allocator
from jpeft.bench_jpeft import _gemm_shapes
from jpeft.bench_torch import run_hf_peft
from jpeft.errors import JpeftError
from jpeft.hardware import REPORTED_FLAGS, reported_flags
from jpeft.jax_env import matmul_precision, worker_env
from jpeft.roofline import DTYPES, torch_device

MODES = ("lora", "full", "qlora")
# Each side's row fields: (tok/s and roofline prefix, first-step time, peak RSS, peak accelerator memory,
# trainable, total).
SIDES = {"jpeft": ("jpeft", "compile_s", "peak_rss_mb", "peak_device_mb", "trainable_params", "total_params"),
         "hf-peft": ("hf_peft", "hf_peft_first_step_s", "hf_peft_peak_rss_mb", "hf_peft_peak_device_mb",
                     "hf_peft_trainable_params", "hf_peft_total_params")}
SUMMARY_KEYS = ("roofline", "compile_s_by_layers", "settings")  # the result's keys that are not rows
COLUMNS = (("row", "<11"), ("side", "<9"), ("tok/s median [min–max]", ">28"), ("TFLOP/s", ">9"), ("roofline", ">10"),
           ("of best", ">9"), ("MFU", ">7"), ("first step s", ">14"), ("peak MiB", ">10"), ("frozen MiB", ">12"),
           ("trainable", ">13"), ("total", ">13"), ("jpeft/hf", ">10"))


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
    env = worker_env()
    cmd = [sys.executable, "-m", "jpeft.bench_jpeft", "--worker", json.dumps({**a, "mode": mode})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise JpeftError(f"jpeft benchmark ({mode}) ran past {timeout:.0f}s; "
                         "lower --steps/--seq or raise the timeout") from None
    if proc.returncode != 0:
        raise JpeftError(f"jpeft benchmark ({mode}) failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spread(name: str, values: list) -> dict:
    """The median of one side's per-round values, with their min and max: the noise across rounds."""
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


def _most(values) -> float | None:
    """The largest of per-round peaks that may be None (no accelerator)."""
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _row(dtype: str, jp: list, hf: list, roofline: dict, tokens: int) -> dict:
    """One mode at one dtype over its rounds (jp and hf: each side's worker results): median tok/s
    with min and max, median first-step time, highest peak RSS, and each side's fraction of its own
    framework's matmul peak and of the faster framework's. Both sides run the same model, so both
    do the FLOPs jpeft counts."""
    last = jp[-1]
    row = {"dtype": dtype, **_spread("jpeft_tok_s", [r["tok_s"] for r in jp]),
           **{k: last[k] for k in ("model_tflop_per_step", "loss", "frozen_mb", "trainable_params", "total_params")},
           "compile_s": statistics.median(r["compile_s"] for r in jp),
           "peak_rss_mb": max(r["peak_rss_mb"] for r in jp), "peak_device_mb": _most(r["peak_device_mb"] for r in jp),
           "step_s": [s for r in jp for s in r["step_s"]]}
    best = max(peaks[dtype] for peaks in roofline.values())

    def fractions(side: str, framework: str) -> dict:
        gflop_s = row["model_tflop_per_step"] * 1e3 * row[f"{side}_tok_s"] / tokens
        return {f"{side}_roofline_fraction": gflop_s / roofline[framework][dtype],
                f"{side}_roofline_fraction_of_best": gflop_s / best}

    peak = last["peak_tflops"]
    row.update(fractions("jpeft", "xla"),
               mfu=row["model_tflop_per_step"] * row["jpeft_tok_s"] / tokens / peak if peak else None)
    if hf:
        h = hf[-1]
        row.update(_spread("hf_peft_tok_s", [r["tok_s"] for r in hf]))
        row.update(fractions("hf_peft", "torch"), ratio=row["jpeft_tok_s"] / row["hf_peft_tok_s"],
                   hf_peft_step_s=[s for r in hf for s in r["step_s"]],
                   hf_peft_first_step_s=statistics.median(r["first_step_s"] for r in hf),
                   hf_peft_peak_rss_mb=max(r["peak_rss_mb"] for r in hf),
                   hf_peft_peak_device_mb=_most(r["peak_device_mb"] for r in hf),
                   **{f"hf_peft_{k}": h[k] for k in ("trainable_params", "total_params", "trainable_dtypes",
                                                     "frozen_dtypes", "autocast")})
    return row


def run_bench(vocab: int = 32000, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 8,
              mlp: int = 1408, batch: int = 8, seq: int = 256, rank: int = 8, alpha: float = 16,
              targets=("q_proj", "v_proj"), steps: int = 5, warmup: int = 2, modes=("lora", "full"),
              dtype: str = "float32", rounds: int = 3, compile_depths=(4, 32), remat: str = "none",
              against: str | None = None, tune_malloc: bool = True, seed: int = 0, timeout: float = 1800) -> dict:
    """{row: {jpeft_tok_s, compile_s, peak_rss_mb, ... [hf_peft_tok_s, ratio]}, "roofline": {framework:
    {dtype: GFLOP/s}}, "compile_s_by_layers": {layers: s}, "settings": {...}}, a row per mode and dtype
    ("lora", "full", "lora_bf16", ...; dtype "both" runs float32 and bfloat16)."""
    if against not in (None, "hf-peft"):
        raise JpeftError(f"bench: --against {against!r} is not supported; use 'hf-peft'")
    if dtype not in (*DTYPES, "both"):
        raise JpeftError(f"bench: --dtype {dtype!r} is not supported; use float32, bfloat16 or both")
    if remat not in ("none", "full", "dots"):
        raise JpeftError(f"bench: remat {remat!r} is not supported; use none, full or dots")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise JpeftError(f"bench: unknown modes {sorted(unknown)}; use {', '.join(MODES)}")
    if rounds < 1:
        raise JpeftError(f"bench: --rounds must be at least 1 (one process per side and mode), got {rounds}")
    if any(n < 1 for n in compile_depths):
        raise JpeftError(f"bench: --compile-depths are layer counts, each at least 1; got {list(compile_depths)}")
    dtypes = DTYPES if dtype == "both" else (dtype,)
    a = {"vocab": vocab, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
         "mlp": mlp, "batch": batch, "seq": seq, "rank": rank, "alpha": alpha, "targets": list(targets),
         "steps": steps, "warmup": warmup, "remat": remat, "seed": seed}
    hf_args = {"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
               "num_kv_heads": kv_heads, "intermediate_size": mlp, "batch": batch, "seq": seq, "rank": rank,
               "alpha": alpha, "targets": list(targets), "steps": steps, "warmup": warmup, "seed": seed}
    hf_modes = [m for m in modes if m != "qlora"] if against == "hf-peft" else []
    env = allocator.tuned(os.environ) if tune_malloc else {}
    settings = {**a, "dtype": dtype, "rounds": rounds, "against": against, "malloc_env": env,
                "cpu_count": os.cpu_count(), "machine": platform.machine(), "cpu_flags": reported_flags(),
                "matmul_precision": matmul_precision(),
                "process_per_mode": True, "roofline_shapes": _gemm_shapes(a),
                "compile_depths_of": f"{modes[0]} {dtypes[0]}"}
    runs, order = {}, []
    with _environ(env):
        xla = _run_worker({**a, "dtype": "float32"}, "roofline", timeout)
        hf_args["device"] = torch_device(xla["platform"])
        settings.update(jax=xla["jax"], platform=xla["platform"], devices=xla["devices"],
                        torch_device=hf_args["device"])
        roofline = {"xla": xla["roofline"]}
        if hf_modes:
            hf = run_hf_peft({**hf_args, "modes": ["roofline"]}, timeout=timeout)
            roofline["torch"] = hf["roofline"]
            settings.update(torch=hf["torch"], torch_threads=hf["threads"])
        compile_s = {str(n): _run_worker({**a, "dtype": dtypes[0], "layers": n, "of": modes[0]}, "compile",
                                         timeout)["compile_s"] for n in compile_depths}
        # Rounds outermost, so each row's rounds spread over the whole run and their min-max shows the
        # machine's drift; within a round each jpeft mode runs right next to its HF PEFT twin.
        for _ in range(rounds):
            for d in dtypes:
                for mode in modes:
                    sides = runs.setdefault((mode, d), ([], []))
                    sides[0].append(_run_worker({**a, "dtype": d}, mode, timeout))
                    order.append(f"jpeft {mode} {d}")
                    if mode in hf_modes:
                        sides[1].append(run_hf_peft({**hf_args, "dtype": d, "modes": [mode]}, timeout=timeout)[mode])
                        order.append(f"hf-peft {mode} {d}")
    rows = {(mode if d == "float32" else f"{mode}_bf16"): _row(d, jp, hf, roofline, batch * seq)
            for (mode, d), (jp, hf) in runs.items()}
    settings["run_order"] = order
    return {**rows, "roofline": roofline, "compile_s_by_layers": compile_s, "settings": settings}


def _cells(key: str, r: dict, side: str, tokens: int) -> tuple:
    """One side's cells of row `key`, in COLUMNS order."""
    prefix, first, rss, device, trainable, total = SIDES[side]
    tok_s, jpeft = r[f"{prefix}_tok_s"], side == "jpeft"
    return (key, side, f"{tok_s:.1f} [{r[f'{prefix}_tok_s_min']:.1f}–{r[f'{prefix}_tok_s_max']:.1f}]",
            f"{r['model_tflop_per_step'] * tok_s / tokens:.3f}", f"{100 * r[f'{prefix}_roofline_fraction']:.1f}%",
            f"{100 * r[f'{prefix}_roofline_fraction_of_best']:.1f}%",
            f"{100 * r['mfu']:.1f}%" if jpeft and r["mfu"] is not None else "-", f"{r[first]:.1f}",
            f"{r[rss] if r.get(device) is None else r[device]:.0f}", f"{r['frozen_mb']:.1f}" if jpeft else "-",
            f"{r[trainable]:,d}", f"{r[total]:,d}",
            "" if jpeft else f"{r['ratio']:.2f}x")


def format_table(result: dict) -> str:
    """One line per mode, dtype and side, then the settings that shaped the numbers."""
    tokens = result["settings"]["batch"] * result["settings"]["seq"]
    lines = ["".join(f"{name:{fmt}}" for name, fmt in COLUMNS)]
    for key, r in result.items():
        for side, fields in SIDES.items():
            if key not in SUMMARY_KEYS and f"{fields[0]}_tok_s" in r:
                cells = _cells(key, r, side, tokens)
                lines.append("".join(f"{cell:{fmt}}" for cell, (_, fmt) in zip(cells, COLUMNS)))
    return "\n".join(lines + _footer(result))


def _footer(result: dict) -> list:
    """The settings behind the table's numbers."""
    s = result["settings"]
    malloc = " ".join(f"{k}={v}" for k, v in s["malloc_env"].items()) or "default glibc malloc"
    peaks = "; ".join(f"{framework} " + ", ".join(f"{d} {g:.1f}" for d, g in p.items())
                      for framework, p in result["roofline"].items())
    depths = (", ".join(f"{n} layers {t:.1f} s" for n, t in result["compile_s_by_layers"].items())
              or "not measured (--compile-depths none)")
    flags = " ".join(s["cpu_flags"]) or "none (or no /proc/cpuinfo)"
    torch = f"; torch {s['torch']} on {s['torch_device']}, {s['torch_threads']} threads" if "torch" in s else ""
    memory = ("peak MiB: the accelerator memory each side held at its peak (jax memory_stats, torch "
              "max_memory_allocated)" if s["platform"] != "cpu" else "peak MiB: each process's peak RSS (ru_maxrss)")
    lines = [
        f"model: vocab {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads "
        f"({s['kv_heads']} kv), mlp {s['mlp']}, batch {s['batch']}x{s['seq']}, dtype {s['dtype']}, "
        f"remat {s['remat']}; LoRA r={s['rank']} on {', '.join(s['targets'])}",
        f"tok/s: median [min–max] of {s['rounds']} rounds, each a fresh process per side, the sides alternating; "
        f"a round's figure is the median of {s['steps']} steps after {s['warmup']} warm-up",
        "roofline: achieved model FLOP/s ÷ the matmul peak of the side's own framework at the row's dtype; "
        "of best: ÷ the faster framework's",
        f"matmul peak GFLOP/s, best of the step's GEMM shapes {s['roofline_shapes']} (bf16: bf16 inputs, "
        f"float32 accumulation): {peaks}",
        "first step s: jpeft's includes its XLA compile, hf-peft's runs eagerly; median of the rounds. "
        f"Compile alone (lower + compile on abstract inputs, {s['compile_depths_of']}): {depths}",
        f"each mode in its own process, both sides under: {malloc}; devices {s['devices']}{torch}; jax's float32 "
        f"matmul precision {s['matmul_precision']}; {memory}",
        f"cpu: {s['machine']}, {s['cpu_count']} cores; matmul flags present (of {', '.join(REPORTED_FLAGS)}): {flags}",
        "TFLOP/s: model FLOPs the step really does (jpeft/train/flops.py: no weight gradients for frozen "
        "weights, no remat recomputation), for both sides; MFU against the device's dense bf16 peak, where known",
    ]
    if any(r["dtype"] == "bfloat16" for k, r in result.items() if k not in SUMMARY_KEYS):
        lines.insert(1, "bf16: jpeft keeps the frozen base in bf16 and trainable leaves in float32, bf16 matmuls "
                        "accumulating in float32; hf-peft runs LoRA on a bf16 base with float32 adapters and full "
                        "fine-tuning on float32 weights, both under torch.autocast("
                        f"'{s['torch_device']}', bfloat16)")
    return lines


def add_arguments(parser) -> None:
    """Options of `jpeft bench`; `main(args)` runs them."""
    parser.add_argument("--against", choices=["hf-peft"], default=None,
                        help="also run the same model, batch, optimizer and LoRA through HF PEFT (PyTorch)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--generate", action="store_true",
                        help="instead of train steps: greedy decoding tok/s of jpeft against transformers' generate "
                             "on the same random model, batch 1 and 8, 128-token prompts, 64 new tokens "
                             "(jpeft/bench_generate.py); uses the model sizes, --dtype, --steps timed calls after "
                             "--warmup untimed ones, and the malloc options")
    parser.add_argument("--load", action="store_true",
                        help="instead of train steps: peak host RSS of loading a random HF checkpoint onto "
                             "8 fake CPU devices (mesh.fsdp=8), whole then sharded vs sharded from birth (with "
                             "--method qlora: a float base quantized after loading vs read straight into its NF4 "
                             "codes); uses the model sizes, --dtype, --rank and malloc options")
    parser.add_argument("--sft", metavar="FILE",
                        help="instead: LoRA-fine-tune on a DialogSum-shaped JSONL (dialogue, summary), jpeft "
                             "(packed rows) against HF PEFT (padded batches): target tok/s and seconds to the "
                             "same held-out loss (jpeft/bench_sft.py); --seq is the packed row length, --steps "
                             "the train steps of each side, e.g. --seq 512 --steps 100")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["lora", "full"],
                        help="what to train: LoRA, full fine-tuning, QLoRA on an NF4 base (jpeft only) "
                             "(default lora full)")
    parser.add_argument("--method", choices=["qlora"], default=None,
                        help="qlora: NF4-base QLoRA beside LoRA on a bf16 base (memory and speed); sets --modes "
                             "(with --load: how a QLoRA base loads)")
    for name, default, text in (
            ("steps", None, "timed train steps per process, its tok/s their median (default 5; --sft: train "
                            "steps of each side, default 100)"),
            ("warmup", 2, "untimed steps first, the first of them jpeft's compile"),
            ("rounds", 3, "fresh processes per side and mode, the sides alternating; tok/s is the median of "
                          "the rounds, shown with their min and max"),
            ("batch", 8, "sequences per step (--sft: examples per step, which jpeft packs into fewer rows)"),
            ("seq", None, "tokens per sequence (default 256; --sft: the packed row, default 512)"),
            ("hidden", 512, "model width"), ("layers", 8, "decoder layers"), ("heads", 8, "attention heads"),
            ("kv-heads", 8, "key/value heads"), ("mlp", 1408, "MLP width"), ("vocab", 32000, "vocabulary size"),
            ("rank", 8, "LoRA rank (on q_proj and v_proj)")):
        parser.add_argument(f"--{name}", type=int, default=default,
                            help=text if default is None else f"{text} (default {default})")
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="float32",
                        help="frozen base and matmul dtype (trainable leaves stay float32); hf-peft runs bf16 "
                             "as a PEFT user would: a bf16 base with float32 LoRA weights, or float32 weights for "
                             "full fine-tuning, under torch.autocast; both: a row per mode at each dtype")
    parser.add_argument("--compile-depths", default="4,32", metavar="N,N",
                        help="also time lowering + compiling the first mode's jpeft step at these layer counts, "
                             "on abstract inputs (no weights allocated), to show compile time against depth; "
                             "'none' skips it (default 4,32)")
    parser.add_argument("--remat", choices=["none", "full", "dots"], default="none",
                        help="jpeft's rematerialisation of each layer in the backward pass (default none)")
    parser.add_argument("--no-tune-malloc", dest="tune_malloc", action="store_false",
                        help="run both sides under the caller's glibc malloc settings")


def _depths(text: str) -> tuple:
    """--compile-depths: comma-separated layer counts, or 'none'."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise JpeftError(f"bench: --compile-depths takes layer counts like 4,32 (or none), got {text!r}") from None


SIZES = ("steps", "batch", "seq", "hidden", "layers", "heads", "kv_heads", "mlp", "vocab", "rank")


def check_sizes(args) -> None:
    """Sizes a model and a run can have, checked before any worker starts (not in a worker's traceback)."""
    small = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in SIZES if getattr(args, name) < 1]
    if small or args.warmup < 0:
        got = ", ".join(small) or f"--warmup {args.warmup}"
        raise JpeftError(f"bench: sizes and --steps must be >= 1 and --warmup >= 0; got {got}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise JpeftError(f"bench: --heads must divide --hidden and --kv-heads must divide --heads; got --hidden "
                         f"{args.hidden}, --heads {args.heads}, --kv-heads {args.kv_heads}")


def main(args) -> None:
    train_default = {"steps": 100, "seq": 512} if args.sft else {"steps": 5, "seq": 256}
    for name, value in train_default.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_sizes(args)
    if args.generate:
        from jpeft.bench_generate import main as generate_main
        generate_main(args)
        return
    if args.sft:
        from jpeft.bench_sft import main as sft_main
        sft_main(args)
        return
    if args.load:
        from jpeft.bench_load import format_load_table, run_load_bench
        if args.against:
            raise JpeftError("bench: --load measures jpeft's loading only; drop --against")
        result = run_load_bench(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                kv_heads=args.kv_heads, mlp=args.mlp, dtype=args.dtype,
                                tune_malloc=args.tune_malloc, method=args.method, rank=args.rank)
        print(json.dumps(result) if args.json else format_load_table(result))
        return
    modes, dtype = (("lora", "qlora"), "bfloat16") if args.method == "qlora" else (tuple(args.modes), args.dtype)
    result = run_bench(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, mlp=args.mlp, batch=args.batch, seq=args.seq, rank=args.rank,
                       steps=args.steps, warmup=args.warmup, modes=modes, dtype=dtype, rounds=args.rounds,
                       compile_depths=_depths(args.compile_depths), remat=args.remat, against=args.against,
                       tune_malloc=args.tune_malloc)
    print(json.dumps(result) if args.json else format_table(result))
