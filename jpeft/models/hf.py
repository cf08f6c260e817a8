"""HF checkpoint directory <-> (module, parameter tree).

The key map is derived from the tree itself: a tree path names the HF module
(`model/layers/self_attn/q_proj/kernel` <-> `model.layers.{i}.self_attn.q_proj.weight`),
kernels are transposed, and the stacked `layers` axis is split per layer.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from functools import lru_cache, partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jpeft import tree as T
from jpeft.errors import CheckpointError, ConfigError
from jpeft.hardware import resolve_dtype
from jpeft.models import hf_experts
from jpeft.models.config import ModelConfig, read_config
from jpeft.models.families import FAMILY_FIELDS, file_name
from jpeft.models.generation_config import stop_ids
from jpeft.models.llama import GPTJ, OPT, Bloom, CausalLM, GPTNeoX
from jpeft.models.quantized_load import quantized_shapes, read_quantized
from jpeft.models.gpt2 import GPT2
from jpeft.models.t5 import T5
from jpeft.peft.base import is_conv1d, layer_names
from jpeft.peft.classifier import hf_tree

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                   "*.tiktoken", "chat_template*", "generation_config.json", "preprocessor_config.json")
# a tree leaf's name in HF: Linear/Embedding/norm weights, biases, and weights kept in HF's layout (a mixture's
# router and stacked experts)
HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias", "weight": "weight",
           # GPT-OSS's parameters of a module that holds more: attention's sinks, the experts' biases
           **{name: name for name in ("sinks", "gate_up_proj_bias", "down_proj_bias")}}
ARCHITECTURE = {"llama": "Llama", "mistral": "Mistral", "ministral": "Ministral", "ministral3": "Ministral3",
                "qwen2": "Qwen2", "qwen3": "Qwen3",
                "gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3Text", "olmo2": "Olmo2", "olmo3": "Olmo3",
                "phi3": "Phi3", "smollm3": "SmolLM3", "helium": "Helium", "exaone4": "Exaone4",
                "seed_oss": "SeedOss", "arcee": "Arcee", "glm": "Glm", "glm4": "Glm4", "olmo": "Olmo",
                "stablelm": "StableLm", "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe",
                "gpt_oss": "GptOss", "gpt_neox": "GPTNeoX", "phi": "Phi", "gptj": "GPTJ",
                "opt": "OPT", "bloom": "Bloom", "falcon": "Falcon", "starcoder2": "Starcoder2", "mpt": "Mpt",
                "gpt2": "GPT2"}  # + ForSequenceClassification
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FLOAT_FILE_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of what a weight may be stored as
HEADS = ("lm_head.", "score.")  # a task head's names, outside the base model's prefix


def family(cfg: ModelConfig) -> type[CausalLM | T5 | GPT2]:
    return {"t5": T5, "gpt2": GPT2, "gpt_neox": GPTNeoX, "gptj": GPTJ, "codegen": GPTJ, "opt": OPT, "bloom": Bloom,
            "falcon": Bloom, "mpt": GPTJ}.get(cfg.model_type, CausalLM)


def build(cfg: ModelConfig) -> CausalLM | T5 | GPT2:
    return family(cfg)(cfg)


def abstract_params(model: CausalLM):
    """Shapes of the base tree (no allocation), with logical axis metadata: a copy of the tree traced once per
    model config (loading, the trainer's shardings, the memory plan and an export each ask; a trace takes ~0.2 s
    even for a tiny model)."""
    return jax.tree.map(lambda leaf: leaf, _traced_shapes(model))


@lru_cache(maxsize=16)
def _traced_shapes(model: CausalLM):
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def hf_names(path: str, num_layers: int) -> list[str]:
    """HF tensor names for one tree leaf: one per layer when the leaf is stacked."""
    *module, leaf = path.split("/")
    if leaf not in HF_LEAF:
        raise CheckpointError(f"tree leaf '{path}' has no HF counterpart (an adapter leaf? merge first)")
    return [f"{name}.{HF_LEAF[leaf]}" for name in layer_names("/".join(module), num_layers)]


def sequence_classes(hf: dict) -> int | None:
    """The number of classes of an HF sequence-classification config; None for a causal LM."""
    if not any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
        return None
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))


def _with_score(flat: dict, hidden_size: int, num_labels: int) -> dict:
    """A sequence classifier's leaves: the base's, with HF's `score` head in place of the LM head."""
    out = {p: v for p, v in flat.items() if not p.startswith("lm_head/")}
    out["score/kernel"] = jax.ShapeDtypeStruct((hidden_size, num_labels), jnp.float32)
    return out


