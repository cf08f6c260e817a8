"""`jpeft bench --load`: host memory of loading one HF checkpoint onto `LOAD_DEVICES` fake CPU
devices (mesh.fsdp), each way in its own process (`jpeft.bench`'s workers), its peaks read from
/proc/self/status (see `load` for why not ru_maxrss). Two comparisons (`COMPARED`): whole then sharded vs
sharded from birth; with `--method qlora`, a float base quantized after loading (as QLoRA ran before) vs
the base read straight into its NF4 codes (`from_pretrained(quantize=...)`).
"""
from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from jpeft import allocator
from jpeft.bench import _environ, _run_worker
from jpeft.bench_jpeft import _model
from jpeft.errors import JpeftError

LOAD_DEVICES = 8
# per method: the two ways compared (worker mode, the result's name), the older way first
COMPARED = {None: (("whole", "whole_then_shard"), ("sharded", "sharded_from_birth")),
            "qlora": (("quantize_after", "quantize_after_load"), ("quantized", "quantized_load"))}
LOAD_WAYS = ("baseline", *(way for pair in COMPARED.values() for way, _ in pair))  # worker modes of `run_load_bench`


def _status_mb(field: str) -> float:
    """One memory field of /proc/self/status (VmHWM, RssAnon, ...), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


@contextlib.contextmanager
def _anon_peak(out: dict):
    """Poll RssAnon every millisecond while inside; its highest value goes to out["peak_anon_mb"].

    The kernel keeps no high-water mark of anonymous memory alone, and VmHWM also counts the
    checkpoint's mmap-ed (file-backed, reclaimable) pages. Polled, so a lower bound.
    """
    stop = threading.Event()

    def poll():
        while not stop.wait(0.001):
            out["peak_anon_mb"] = max(out["peak_anon_mb"], _status_mb("RssAnon"))

    out["peak_anon_mb"] = _status_mb("RssAnon")
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out["peak_anon_mb"] = max(out["peak_anon_mb"], _status_mb("RssAnon"))


def load(a: dict, way: str) -> dict:
    """Peak memory of one way of loading ``a["checkpoint"]`` onto an fsdp mesh of fake CPU devices.

    Peak RSS is VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the parent,
    so it would floor at the peak of whoever started the worker (this bench's parent holds the
    random model). "baseline" only imports and builds the mesh: a way's own cost is its peak minus
    the baseline's. Peaks are read before the checksum, which copies shards to float64.
    """
    import jax

    from jpeft.models.hf import abstract_params, from_pretrained
    from jpeft.parallel import make_mesh, param_shardings

    mesh = make_mesh(1, LOAD_DEVICES, 1)
    if way == "baseline":
        return {"peak_rss_mb": _status_mb("VmHWM")}
    out = {"anon_before_mb": _status_mb("RssAnon")}
    t0 = time.perf_counter()
    with _anon_peak(out):
        if way == "whole":  # what the trainer did before weights were born sharded
            model, whole = from_pretrained(a["checkpoint"], a["dtype"])
            params = jax.device_put(whole, param_shardings(whole, abstract_params(model), mesh))
            del whole
        elif way == "sharded":
            _, params = from_pretrained(a["checkpoint"], a["dtype"], mesh=mesh)
        else:  # QLoRA's base: quantized after a float load (as before), or read straight into its codes
            from jpeft.train.build import init_method  # here only: the baseline and the plain ways do not import it
            method = qlora_method(a["rank"])
            model, params = from_pretrained(a["checkpoint"], a["dtype"], mesh=mesh,
                                            quantize=method if way == "quantized" else None)
            params = init_method(method, params, model, mesh, 0)
        jax.block_until_ready(params)
    out.update(load_s=time.perf_counter() - t0, peak_rss_mb=_status_mb("VmHWM"))
    held = dict.fromkeys(mesh.devices.flat, 0)
    for x in jax.tree.leaves(params):
        for shard in x.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return {**out, "device_share_mb": max(held.values()) / 2**20, "checksum": _checksum(params)}


def qlora_method(rank: int):
    """The QLoRA both ways of `--method qlora` load for: NF4 with double quantization (the QLoRA paper's)."""
    from jpeft.peft import QLoRA
    return QLoRA(rank, 2 * rank, ("q_proj", "v_proj"), quant="nf4", double_quant=True)


def _checksum(params) -> dict:
    """{leaf path: float64 sum of the leaf weighted by position}, each element counted once.

    Axis k weighs index i by 1 + (k + 1) i / n, so equal sums also mean equal layout
    (a transposed or misplaced slice changes them), not just equal values.
    """
    import numpy as np

    from jpeft import tree as T

    sums = {}
    for path, x in T.flatten(params).items():
        sums[path] = 0.0
        for shard in x.addressable_shards:
            if shard.replica_id:
                continue
            data = np.asarray(shard.data, np.float64)
            for k, (s, n) in enumerate(zip(shard.index, x.shape)):
                weight = 1 + (k + 1) * np.arange(*s.indices(n)) / n
                data = data * weight.reshape((-1,) + (1,) * (x.ndim - k - 1))
            sums[path] += float(data.sum())
    return sums


def run_load_bench(vocab: int = 32000, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 8,
                   mlp: int = 1408, dtype: str = "float32", tune_malloc: bool = True, seed: int = 0,
                   timeout: float = 1800, method: str | None = None, rank: int = 8) -> dict:
    """{"load": {checkpoint_mb, device_share_mb, baseline_rss_mb, <older way>, <newer way>, ratio, anon_ratio},
    "settings": {...}}, the ways `COMPARED[method]` names (whole_then_shard and sharded_from_birth; with
    method "qlora", quantize_after_load and quantized_load, a QLoRA of `rank` on q/v); ratio = the newer way's
    load cost in peak RSS (load_mb) over the older's, anon_ratio the same in peak anonymous memory (anon_load_mb).

    The parent writes a random float32 Llama checkpoint (the train bench's model) to a temp dir;
    each way then loads it in a fresh process under the same malloc settings as the train bench.
    """
    if method not in COMPARED:
        raise JpeftError(f"bench: --load compares loading a plain base or, with --method qlora, a QLoRA base; got "
                         f"--method {method!r}")
    if dtype not in ("float32", "bfloat16"):
        raise JpeftError(f"bench: dtype {dtype!r} is not supported; use float32 or bfloat16")
    if not os.path.exists("/proc/self/status"):
        raise JpeftError("bench --load reads peak memory from /proc/self/status, which only Linux has")
    from jpeft.models.hf import build, save_pretrained

    a = {"vocab": vocab, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "mlp": mlp,
         "seq": 1, "dtype": dtype, "remat": "none", "seed": seed, "rank": rank}
    (older_way, older), (newer_way, newer) = COMPARED[method]
    malloc = allocator.tuned(os.environ) if tune_malloc else {}
    # Fake devices must be asked for before jax starts, hence in the workers' environment.
    devices = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(
        f for f in (os.environ.get("XLA_FLAGS"), f"--xla_force_host_platform_device_count={LOAD_DEVICES}") if f)}
    with tempfile.TemporaryDirectory(prefix="jpeft-bench-load-") as ckpt:
        model, params = _model({**a, "dtype": "float32"})
        hf = {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": mlp,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "head_dim": hidden // heads, "rms_norm_eps": model.config.rms_norm_eps}
        save_pretrained(ckpt, build(model.config.replace(hf_config=hf)), params)  # config.json from hf_config
        del params
        checkpoint_mb = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors")) / 2**20
        with _environ({**malloc, **devices}):
            runs = {way: _run_worker({**a, "checkpoint": ckpt}, way, timeout)
                    for way in ("baseline", older_way, newer_way)}
    base = runs["baseline"]["peak_rss_mb"]
    before, after = ({"peak_rss_mb": r["peak_rss_mb"], "load_mb": r["peak_rss_mb"] - base,
                      "peak_anon_mb": r["peak_anon_mb"], "anon_load_mb": r["peak_anon_mb"] - r["anon_before_mb"],
                      "load_s": r["load_s"], "checksum": r["checksum"]} for r in (runs[older_way], runs[newer_way]))
    load = {"checkpoint_mb": checkpoint_mb, "device_share_mb": runs[newer_way]["device_share_mb"],
            "baseline_rss_mb": base, older: before, newer: after,
            **{ratio: after[key] / before[key] if before[key] > 0 else None
               for ratio, key in (("ratio", "load_mb"), ("anon_ratio", "anon_load_mb"))}}
    settings = {**a, "method": method and repr(qlora_method(rank)),
                "mesh": {"data": 1, "fsdp": LOAD_DEVICES, "tensor": 1}, "malloc_env": malloc, "device_env": devices,
                "jax": runs[newer_way]["jax"], "devices": runs[newer_way]["devices"], "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "process_per_mode": True}
    return {"load": load, "settings": settings}


def format_load_table(result: dict) -> str:
    """The load bench's rows (one per way), then the checkpoint, mesh and settings behind them."""
    r, s = result["load"], result["settings"]
    (_, older), (_, newer) = COMPARED["qlora" if "quantized_load" in r else None]
    lines = [f"{'load':<21}{'peak RSS MB':>13}{'load MB':>10}{'peak anon MB':>14}{'anon load MB':>14}{'load s':>9}"]
    for name in (older, newer):
        w = r[name]
        lines.append(f"{name:<21}{w['peak_rss_mb']:>13.0f}{w['load_mb']:>10.0f}{w['peak_anon_mb']:>14.0f}"
                     f"{w['anon_load_mb']:>14.0f}{w['load_s']:>9.1f}")
    ratio, anon = ("n/a" if r[k] is None else f"{r[k]:.2f}x" for k in ("ratio", "anon_ratio"))
    malloc = " ".join(f"{k}={v}" for k, v in s["malloc_env"].items()) or "default glibc malloc"
    lines.append(f"{newer}/{older}: load MB {ratio}, anon load MB {anon}; load MB = peak RSS (VmHWM) - "
                 f"{r['baseline_rss_mb']:.0f} MB of a process that only imports and builds the mesh; "
                 "anon = RssAnon polled every ms, minus its value before the load (RSS also counts the "
                 "checkpoint's mmap-ed pages)")
    method = f"; {s['method']}, its leaves added under jit" if s.get("method") else ""
    lines.append(f"checkpoint {r['checkpoint_mb']:.1f} MB ({s['dtype']} once loaded: {r['device_share_mb']:.1f} MB "
                 f"per device{method}), vocab {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers; mesh fsdp="
                 f"{s['mesh']['fsdp']} over {len(s['devices'])} fake CPU devices")
    lines.append(f"each way in its own process under: {malloc}; {s['machine']}, {s['cpu_count']} CPUs, "
                 f"jax {s['jax']}")
    return "\n".join(lines)
