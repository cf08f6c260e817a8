"""Per-device memory of a fine-tuning run, planned from config.json alone: no weights read, no devices needed.

Parameters and optimizer state are exact: every leaf is measured as the shard that
`jpeft.parallel.mesh.param_shardings` would give it (logical axes through `RULES`, a dimension
the mesh axes do not divide stays whole), from the mesh's axis sizes only. Gradients count the
trainable leaves twice in float32: the micro-batch's gradient and the running sum it joins.

Activations count what the train step keeps live at its peak, per device, with b = micro-batch
rows per device (train.batch_size / (data x fsdp)), t = train.seq_len, s = bytes of model.dtype,
and heads, kv heads, MLP width and vocab split over `tensor`:

- the batch: grad_accum x b x t x 16 bytes (ids, labels, attention mask, loss weights);
- every layer's residuals for the backward pass (the layers run under one scan, so all of them
  are live when it starts), per token of a layer:
    remat none: the attention probabilities once, in s (`attention.attention_values`), over the keys each
      query block attends to (`attention.causal_keys`), 4 MLP-wide tensors (a mixture of experts: its router's
      logits and their float32 softmax, and for each of a token's k experts its input row, gate/up, activation
      and output; a shared expert as 4 of its width), q, k, v, 2 hidden-wide ones; and
      for what trains: down_proj's and o_proj's inputs, 4 more hidden-wide for trained norm scales, 2
      rank-wide per LoRA pair (per VeRA pair one, and its output-wide product, which λ_b's gradient
      reads); under the model's own dropout, `DROPOUT_BYTES` per attention probability
      and per element of its two dropped hidden-wide outputs (the attention's and the MLP's);
    remat dots: the layer input and every projection's output (LoRA's x·A and delta too);
    remat full: the layer input;
- plus the larger of two working sets: one layer's backward (`BACKWARD_WORKING_SET` multiples of
  its attention scores in float32 (plus a copy in s when s is not 4 bytes), of its unrematerialised
  residuals and of its LoRA-adapted projections' widths, plus its weights in
  s, gathered over fsdp (`FSDP_WEIGHT_COPIES`) or dequantized whole (QLoRA), plus under fsdp its
  trained weights' whole float32 gradient, plus `REBUILT_COPIES` float32 copies of each weight LoHa, LoKr, OFT or HRA rebuilds), or one chunk of the loss (float32 logits and their
  gradient, the LM head gathered twice under fsdp, the final hidden state and its gradient);
- under fsdp, a trained LM head's whole float32 gradient, which the loss keeps to the end.

The counts and multiples were fitted to XLA's buffer assignment of the real compiled step (CPU
backend, float32: tests/parallel/test_plan.py's small Llama on meshes of 8 fake devices, within 7% (VeRA on
every projection: 6%; its terms were fitted on q/v and all-linear targets, 8x1x1 and 2x2x2: 0.98-1.06; LoHa
on every projection 8x1x1: 1.00, on q/v 2x2x2: 0.93; LoKr on every projection 2x2x2: 0.96; OFT's R·W on every
projection 8x1x1: 1.01; HRA on q/v 2x2x2: 0.93),
which the test checks within 15%; and the bench's 58.6M-parameter Llama on one device, LoRA and
full at 8 x 256 tokens and LoRA at 2 x 1024, within 16%). A mixture's experts are counted as grouped
products, as GPU and TPU run them; XLA:CPU multiplies each row by every expert and keeps those products in the
backward, 1.4x the plan for the test's small Qwen2-MoE. bfloat16 counts the
same tensors at 2 bytes except those the model computes in float32; XLA's CPU backend, which
computes bfloat16 arithmetic in float32, keeps more than that.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jpeft import tree as T
from jpeft.config import RunConfig
from jpeft.errors import ConfigError
from jpeft.models.config import read_config
from jpeft.hardware import resolve_dtype
from jpeft.models.hf import DTYPES, abstract_params, build, family
from jpeft.models.attention import causal_keys
from jpeft.parallel.mesh import MESH_AXES, axis_size, fitted_spec, logical_axes, mesh_shape
from jpeft.peft.registry import REBUILT_WEIGHTS
from jpeft.train.loss import CHUNK
from jpeft.train.build import build_method, build_optimizer, run_init, run_model_config, train_mask

BATCH_BYTES_PER_TOKEN = 16  # input_ids, labels, attention_mask (int32) and loss_mask (float32)
# The model's own dropout (GPT-2's, T5's), fitted to XLA as below (tests/parallel/test_plan.py's GPT-2 at 64 and
# 128 tokens: 14.1 and 5.7): bytes per attention probability and per element of a dropped hidden-wide output,
# its mask and the random bits it is drawn from.
DROPOUT_BYTES = (14, 6)
FSDP_WEIGHT_COPIES = 1.5  # a layer's weights gathered over fsdp: XLA keeps part of them twice in the backward
REBUILT_COPIES = 3  # float32 [in, out] buffers per weight a method rebuilds (LoHa, LoKr, OFT, HRA) in a layer's backward: the weight, its gradient, a factor's product
# One layer's backward working set per remat policy, fitted to XLA: multiples of its attention scores'
# float32 bytes (their gradient, and a copy in the compute dtype when it is not float32), of its
# residuals, and of the input + output widths of its LoRA-adapted projections (their delta path); a
# rematerialised layer recomputes what it needs first.
BACKWARD_WORKING_SET = {"none": (1.1, 0.3, 1.2), "dots": (1.5, 0.6, 0.8), "full": (1.0, 1.1, 1.3)}
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclasses.dataclass
class Plan:
    """Bytes per device of one train step at its peak; `max_batch_size` answers `device_memory`."""
    frozen: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    mesh: dict
    batch_size: int
    seq_len: int
    grad_accum: int
    remat: str
    dtype: str
    method: str
    device_memory: int | None = None
    max_batch_size: int | None = None  # a multiple of data x fsdp; 0 when not even that fits

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.gradients + self.optimizer + self.activations

    @property
    def batch_granularity(self) -> int:
        return self.mesh["data"] * self.mesh["fsdp"]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total, "batch_granularity": self.batch_granularity}


def shard_shape(shape: tuple, axes: tuple, sizes: dict) -> tuple:
    """The per-device shape of a leaf with logical `axes` on a mesh of axis `sizes` (as `param_shardings` lays it)."""
    spec = fitted_spec(shape, axes, sizes)
    return tuple(dim // (1 if ax is None else axis_size(ax, sizes)) for dim, ax in zip(shape, spec))


def parse_size(text: str) -> int:
    """'16GiB', '95GB', '80e9', '512 MiB' -> bytes (k/M/G/T powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    size = float(found.group(1)) * UNITS.get(found.group(2), math.nan) if found else math.nan
    if not math.isfinite(size):
        raise ConfigError(f"device memory {text!r} is not a size; write e.g. 16GiB, 95GB or 80e9 (bytes)")
    return int(size)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plan(cfg: RunConfig, devices: int, device_memory: int | None = None) -> Plan:
    """The per-device memory of training `cfg` on `devices` devices; with `device_memory` (bytes)
    also the largest train.batch_size (a multiple of data x fsdp) whose step fits in it."""
    if not cfg.model.path:
        raise ConfigError("model.path must be set (a directory with the model's config.json)")
    sizes = mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
    ways = sizes["data"] * sizes["fsdp"]
    tc = cfg.train
    if tc.batch_size % ways:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the {ways} data-parallel "
                          f"devices (mesh.data x mesh.fsdp)")
    dtype_name = resolve_dtype(cfg.model.dtype)  # auto: as on this machine (configs for others name theirs)
    model_cfg = run_model_config(cfg, read_config(os.path.join(cfg.model.path, "config.json"))).replace(
        dtype=dtype_name)
    abstract = abstract_params(build(model_cfg))
    dtype = DTYPES[dtype_name]
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), nn.meta.unbox(abstract))
    method = build_method(cfg)
    params = jax.eval_shape(run_init(method, cfg.method.modules_to_save), jax.random.key(0), base)
    axes, mask = logical_axes(params, abstract), train_mask(method, cfg.method.modules_to_save, params)
    shards = T.map_with_path(lambda p, x: shard_shape(x.shape, axes[p], sizes), params)
    trainable, frozen = T.partition(params, mask)
    trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)
    trainable_sizes = jax.tree.map(math.prod, T.partition(shards, mask)[0], is_leaf=lambda x: isinstance(x, tuple))

    def nbytes(tree) -> int:
        flat = T.flatten(shards)
        return sum(math.prod(flat[p]) * x.dtype.itemsize for p, x in T.flatten(tree).items())

    optimizer = build_optimizer(cfg, method, trainable, frozen)
    moments = optax.tree_map_params(optimizer, lambda s, size: size * s.dtype.itemsize,
                                    jax.eval_shape(optimizer.init, trainable), trainable_sizes,
                                    transform_non_params=lambda s: s.size * s.dtype.itemsize)
    trained = nbytes(trainable)
    activations = _Activations(cfg, model_cfg, params, mask, abstract, axes, sizes)
    result = Plan(frozen=nbytes(frozen), trainable=trained, gradients=2 * trained,
                  optimizer=int(sum(jax.tree.leaves(moments))), activations=activations(tc.batch_size),
                  mesh=sizes, batch_size=tc.batch_size, seq_len=tc.seq_len, grad_accum=tc.grad_accum,
                  remat=cfg.model.remat, dtype=dtype_name, method=cfg.method.name)
    if device_memory is not None:
        fixed = result.total - result.activations
        result.device_memory = device_memory
        result.max_batch_size = _largest_batch(lambda b: fixed + activations(b) <= device_memory, ways)
    return result


