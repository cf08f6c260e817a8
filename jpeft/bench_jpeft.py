"""The jpeft side of `jpeft bench`: what one worker process measures (``python -m jpeft.bench_jpeft
--worker JSON``, started by jpeft/bench.py as bench_torch's processes are): a mode's train step of the
random Llama bench_torch builds, the step's compile alone, XLA's matmul roofline, or a way of loading
(jpeft/bench_load.py). Prints one JSON line.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

from jpeft.roofline import gemm_shapes

# Dense bf16 peak TFLOP/s per chip, by device_kind substring: the denominator of MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0,
               "TPU v6 lite": 918.0, "TPU v4": 275.0}


def _module(a: dict):
    """The Llama that bench_torch builds, as a jpeft module."""
    from jpeft.models.config import ModelConfig
    from jpeft.models.llama import CausalLM

    cfg = ModelConfig(
        model_type="llama", vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["mlp"],
        num_layers=a["layers"], num_heads=a["heads"], num_kv_heads=a["kv_heads"],
        head_dim=a["hidden"] // a["heads"], max_position_embeddings=max(2048, a["seq"]),
        dtype=a["dtype"], remat=a["remat"])
    return CausalLM(cfg)


def _model(a: dict):
    """The random Llama that bench_torch builds, as a jpeft module and float32 tree."""
    import jax

    from jpeft.models.llama import init_params

    model = _module(a)
    return model, init_params(model, jax.random.key(a["seed"]))


def _step(a: dict, mode: str):
    """(model, method, jitted train step, trees) of one mode. trees() builds (params, state, frozen):
    the random weights with the method applied, frozen floats in bf16 for a bf16 run or QLoRA
    (trainable leaves stay float32); jax.eval_shape(trees) gives their shapes without allocating."""
    import jax
    import jax.numpy as jnp

    from jpeft import tree as T
    from jpeft.models.llama import init_params
    from jpeft.peft import Full, LoRA, QLoRA
    from jpeft.peft.quant import QUANT_LEAVES
    from jpeft.train.optimizer import adamw
    from jpeft.train.step import init_state, make_train_step

    model = _module(a)
    method = {"lora": lambda: LoRA(a["rank"], a["alpha"], a["targets"]), "full": Full,
              "qlora": lambda: QLoRA(a["rank"], a["alpha"], a["targets"], quant="nf4")}[mode]()
    # torch.optim.AdamW's default weight decay; jpeft's adamw also clips, as a trainer would.
    optimizer = adamw(1e-4, a["warmup"] + a["steps"], warmup=0, weight_decay=0.01, min_lr_ratio=1.0)

    def trees():
        params = method.init(jax.random.key(a["seed"] + 1), init_params(model, jax.random.key(a["seed"])))
        trainable, frozen = T.partition(params, method.mask(params))
        if a["dtype"] == "bfloat16" or mode == "qlora":  # a bf16 base; QLoRA's absmax stays float32, as it trains
            frozen = T.map_with_path(lambda path, x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating)
                                     and T.leaf_name(path) not in QUANT_LEAVES else x, frozen)
        return params, init_state(trainable, optimizer), frozen

    return model, method, make_train_step(model, optimizer, a["seed"], dropout=False), trees


def _batch(a: dict) -> dict:
    """One [1, batch, seq] batch of random ids, as bench_torch feeds."""
    import numpy as np

    ids = np.random.default_rng(a["seed"]).integers(0, a["vocab"], (1, a["batch"], a["seq"]), dtype=np.int32)
    mask = np.ones(ids.shape, np.float32)
    mask[..., -1] = 0  # next-token loss over seq - 1 positions, as HF's labels=input_ids
    return {"input_ids": ids, "labels": np.roll(ids, -1, axis=-1), "loss_mask": mask,
            "attention_mask": np.ones(ids.shape, np.int32)}


def _measure(a: dict, mode: str) -> dict:
    """Time one full jitted train step (forward, loss, backward, clip + AdamW) per timed step."""
    import jax

    from jpeft.peft import count_parameters
    from jpeft.train.flops import train_step_flops

    model, method, step, trees = _step(a, mode)
    params, state, frozen = trees()
    batch = jax.device_put(_batch(a))

    times = []
    for i in range(max(a["warmup"], 1) + a["steps"]):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = times[max(a["warmup"], 1):]
    tokens = a["batch"] * a["seq"]
    mask = method.mask(params)
    trainable_params, total_params = count_parameters(params, mask)
    return {
        "tok_s": statistics.median(tokens / s for s in step_s),
        "model_tflop_per_step": train_step_flops(model.config, params, mask, tokens, a["seq"]) / 1e12,
        "peak_tflops": next((v for k, v in PEAK_TFLOPS.items() if k in jax.devices()[0].device_kind), None),
        "step_s": step_s,
        "compile_s": times[0],
        "loss": float(metrics["loss"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": _peak_device_mb(),
        "frozen_mb": sum(x.nbytes for x in jax.tree.leaves(frozen)) / 2**20,
        "trainable_params": trainable_params,
        "total_params": total_params,
    }


def _peak_device_mb() -> float | None:
    """The accelerator's peak memory in use by this process (None on CPU, where peak RSS says it)."""
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def _compile_s(a: dict, mode: str) -> float:
    """Seconds to lower and compile one mode's train step on abstract weights and state: none are
    allocated, so a deep model costs only its compile (which scanned layers keep flat in depth)."""
    import jax

    _, _, step, trees = _step(a, mode)
    _, state, frozen = jax.eval_shape(trees)
    batch = _batch(a)
    jax.devices()  # the backend starts before the clock
    t0 = time.perf_counter()
    step.lower(state, frozen, batch).compile()
    return time.perf_counter() - t0


def _gemm_shapes(a: dict) -> list:
    """The roofline's matmul shapes for this bench's model and batch (bench_torch derives the same)."""
    return gemm_shapes(a["batch"] * a["seq"], a["hidden"], a["kv_heads"] * (a["hidden"] // a["heads"]),
                       a["mlp"], a["vocab"])


def _worker(a: dict) -> None:
    """Measure what `a["mode"]` names; print it with this process's jax, platform and devices as one JSON line."""
    import jax

    from jpeft.bench_load import LOAD_WAYS, load

    mode = a.pop("mode")
    if mode in LOAD_WAYS:
        out = load(a, mode)
    elif mode == "roofline":
        from jpeft.roofline import xla_peak
        out = {"roofline": xla_peak(_gemm_shapes(a))}
    elif mode == "compile":
        out = {"compile_s": _compile_s(a, a.pop("of"))}
    else:
        out = _measure(a, mode)
    print(json.dumps({**out, "jax": jax.__version__, "platform": jax.default_backend(),
                      "devices": [str(d) for d in jax.devices()]}))


if __name__ == "__main__":
    _worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
