"""Shared fixtures: tiny random HF checkpoints built with transformers (the PyTorch reference)."""
from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity with PyTorch's float32 on any backend (JAX's default is TF32 on NVIDIA GPUs), as the CLI sets it.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "float32")
SESSION_CACHE = None  # the compile cache folder this process made, if it made one
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One persistent compile cache for the session's processes (xdist workers and the CLIs tests start
    # inherit it), in a temporary folder removed at the end (`pytest_unconfigure`), never ~/.cache: tests
    # compile the same tiny programs again and again. Every compile is kept, however quick, and the size
    # is not limited: with a limit jax sizes the whole folder at every write (~6,000 entries here; the suite
    # took 25 min instead of 15). Unlocked, a worker might read an entry another is still writing: jax
    # then fails to decompress it, warns and compiles.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = SESSION_CACHE = tempfile.mkdtemp(prefix="jpeft-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # on a GPU each xdist worker would take 75% of it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models compile far longer than they run: with LLVM's optimizations off (XLA's HLO passes still run,
# and no fast math either way) the suite took 1,104 s instead of 1,718 s, and 909 s with the session's
# compile cache (2-core Intel Xeon). XLA:CPU's newer fusion emitters compile a tiny Llama's forward pass and
# LoRA gradient 2.5x slower than the loop emitters before them (0.93 s against 0.35 s, AMD Zen 4). Subprocesses
# inherit the flags; a test that adds flags appends them.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for flag in FAST_COMPILE:
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

import pytest  # noqa: E402


def _torch_one_thread():
    """The PyTorch references run on one thread: their tiny ops are ~100x slower on two threads that
    contend with each other and with JAX's (3 s instead of 0.03 s for a 12-token generate here)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def pytest_unconfigure(config):
    if SESSION_CACHE:  # this process made it (the controller, or a run without xdist)
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


def pytest_collection_finish(session):
    _torch_one_thread()  # the test modules that use PyTorch have imported it by now


def _drop_jax_caches():
    import gc

    import jax
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Each test module ends by dropping JAX's compiled programs. Every executable a jit cache holds keeps
    a few memory maps, and the suite compiles thousands: in one process they passed the kernel's limit
    (vm.max_map_count, 65,530) and XLA crashed mid-compile with a segfault."""
    yield
    _drop_jax_caches()


MAPS = "/proc/self/maps"
MAP_BUDGET = 30_000  # under half the kernel's default limit: a test compiles far fewer programs than that


@pytest.fixture(autouse=True)
def _drop_compiled_programs_near_the_map_limit():
    """... and within a module too, after any test that leaves this process with more memory maps than
    MAP_BUDGET (tests/peft/test_peft_parity.py alone passed the limit)."""
    yield
    if os.path.exists(MAPS):
        with open(MAPS) as f:
            if f.read().count("\n") > MAP_BUDGET:
                _drop_jax_caches()


TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# One tiny config per family beyond Llama/Mistral/Qwen2, with each family's own features switched on.
FAMILIES = {
    "qwen3": dict(head_dim=16),
    # EXAONE 3/3.5: a Llama to transformers 5 (and PEFT), its hub files named GPT-2-like (transformer.h.0.attn.attention
    # .q_proj, mlp.c_fc_0, ln_1, ...), which transformers renames on loading and back on saving; biases where asked
    "exaone": dict(attention_bias=True, mlp_bias=True),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=0.05,
                   final_logit_softcapping=0.5),
    "gemma3_text": dict(head_dim=8, sliding_window=4),
    "granite": dict(embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0),
    "olmo2": dict(attention_bias=True),
    "olmo3": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(partial_rotary_factor=0.5),  # fused qkv_proj and gate_up_proj, RoPE on half of each head
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=2),  # no RoPE in every other layer
    "ministral": dict(head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    # Ministral 3: YaRN, and queries scaled past each multiple of the original length (4 here, so a test row passes
    # several; Llama 4's attention temperature)
    "ministral3": dict(head_dim=8, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=4, beta_fast=32.0,
        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.5)),
    "seed_oss": dict(head_dim=8, attention_out_bias=True),  # o_proj's bias beside q/k/v's
    "ernie4_5": dict(head_dim=8, use_bias=True),  # RoPE over neighbouring dimensions, a bias on every projection
    "helium": dict(head_dim=8, attention_bias=True),
    "exaone4": dict(num_hidden_layers=4, sliding_window=4, sliding_window_pattern=2),
    "arcee": dict(mlp_bias=True),  # up_proj without a gate
    "glm": dict(head_dim=16),  # gate_up_proj, RoPE over neighbouring dimensions of half of each head, q/k/v biases
    "glm4": dict(head_dim=16),  # + norms after attention and the MLP
    "olmo": dict(attention_bias=True, clip_qkv=0.5),  # LayerNorms that learn nothing
    # LayerNorms that learn a scale (and one per head and dimension over each head's queries and keys), a parallel
    # block, RoPE over neighbouring dimensions, scaled logits
    "cohere": dict(logit_scale=0.25, use_qk_norm=True),
    "cohere2": dict(num_hidden_layers=4, sliding_window=4, sliding_window_pattern=2),  # RoPE in sliding layers alone
    "stablelm": dict(use_qkv_bias=True, use_parallel_residual=True),  # biased LayerNorms, RoPE on a quarter of a head
    # GPT-NeoX: q/k/v fused by heads, a parallel block with a norm for each branch, RoPE on half of each head, biased
    # LayerNorms, an ungated GELU MLP, the head `embed_out` in its files (no GQA field: None drops TINY's)
    "gpt_neox": dict(num_key_value_heads=None, rotary_pct=0.5),
    # Phi (phi-1/1.5/2): biases everywhere, the head's too, one LayerNorm for a parallel block, RoPE on half of each
    # head, an ungated GELU MLP (fc1, fc2), each head's queries and keys through a LayerNorm of its own
    "phi": dict(qk_layernorm=True),
    # GPT-J: Phi's parallel block with RoPE over neighbouring dimensions of part of each head (rotary_dim), no
    # attention biases, a biased head; GPT-2's names for the top modules (no GQA field: None drops TINY's)
    "gptj": dict(num_key_value_heads=None, rotary_dim=4),
    # CodeGen: GPT-J with q/k/v in one qkv_proj, laid out in 4 model-parallel shards (each: queries, values, keys)
    "codegen": dict(num_key_value_heads=None, rotary_dim=4, n_inner=64),
    # OPT: learned positions (2 rows in), no RoPE, biased LayerNorms before each block, an ungated ReLU MLP (fc1, fc2)
    # held by the layer itself, `model.decoder` as the base model's name (no GQA field: None drops TINY's)
    "opt": dict(num_key_value_heads=None, ffn_dim=64),
    # BLOOM: ALiBi instead of RoPE, a LayerNorm over the embeddings, q/k/v fused by heads (GPT-NeoX's layout), biased
    # LayerNorms and projections, an ungated tanh-GELU MLP, GPT-2's top names (no GQA field: None drops TINY's)
    "bloom": dict(num_key_value_heads=None),
    # Falcon (Falcon-7B's layout): multi-query attention out of one query_key_value, a parallel block on one LayerNorm,
    # no biases, an ungated GELU MLP, BLOOM's names (no GQA field: None drops TINY's)
    "falcon": dict(num_key_value_heads=None, ffn_hidden_size=64),
    # StarCoder2: biased LayerNorms and projections (use_bias), an ungated MLP whose nn.Linear layers GPT-2's Conv1Ds
    # share names with (c_fc, c_proj), GQA, RoPE
    "starcoder2": {},
    # MPT: ALiBi (its own slopes), q/k/v fused in blocks and clipped, its attention's own scale, LayerNorms that learn a
    # scale, no biases, an ungated GELU MLP 4 × hidden wide, GPT-2's top names (no GQA field: None drops TINY's)
    "mpt": dict(num_key_value_heads=None, attn_config=dict(clip_qkv=0.5, softmax_scale=0.3)),
    # mixtures of experts: 2 of 4 experts per token, renormalised (Mixtral always) or not; Qwen2-MoE's sigmoid-gated
    # shared expert; OLMoE's q/k/v clipped after its q/k norms
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, clip_qkv=0.5),
    # GPT-OSS: biased router and experts, interleaved gate/up clamped (a limit its tiny activations reach), attention
    # sinks, alternating sliding layers
    "gpt_oss": dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, sliding_window=4,
                    swiglu_limit=0.05),
    # GraniteMoE: Granite's multipliers around experts in `block_sparse_moe`, their files' own names
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=6.0, residual_multiplier=0.5,
                       attention_multiplier=0.1, logits_scaling=4.0),
    # + a dense `shared_mlp` beside the experts
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=6.0,
                             residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0,
                             shared_intermediate_size=24),
}
# Fused projections by the Llama ones each holds (Phi-3's q/k/v and gate/up, GLM's gate/up), and GPT-NeoX's own
# names: the names a test's targets take there; None where a family has no such module (a mixture's MLP is its
# experts, no dense projections; GPT-NeoX's MLP has no gate)
GATE_UP = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
NO_MLP = dict.fromkeys(("gate_proj", "up_proj", "down_proj"))
FUSED = {"phi3": {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", **GATE_UP}, "glm": GATE_UP,
         "glm4": GATE_UP, "gpt_neox": {**dict.fromkeys(("q_proj", "k_proj", "v_proj"), "query_key_value"),
                                       "o_proj": "dense", "gate_proj": None, "up_proj": "dense_h_to_4h",
                                       "down_proj": "dense_4h_to_h", "embed_tokens": "embed_in"},
         "phi": {"o_proj": "dense", "gate_proj": None, "up_proj": "fc1", "down_proj": "fc2"},
         "gptj": {"o_proj": "out_proj", "gate_proj": None, "up_proj": "fc_in", "down_proj": "fc_out",
                  "embed_tokens": "wte"},
         "codegen": {**dict.fromkeys(("q_proj", "k_proj", "v_proj"), "qkv_proj"), "o_proj": "out_proj",
                     "gate_proj": None, "up_proj": "fc_in", "down_proj": "fc_out", "embed_tokens": "wte"},
         "opt": {"o_proj": "out_proj", "gate_proj": None, "up_proj": "fc1", "down_proj": "fc2"},
         "starcoder2": {"gate_proj": None, "up_proj": "c_fc", "down_proj": "c_proj"},
         "mpt": {**dict.fromkeys(("q_proj", "k_proj", "v_proj"), "Wqkv"), "o_proj": "out_proj", "gate_proj": None,
                 "embed_tokens": "wte"},
         **dict.fromkeys(("bloom", "falcon"), {
             **dict.fromkeys(("q_proj", "k_proj", "v_proj"), "query_key_value"), "o_proj": "dense", "gate_proj": None,
             "up_proj": "dense_h_to_4h", "down_proj": "dense_4h_to_h", "embed_tokens": "word_embeddings"}),
         **dict.fromkeys(("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "granitemoeshared"), NO_MLP)}


def family_targets(family: str, targets: list[str]) -> list[str]:
    """Llama's projection names as `family` names them (its fused ones; the others' own)."""
    fused = FUSED.get(family, {})
    return [t for t in dict.fromkeys(fused.get(t, t) for t in targets) if t is not None]
# GPT-2 (Conv1D projections, learned positions, LayerNorm). Its config has no GQA field, and a stray
# num_key_value_heads would make PEFT's prefix tuning size its prefixes for 2 KV heads: None drops TINY's.
GPT2 = dict(n_inner=64, num_key_value_heads=None)
# OPT-350m's layout: token embeddings narrower than the layers (word_embed_proj_dim, projected in and out), LayerNorms
# after each residual sum (do_layer_norm_before false) and none at the end
OPT_350M = dict(num_key_value_heads=None, ffn_dim=64, word_embed_proj_dim=16, do_layer_norm_before=False)


def family_run(tiny_run, tmp_path, family: str) -> dict:
    """`tiny_run` with a tiny random model of `family` (its `conftest.FAMILIES` sizes) over the run's tokenizer."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_run["model"])
    base = save_hf_model(make_hf_model(family, **FAMILIES.get(family, {}), vocab_size=len(tokenizer),
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512),
                         tmp_path / "base")
    tokenizer.save_pretrained(base)
    return {**tiny_run, "model": base}


def make_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny random transformers model of the given family, in float32 eval mode; an override None drops
    that key of TINY."""
    import torch
    import transformers

    _torch_one_thread()
    fields = {k: v for k, v in {**TINY, **overrides}.items() if not (v is None and k in TINY)}
    config = transformers.AutoConfig.for_model(model_type, **fields)
    # a family's default (Phi-3's 32000) past a tiny vocabulary (CodeGen's config has no such field)
    if (getattr(config, "pad_token_id", None) or 0) >= config.vocab_size:
        config.pad_token_id = config.vocab_size - 1
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases so a mapping bug cannot hide
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")) or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# T5 v1.0 (relu FFN, decoder output scaled for its tied head) and v1.1 / FLAN-T5 (gated-gelu, unscaled),
# with few relative-position buckets so that short rows reach the logarithmic ones.
T5_TINY = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
T5_VARIANTS = {"t5-v1.0": dict(feed_forward_proj="relu"),
               "flan-t5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
               # transformers' MT5 and UMT5 (their own config and model classes; UMT5: a position-bias table per layer)
               "mt5": dict(feed_forward_proj="gated-gelu"), "umt5": dict(tie_word_embeddings=False)}


def make_t5(path, variant: str = "flan-t5", own_head: bool = False, seed: int = 0, **overrides):
    """(torch model, checkpoint dir) for a tiny random T5 with non-trivial norms. `own_head`: the file
    holds an lm_head of its own, as original FLAN-T5 files do (transformers 5 otherwise ties it)."""
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    _torch_one_thread()
    torch.manual_seed(seed)
    family = {"mt5": "MT5", "umt5": "UMT5"}.get(variant, "T5")
    config_class, model_class = (getattr(transformers, family + kind)
                                 for kind in ("Config", "ForConditionalGeneration"))
    model = model_class(config_class(**{**T5_TINY, **T5_VARIANTS[variant], **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    if own_head:
        weights = load_file(os.path.join(path, "model.safetensors"))
        weights["lm_head.weight"] = np.random.default_rng(seed).normal(0, 0.5, weights["shared.weight"].shape
                                                                       ).astype(np.float32)
        save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        model = model_class.from_pretrained(path)
    return model.eval(), str(path)


def perturb(params, names, key=None, scale: float = 0.1):
    """Random values added to the leaves named in `names` (an adapter at its identity init would hide bugs)."""
    import jax
    from jpeft import tree as T
    flat = T.flatten(params)
    keys = iter(jax.random.split(jax.random.key(1) if key is None else key, len(flat)))
    return T.unflatten({p: v + scale * jax.random.normal(next(keys), v.shape) if T.leaf_name(p) in names else v
                        for p, v in flat.items()})


def jit_logits(model, params, *inputs):
    """`model.apply({"params": params}, *inputs)` as numpy, compiled once per model, tree structure and input shapes:
    applied eagerly, every call traces the model again and compiles its layer scan anew (0.28 s a call for a tiny
    model; the tests compare logits of the same model and trees many times)."""
    import jax.numpy as jnp
    import numpy as np
    return np.asarray(_jitted_apply()(model, params, *map(jnp.asarray, inputs)))


@functools.cache
def _jitted_apply():
    import jax
    return jax.jit(lambda model, params, *inputs: model.apply({"params": params}, *inputs), static_argnums=0)


def check_merges_and_trains(model, params, adapted, ids) -> None:
    """A weight method's invariants on a perturbed tree: it changes the logits, `merge` gives a plain tree with
    the same logits, and every trained leaf gets a gradient."""
    import jax
    import numpy as np
    import jpeft
    from jpeft import tree as T
    out = jit_logits(model, adapted, ids)
    assert np.abs(out - jit_logits(model, params, ids)).max() > 1e-3
    merged = jpeft.merge(adapted)
    assert set(T.flatten(merged)) == set(T.flatten(params))
    np.testing.assert_allclose(jit_logits(model, merged, ids), out, atol=1e-5, rtol=0)
    trainable, frozen = T.partition(adapted, jpeft.trainable_mask(adapted))
    grads = jax.grad(lambda t: model.apply({"params": T.combine(t, frozen)}, ids).sum())(trainable)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))


def edit_adapter_config(adapter_dir, **fields) -> None:
    """Overwrite fields of a saved adapter's adapter_config.json."""
    import json
    config = os.path.join(adapter_dir, "adapter_config.json")
    with open(config) as f:
        values = json.load(f)
    with open(config, "w") as f:
        json.dump({**values, **fields}, f)


def save_hf_model(model, path, **save_kwargs) -> str:
    model.save_pretrained(path, **save_kwargs)
    return str(path)


@pytest.fixture
def tiny_llama(tmp_path):
    """(torch model, checkpoint dir) for a tiny untied GQA Llama."""
    model = make_hf_model("llama")
    return model, save_hf_model(model, tmp_path / "llama")


def dialogsum_rows(n: int, start: int = 0) -> list[dict]:
    """Rows of the DialogSum sample shipped in the package."""
    import json

    from jpeft.data import DIALOGSUM_SAMPLE
    with open(DIALOGSUM_SAMPLE) as f:
        return [json.loads(line) for line in f][start:start + n]


# Decoding tests' weights: at the default 0.02 attention is so flat that wrong positions pass
SHARP = dict(initializer_range=0.2)


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    """jpeft's (model, params) of a tiny Llama with SHARP weights (test_generate.py, test_sampling.py)."""
    import jpeft
    return jpeft.from_pretrained(save_hf_model(make_hf_model("llama", **SHARP), tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny Llama with its own BPE tokenizer (an HF dir) and DialogSum-shaped train/eval JSONL."""
    import json

    from jpeft.data.bpe import speaker_tags, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("tiny_run")
    rows = dialogsum_rows(48)
    texts = [r["dialogue"] + "\n" + r["summary"] for r in rows]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400, special_tokens=speaker_tags(texts))
    model = make_hf_model("llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          max_position_embeddings=512)
    model_dir = save_hf_model(model, root / "base")
    tokenizer.save_pretrained(model_dir)
    for name, part in (("train.jsonl", rows[:40]), ("eval.jsonl", rows[40:])):
        with open(root / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return {"model": model_dir, "train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"),
            "root": root}


def run_config(run, out, *extra):
    """A short supervised run on `tiny_run`, with extra key=value overrides."""
    from jpeft.config import load_config
    return load_config(None, [
        "model.dtype=float32", f"model.path={run['model']}", f"data.train={run['train']}", f"data.eval={run['eval']}",
        "data.prompt=Summarize:\n{dialogue}\nSummary: ", "data.target=summary", "train.steps=6",
        "train.batch_size=4", "train.seq_len=96", "train.log_every=1", "train.warmup=1", "train.lr=5e-3",
        "data.eval_limit=0", f"out_dir={out}", *extra])


def read_metrics(out):
    import json
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# A tiny word-level tokenizer built offline, with BOS/EOS/PAD, for tokenization tests.
WORDS = ("summarize the dialogue : a cat sat on mat dog ran to park and then home "
         "hello world it is sunny today we go out").split()


def make_tokenizer(bos: bool = True, pad: bool = True, eos: bool = False):
    """WordLevel tokenizer over WORDS; adds <s> before each text when `bos`, </s> after it when `eos`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos or eos:
        tok.post_processor = processors.TemplateProcessing(
            single=("<s> " if bos else "") + "$A" + (" </s>" if eos else ""),
            special_tokens=[(t, vocab[t]) for t in ("<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>" if pad else None)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tokenizer_without_pad():
    return make_tokenizer(pad=False)


def dot_operand_types(hlo: str, result: str | None = None) -> list[list[str]]:
    """The operand types of every dot in compiled HLO text that yields `result` (like f32[32,128]; any)."""
    types = dict(re.findall(r"%([\w.-]+) = (\w+)\[", hlo) + re.findall(r"([\w.-]+): (\w+)\[", hlo))
    yields = re.escape(result) if result else r"\w+\[[\d,]*\]"
    return [[types[name] for name in re.findall(r"%([\w.-]+)", operands)]
            for operands in re.findall(yields + r"\{[\d,]*\} dot\(([^)]*)\)", hlo)]