def transposed(path: str) -> bool:
    """Does HF store this leaf transposed? nn.Linear weights are [out, in]; GPT-2's Conv1D are [in, out]."""
    return path.endswith("/kernel") and not is_conv1d(path.rpartition("/")[0])


def hf_layout(path: str, array: np.ndarray) -> np.ndarray:
    """A leaf between jpeft's layout and HF's, either way: kernels [in, out] <-> weights [out, in]."""
    return array.T if transposed(path) else array


def _weight_index(model_dir: str, prefix: str | None, model_type: str) -> dict[str, tuple[str, str]]:
    """HF tensor name -> (safetensors file, the name it has there): model.safetensors, else the shards of
    model.safetensors.index.json (transformers' order). A weight the family's files name apart from its module
    (`families.FILE_NAMES`: GPT-NeoX's `embed_out`, EXAONE 3's every name) gets the module's name. A checkpoint saved
    from the base model (`LlamaModel`, GPT-2 as the hub holds it) names its tensors without the family's `prefix`
    (`layers.0...`, `h.0...`): they get it, as transformers' loading adds it."""
    files = _files(model_dir)
    modules = {file_name(model_type, name, reverse=True): name for name in files}
    bare = prefix and not any(module.startswith(f"{prefix}.") for module in modules)

    def name_of(module):
        return f"{prefix}.{module}" if bare and not module.startswith(HEADS) else module
    return {name_of(module): (files[name], name) for module, name in modules.items()}