class _Activations:
    """Activation bytes per device as a function of train.batch_size (see the module docstring)."""

    def __init__(self, cfg: RunConfig, model_cfg, params, mask, abstract, axes: dict, sizes: dict):
        tp = sizes["tensor"]
        split = lambda n: n // tp if n % tp == 0 else n  # noqa: E731  (where tp does not divide it, replicated)
        self.layers, self.seq, self.hidden, self.head_dim = (model_cfg.num_layers, cfg.train.seq_len,
                                                             model_cfg.hidden_size, model_cfg.head_dim)
        self.heads, self.kv, self.mlp, self.vocab = (split(model_cfg.num_heads), split(model_cfg.num_kv_heads),
                                                     split(model_cfg.intermediate_size), split(model_cfg.vocab_size))
        self.itemsize = jnp.dtype(model_cfg.dtype).itemsize
        # the MLP's widths per token, kept without remat and as its products' outputs (remat dots): a mixture's
        # are its router's logits (and their float32 softmax), each of a token's k expert rows' input, gate/up,
        # activation and output, and a shared expert's (or MLP's) as a dense MLP's
        k, experts = model_cfg.experts_per_token, model_cfg.num_experts
        shared = split(model_cfg.shared_expert_size or model_cfg.shared_mlp_size)
        self.mlp_residuals, self.mlp_outputs = ((k * (3 * self.mlp + 2 * self.hidden) + 2 * experts + 4 * shared,
                                                 k * (2 * self.mlp + self.hidden) + experts + 2 * shared)
                                                if experts else (4 * self.mlp, 2 * self.mlp))
        self.remat, self.accum, self.fsdp = cfg.model.remat, cfg.train.grad_accum, sizes["fsdp"]
        rates = model_cfg.dropout_rates
        self.probability_masks, self.output_masks = "attention_dropout" in rates, 2 * ("residual_dropout" in rates)
        self.ways = sizes["data"] * sizes["fsdp"]
        gathered = {**sizes, "fsdp": 1}  # a weight as the layer computing with it holds it
        layer = {m: leaves for m, leaves in T.modules(params).items() if T.is_stacked(m + "/leaf")}
        trains = {m.rsplit("/", 1)[-1] for m, leaves in T.modules(mask).items() if any(leaves.values())}
        self.o_trains, self.down_trains = (model_cfg.module_name(m) in trains for m in ("o_proj", "down_proj"))
        self.norms_train = any(model_cfg.module_name(m) in trains
                               for m in ("input_layernorm", "post_attention_layernorm"))
        self.lora = [(leaves[a].shape[-1],  # (rank, input width, output width) per adapted projection
                      shard_shape(leaves[a].shape, axes[f"{m}/{a}"], gathered)[-2],
                      shard_shape(leaves[b].shape, axes[f"{m}/{b}"], gathered)[-1])
                     for a, b in (("lora_a", "lora_b"), ("vera_a", "vera_b")) for m, leaves in layer.items() if a in leaves]
        # what VeRA keeps beyond a LoRA pair's two rank-wide products: one of them, and its output-wide product,
        # which λ_b's gradient reads (widths per token)
        self.vera_widths = sum(shard_shape(leaves["vera_b"].shape, axes[m + "/vera_b"], gathered)[-1]
                               - leaves["vera_b"].shape[-2] for m, leaves in layer.items() if "vera_b" in leaves)
        # LoHa's, LoKr's, OFT's and HRA's weight is rebuilt whole, [in, out], and differentiated in each layer's backward
        self.rebuilt_weights = sum(math.prod(shard_shape(leaves["kernel"].shape, axes[m + "/kernel"], gathered)[-2:])
                                   for m, leaves in layer.items() if any(r.present(leaves) for r in REBUILT_WEIGHTS))
        flat = T.flatten(nn.meta.unbox(abstract))
        base_axes = T.flatten(nn.get_partition_spec(abstract))
        held, trains_leaf = T.flatten(params), T.flatten(mask)
        stacked = [p for p in flat if T.is_stacked(p)]
        # a layer's weights as it computes with them, in s: gathered over fsdp, or dequantized whole from
        # their codes (QLoRA; the codes themselves are sharded as the kernels), per layer
        self.layer_weights = sum(math.prod(shard_shape(flat[p].shape, tuple(base_axes[p]), gathered))
                                 for p in stacked if p in held) // self.layers * self.itemsize
        self.dequantized = sum(flat[p].size for p in stacked if p not in held) // self.layers * self.itemsize
        head = family(model_cfg).embedding_path if model_cfg.tie_word_embeddings else "lm_head/kernel"
        head_gathered = shard_shape(flat[head].shape, tuple(base_axes[head]), gathered)
        split_by_fsdp = head_gathered != shard_shape(flat[head].shape, tuple(base_axes[head]), sizes)
        self.head_copies = 2 * math.prod(head_gathered) * self.itemsize if split_by_fsdp else 0
        # under fsdp a trained weight's gradient is whole (over fsdp) until reduce-scattered: the layer's
        # in flight, and the head's, which the loss computes in the forward pass and keeps to the end
        trained = {p: x for p, x in held.items() if trains_leaf[p]} if self.fsdp > 1 else {}
        self.layer_gradient = sum(math.prod(shard_shape(x.shape, axes[p], gathered)) * 4
                                  for p, x in trained.items() if T.is_stacked(p)) // self.layers
        self.head_gradient = math.prod(head_gathered) * 4 if head in trained else 0

    def residuals_per_row(self) -> int:
        """Bytes one sequence leaves behind in one layer for the backward pass, under the run's remat."""
        t, d, s = self.seq, self.hidden, self.itemsize
        if self.remat == "full":
            return t * d * s
        if self.remat == "dots":
            outputs = 3 * d + (self.heads + 2 * self.kv) * self.head_dim + self.mlp_outputs
            return t * s * (outputs + sum(r + out for r, _, out in self.lora))
        probabilities, widths, trained = self.unrematerialised()
        return probabilities + t * s * (widths + trained)

    def unrematerialised(self) -> tuple[int, int, int]:
        """One layer's residuals per sequence without remat: (attention probabilities and dropout masks in
        bytes, the widths of the tensors kept whatever trains, those kept for what trains) -- widths per
        token, in elements."""
        t, s = self.seq, self.itemsize
        widths = self.mlp_residuals + self.heads * self.head_dim + 2 * self.kv * self.head_dim + 2 * self.hidden
        trained = (self.down_trains * self.mlp + self.o_trains * self.heads * self.head_dim
                   + 4 * self.norms_train * self.hidden + 2 * sum(r for r, _, _ in self.lora) + self.vera_widths)
        per_probability, per_output = DROPOUT_BYTES
        masks = (self.heads * causal_keys(t) * per_probability * self.probability_masks
                 + t * self.hidden * per_output * self.output_masks)
        return self.heads * causal_keys(t) * s + masks, widths, trained

    def __call__(self, batch_size: int) -> int:
        rows, t, s = batch_size // self.ways, self.seq, self.itemsize
        span = max(1, min(t, CHUNK // rows))  # each device's loss chunks hold about CHUNK of its tokens
        _, widths, _ = self.unrematerialised()
        scores = self.heads * causal_keys(t) * (8 + (s if s != 4 else 0))  # float32 scores and their gradient (+ a copy in s)
        adapted = sum(d_in + d_out for _, d_in, d_out in self.lora)
        a, b, c = BACKWARD_WORKING_SET[self.remat]
        layer_backward = (rows * (a * scores + t * s * (b * widths + c * adapted))
                          + (FSDP_WEIGHT_COPIES if self.fsdp > 1 else 1) * self.layer_weights + self.dequantized
                          + self.layer_gradient + REBUILT_COPIES * 4 * self.rebuilt_weights)
        loss_chunk = 2 * rows * span * self.vocab * 4 + self.head_copies + 2 * rows * t * self.hidden * s
        return int(self.accum * rows * t * BATCH_BYTES_PER_TOKEN + self.layers * rows * self.residuals_per_row()
                   + self.head_gradient + max(layer_backward, loss_chunk))


def _largest_batch(fits, step: int) -> int:
    """The largest multiple of `step` that fits while the next one does not (0: not even `step`)."""
    if not fits(step):
        return 0
    low, high = step, 2 * step
    while fits(high):
        low, high = high, 2 * high
    while high - low > step:
        mid = (low + high) // 2 // step * step
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def format_plan(p: Plan) -> str:
    """A table of the plan in human units."""
    mesh = " x ".join(f"{axis} {p.mesh[axis]}" for axis in MESH_AXES)
    rows = [("frozen params", p.frozen), ("trainable params", p.trainable), ("gradients", p.gradients),
            ("optimizer state", p.optimizer), ("activations", p.activations)]
    lines = [f"{p.method} · {p.dtype} · remat {p.remat} · mesh {mesh} ({math.prod(p.mesh.values())} devices)",
             f"train.batch_size {p.batch_size} ({p.batch_size // p.batch_granularity} per device) x seq_len "
             f"{p.seq_len}, grad_accum {p.grad_accum}", "", f"{'per device':<18}{'bytes':>12}"]
    lines += [f"{name:<18}{format_bytes(n):>12}" for name, n in rows]
    lines += [f"{'-' * 30}", f"{'total':<18}{format_bytes(p.total):>12}"]
    if p.device_memory is not None:
        lines.append("")
        if p.max_batch_size:
            lines.append(f"largest train.batch_size in {format_bytes(p.device_memory)}: {p.max_batch_size} "
                         f"(a multiple of data x fsdp = {p.batch_granularity})")
        else:
            lines.append(f"train.batch_size {p.batch_granularity} (data x fsdp) does not fit in "
                         f"{format_bytes(p.device_memory)}; try model.remat=full, a larger mesh.fsdp or "
                         "mesh.tensor, or a shorter train.seq_len")
    return "\n".join(lines)