def _files(model_dir: str) -> dict[str, str]:
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        try:
            with safe_open(single, "np") as f:
                return {k: single for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{single}: unreadable safetensors file ({e}); re-download or re-save it") from None
    if os.path.exists(index_path):
        return {k: os.path.join(model_dir, v) for k, v in _shards(index_path).items()}
    bins = [f for f in os.listdir(model_dir) if f.endswith(".bin")]
    hint = " (found PyTorch .bin weights: re-save them with save_pretrained(safe_serialization=True))" if bins else ""
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")


def from_pretrained(model_dir: str, dtype: str | None = None, mesh=None, keep_float32=None, quantize=None):
    """Read an HF checkpoint dir into (CausalLM module, params tree); dtype casts weights (`auto`:
    bfloat16 where the hardware has native bf16 matmuls, else float32; jpeft.hardware).

    With a `mesh`, each weight is born sharded: every device's slice is read straight from the
    safetensors file into that device (only this process's devices), so no whole copy of a
    weight ever sits on one device or host. `keep_float32`: a function of the params tree giving a
    bool tree (a method's `mask`) of leaves read in float32 whatever `dtype`, so that a base leaf
    about to be trained starts from the checkpoint's own values, not from their bf16 rounding.
    `quantize`: a `jpeft.QLoRA`, whose quantized leaves are read as its codes a layer at a time
    (`quantized_load`), so the float base is never on the devices whole; `method.init` then adds LoRA's.
    """
    if not os.path.isdir(model_dir):
        what = "is a file, not a" if os.path.isfile(model_dir) else "no such"
        raise CheckpointError(f"{model_dir}: {what} model directory (a Hugging Face checkpoint dir with config.json)")
    dtype = resolve_dtype(dtype)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)} or auto")
    cfg = read_config(os.path.join(model_dir, "config.json"))
    if quantized := cfg.hf_config.get("quantization_config"):
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        if not (method == "mxfp4" and cfg.model_type in hf_experts.IN_OUT_TYPES):  # gpt-oss's experts: read dequantized
            raise CheckpointError(f"{model_dir}: config.json holds a quantization_config (quant_method {method}); jpeft "
                                  "reads float weights only (and GPT-OSS's MXFP4 experts): load the unquantized "
                                  "checkpoint (jpeft.QLoRA quantizes the base itself) or dequantize and re-save it")
    cfg = cfg.replace(eos_token_ids=stop_ids(model_dir, cfg.hf_config))
    if dtype == "bfloat16":
        cfg = cfg.replace(dtype="bfloat16")
    index = _weight_index(model_dir, family(cfg).base_prefix, cfg.model_type)
    own_head = cfg.tie_word_embeddings and _own_head(index, hf_names(family(cfg).embedding_path, 1)[0])
    if cfg.is_encoder_decoder:  # T5's head is the shared embedding unless the file holds a head of its own
        # (as transformers: none at all, or a tied config's exact copy of the embedding, is the embedding)
        cfg = cfg.replace(tie_word_embeddings="lm_head.weight" not in index or cfg.tie_word_embeddings and not own_head)
    elif own_head:
        log.warning("%s: config.json ties the LM head to the token embedding, but the weights hold an "
                    "lm_head.weight of their own that differs from it; using it, as transformers does (set "
                    "tie_word_embeddings to false in config.json to silence this)", model_dir)
        cfg = cfg.replace(tie_word_embeddings=False)
    model = build(cfg)
    abstract = abstract_params(model)
    expected = T.flatten(nn.meta.unbox(abstract))
    if classes := sequence_classes(cfg.hf_config):
        expected = _with_score(expected, cfg.hidden_size, classes)
    target = DTYPES[dtype] if dtype else jnp.float32
    exact = T.flatten(keep_float32(T.unflatten(expected))) if keep_float32 else {}
    quantizes = (lambda path: False) if quantize is None else quantize.quantizes  # noqa: E731
    shardings = None
    if mesh is not None:  # the quantized leaves' too, as their weights' would lie
        from jpeft.parallel.mesh import param_shardings
        codes = {p: s for path, spec in expected.items() if quantizes(path)
                 for p, s in quantized_shapes(quantize, path, spec.shape, target).items()}
        shardings = T.flatten(param_shardings(T.unflatten({**expected, **codes}), abstract, mesh))
    handles: dict[str, object] = {}
    flat = {}
    try:
        for path, spec in expected.items():
            names = hf_names(path, spec.shape[0] if T.is_stacked(path) else 1)
            parts = [_open(index, name, cfg, handles, model_dir) for name in names]
            for name, part in zip(names, parts):
                if part.get_dtype() not in FLOAT_FILE_DTYPES:
                    raise CheckpointError(f"{model_dir}: weight '{name}' is stored as {part.get_dtype()}, not as "
                                          "floats; jpeft reads float32, float16 or bfloat16 checkpoints (dequantize "
                                          "it first)")
            shape = ((len(parts),) if T.is_stacked(path) else ()) + _tree_shape(path, parts[0].get_shape())
            if shape != spec.shape:
                raise CheckpointError(
                    f"{model_dir}: weight for '{path}' has shape {shape}, config.json implies {spec.shape}")
            read = partial(_read_slice, path, parts)
            leaf_dtype = jnp.float32 if exact.get(path) else target
            if quantizes(path):
                flat.update(read_quantized(quantize, path, spec.shape, leaf_dtype, read, shardings))
            elif mesh is None:
                flat[path] = jnp.asarray(read(()), leaf_dtype)
            else:
                flat[path] = jax.make_array_from_callback(
                    spec.shape, shardings[path], lambda i, read=read, t=leaf_dtype: read(i).astype(t))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{model_dir}: unreadable safetensors file ({e}); re-download or re-save it") from None
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return model, T.unflatten(flat)


def _own_head(index: dict, embedding: str) -> bool:
    """Does the checkpoint hold an lm_head.weight that is not its token embedding `embedding` (which
    transformers then loads untied, whatever config.json says)?"""
    if "lm_head.weight" not in index or embedding not in index:
        return False
    try:
        (head_file, head), (table_file, table) = index["lm_head.weight"], index[embedding]
        with safe_open(head_file, "np") as f, safe_open(table_file, "np") as g:
            return not np.array_equal(f.get_tensor(head), g.get_tensor(table))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{index['lm_head.weight'][0]}: unreadable safetensors file ({e}); re-download or "
                              "re-save it") from None


def _open(index: dict, name: str, cfg: ModelConfig, handles: dict, model_dir: str):
    """A safetensors slice of HF tensor `name`: the file's own, or a mixture's experts stacked from their parts
    (`hf_experts`)."""
    parts = [[name]] if name in index else (hf_experts.file_parts(name, cfg.model_type, cfg.num_experts, index)
                                            or [[name]])
    for part in [p for expert in parts for p in expert]:
        if part not in index:
            raise CheckpointError(f"{model_dir}: weight '{part}' is missing from the checkpoint")
        if (file := index[part][0]) not in handles:
            handles[file] = safe_open(file, "np").__enter__()
    opened = [[handles[index[p][0]].get_slice(index[p][1]) for p in expert] for expert in parts]
    return hf_experts.reader(name, cfg.model_type, opened)


def _tree_shape(path: str, hf_shape) -> tuple:
    return tuple(reversed(hf_shape)) if transposed(path) else tuple(hf_shape)


def _shards(index_path: str) -> dict[str, str]:
    """The weight map of a sharded checkpoint's index: tensor name -> shard file name."""
    try:
        with open(index_path) as f:
            return json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: malformed index ({e}); re-save the checkpoint") from None


def _read_slice(path: str, parts: list, index: tuple) -> np.ndarray:
    """The tree-layout slice `index` of a leaf, reading only that part of each HF tensor."""
    stacked = T.is_stacked(path)
    index = tuple(index) + (slice(None),) * (len(parts[0].get_shape()) + stacked - len(index))
    layers, within = (parts[index[0]], index[1:]) if stacked else (parts, index)
    if transposed(path):  # HF stores [out, in]
        arrays = [part[tuple(reversed(within))].T for part in layers]
    else:
        arrays = [part[within] for part in layers]
    return np.stack(arrays) if stacked else arrays[0]


def save_pretrained(out_dir: str, model: CausalLM, params, tokenizer_from: str | None = None,
                    config: dict | None = None, dtype: str | None = None) -> None:
    """Write an HF dir (config.json + model.safetensors) that transformers loads as-is.

    `params` must be a plain tree (use `jpeft.merge` first); one with a classification head is
    written as HF's *ForSequenceClassification (class names LABEL_i and the tokenizer's pad id unless
    the base or `config` gives them). `config`: fields set in config.json (a classifier's `id2label`,
    `pad_token_id`). Tokenizer files are copied from `tokenizer_from` (a dir) when given. Every weight is
    written in one dtype, config.json's, which transformers loads the whole model in: `dtype`, else the dtype
    most parameters have (a float32 merge or trained head on a bf16 base is rounded to bf16, with a warning).
    """
    params = hf_tree(params)
    hf = {**_config_holding(model.config, params), **(config or {})}
    if "score" in params and hf.get("pad_token_id") is None and tokenizer_from:  # HF's pooling needs it past batch 1
        from jpeft.data import pad_id
        hf["pad_token_id"] = pad_id(load_tokenizer(tokenizer_from))
    if "score" in params and hf.get("pad_token_id") is None:
        log.warning("%s: the classifier's config has no pad_token_id, so transformers runs it on one row at a "
                    "time only; pass tokenizer_from or config={'pad_token_id': ...}", out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    flat = {path: np.asarray(jax.device_get(value)) for path, value in T.flatten(params).items()}
    stored = _one_dtype(flat, dtype, out_dir)
    for path, array in flat.items():
        array = array.astype(stored, copy=False)
        parts = list(array) if T.is_stacked(path) else [array]
        names = [file_name(model.config.model_type, name) for name in hf_names(path, len(parts))]
        for name, part in zip(names, parts):
            tensors.update(hf_experts.split(name, np.ascontiguousarray(hf_layout(path, part)), model.config.model_type))
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):  # a sharded checkpoint saved there before: its shards are stale now
        for shard in set(_shards(index_path).values()):
            if os.path.exists(stale := os.path.join(out_dir, shard)):
                os.remove(stale)
        os.remove(index_path)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf["torch_dtype"] = hf["dtype"] = str(jnp.dtype(stored))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer_from:
        copy_tokenizer(tokenizer_from, out_dir)


def _one_dtype(flat: dict, dtype: str | None, out_dir: str):
    """The dtype a checkpoint is written in: `dtype`, else the one most parameters have, saying what it rounds."""
    sizes: dict = {}
    for array in flat.values():
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise CheckpointError(f"{out_dir}: a {array.dtype} weight is no checkpoint weight (a quantized base? "
                                  "merge first)")
        sizes[array.dtype] = sizes.get(array.dtype, 0) + array.size
    stored = jnp.dtype(dtype) if dtype else max(sizes, key=sizes.get)
    rounded = {str(d): n for d, n in sizes.items() if jnp.finfo(d).bits > jnp.finfo(stored).bits}
    if rounded and not dtype:
        log.warning("%s: %s parameters rounded to %s, the dtype of the rest (transformers loads a checkpoint in "
                    "one dtype); pass dtype= to keep them", out_dir,
                    ", ".join(f"{n:,} {d}" for d, n in rounded.items()), stored)
    return stored


def has_classifier(model_type: str) -> bool:
    """Does transformers have a *ForSequenceClassification model of this family (Granite has none)?"""
    return model_type in ARCHITECTURE


def _config_holding(cfg: ModelConfig, params) -> dict:
    """config.json for `params`: biases BitFit added switch on `attention_bias` / `mlp_bias` where the family's
    config has them (Llama both; Qwen3 and Gemma the first);
    anything else the family's config cannot hold is an error, never a silently dropped tensor."""
    hf, leaves = cfg.to_hf(), set(T.flatten(params))
    hf.pop("quantization_config", None)  # every weight is written as floats (GPT-OSS's MXFP4 experts dequantized)
    if not cfg.is_encoder_decoder:  # a head untied on load (its own lm_head.weight) is saved as untied
        hf["tie_word_embeddings"] = cfg.tie_word_embeddings
    for flag, modules in (("attention_bias", ("q_proj", "k_proj", "v_proj", "o_proj")),
                          ("mlp_bias", ("gate_proj", "up_proj", "down_proj"))):
        modules = tuple(map(cfg.module_name, modules))
        if cfg.model_type in FAMILY_FIELDS[flag] and any(p.endswith(f"{m}/bias") for p in leaves for m in modules):
            hf[flag] = True
    expected = T.flatten(nn.meta.unbox(abstract_params(build(
        ModelConfig.from_hf(hf).replace(tie_word_embeddings=cfg.tie_word_embeddings)))))
    if "score/kernel" in leaves:
        if not has_classifier(cfg.model_type):
            raise CheckpointError(f"transformers has no sequence classifier for {cfg.model_type} models; save the "
                                  "classifier with jpeft.save_adapter, which writes jpeft's own adapter dir")
        labels = np.shape(T.flatten(params)["score/kernel"])[-1]
        hf["architectures"] = [ARCHITECTURE[cfg.model_type] + "ForSequenceClassification"]
        if len(hf.get("id2label") or ()) != labels:  # transformers sizes the head by them (2 without)
            names = [f"LABEL_{i}" for i in range(labels)]
            hf.update(id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})
        expected = _with_score(expected, cfg.hidden_size, labels)
    if leaves != set(expected):
        odd = sorted(leaves ^ set(expected))
        if biases := sorted({p.split("/")[-2] for p in leaves - set(expected)
                             if p.endswith("/bias")}):
            raise CheckpointError(f"transformers' {cfg.model_type} has no biases on {', '.join(biases)} (its "
                                  "config.json has no switch for them), so a checkpoint cannot hold these; keep "
                                  "BitFit's adapter dir, or train BitFit on projections the family has biases for")
        raise CheckpointError(f"the tree does not fit a {cfg.model_type} checkpoint: {', '.join(odd[:4])}"
                              f"{' ...' if len(odd) > 4 else ''} (merge adapters first; biases must cover all "
                              "attention or all MLP projections)")
    return hf


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{model_dir}: no usable tokenizer files ({e}); "
                          "copy the base model's tokenizer files into it") from None


def copy_tokenizer(src_dir: str, dst_dir: str) -> None:
    """Copy the tokenizer's files and the generation config from an HF dir, and nothing else: weights in other
    formats (`flax_model.msgpack`) or a trainer's state (`optimizer.pt`) there belong to the source model."""
    if os.path.abspath(src_dir) == os.path.abspath(dst_dir):
        return
    for name in os.listdir(src_dir):
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and any(fnmatch.fnmatch(name, pattern) for pattern in TOKENIZER_FILES):
            shutil.copy2(src, os.path.join(dst_dir, name))


