"""KV-cache decoding (greedy and sampling) for jpeft's causal LMs and encoder-decoders.

Prompts are padded to a bucketed length (a decoder's on the left, an encoder's on the right), prefilled in one call, and decoded one
token per step inside a single jit-compiled `lax.while_loop` that stops as soon as
every row has emitted EOS; on CPU the steps run the layers unrolled over per-layer weights and cache
(`_stepping`). Adapter leaves in `params` are applied by the model itself,
so an unmerged adapter needs nothing special here; virtual tokens (soft prompts, prefixes)
enter the KV cache in the prefill, and the decoding steps run without them. Params placed on a mesh
(`from_pretrained(..., mesh=...)`) decode there as a train step runs: the rows and their KV cache split
over the data-parallel devices, the weights as placed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jpeft import tree as T
from jpeft.errors import ConfigError, JpeftError
from jpeft.hardware import wide_vectors
from jpeft.models import kv_cache as C
from jpeft.parallel.mesh import activation_sharding, data_ways, params_mesh, split_rows
from jpeft.peft import sites
from jpeft.peft.prompt import task_rows

PROMPT_BUCKET = 32  # padded prompt lengths are multiples of this, so batches share compiled code
EOS_SLOTS = 8  # EOS ids are padded with -1 (never generated) to this many, for the same reason


def generate(model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             eos_token_id: int | Sequence[int] | None, pad_token_id: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, first_row: int = 0) -> list[list[int]]:
    """Continue each prompt (token ids); return only the new tokens, cut before the first EOS.

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature)
    restricted to the top_k most likely (0: all; with any tied with the k-th) and to the smallest set
    whose probability reaches top_p, as transformers' warpers cut them. Each row draws from its own
    key, made from the seed and its index `first_row + i` among the caller's prompts, so a row's sample
    depends on neither the other rows nor how a longer list was split into batches. top_k is static: each value compiles its own decoding loop (`lax.top_k`
    needs a fixed k), as does switching a nucleus without top_k on or off; temperature, the value of
    top_p, seed and first_row are traced.
    """
    cfg = model.config
    if max_new_tokens < 1:
        raise JpeftError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_prompts(prompts, cfg, max_new_tokens, sum(sites.virtual_tokens(params)))
    if not 0 <= pad_token_id < cfg.vocab_size:
        raise JpeftError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {cfg.vocab_size}); "
                         "pass the tokenizer's pad (or eos) id")
    if not (math.isfinite(temperature) and temperature >= 0 and isinstance(top_k, (int, np.integer)) and top_k >= 0
            and 0 < top_p <= 1):
        raise JpeftError(f"need a finite temperature >= 0, an integer top_k >= 0 and 0 < top_p <= 1; got "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
    eos_slots = np.full(-(-max(len(eos), 1) // EOS_SLOTS) * EOS_SLOTS, -1, np.int32)
    eos_slots[:len(eos)] = eos

    # On a mesh each data-parallel device decodes its own rows (the last row repeated to fill them).
    mesh, count = params_mesh(params), len(prompts)
    ways = data_ways(mesh)
    index = np.minimum(np.arange(-(-count // ways) * ways), count - 1)
    width = -(-max(map(len, prompts)) // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.full((len(index), width), pad_token_id, np.int32)
    mask = np.zeros((len(index), width), np.int32)
    for row, i in enumerate(index):
        # a decoder's prompts end where the new tokens start; an encoder's input starts where a soft prompt ends
        # (T5's relative positions would count pads between them), and its decoder starts on its own
        at = slice(0, len(prompts[i])) if cfg.is_encoder_decoder else slice(width - len(prompts[i]), width)
        ids[row, at], mask[row, at] = prompts[i], 1
    with contextlib.nullcontext() if mesh is None else activation_sharding(mesh):
        ids, mask = (jnp.asarray(a) if mesh is None else split_rows(mesh, a) for a in (ids, mask))
        tokens = _decoder(cfg.dtype)(model, max_new_tokens, _candidates(temperature, top_k, top_p, cfg.vocab_size),
                                     task_rows(params, index, count), ids, mask, jnp.asarray(eos_slots),
                                     jnp.float32(temperature or 1.0), jnp.float32(top_p), jax.random.key(seed),
                                     jnp.int32(first_row))
    return [_cut_at_eos(row, eos) for row in np.asarray(tokens)[:count].tolist()]


def generate_text(model, params, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int,
                  batch_size: int = 8, **sampling) -> list[str]:
    """Tokenize (unless given token ids), generate in batches, detokenize.

    Decoding stops at the tokenizer's EOS and at every EOS id of the checkpoint's generation config
    (`ModelConfig.eos_token_ids`: an instruct model's end-of-turn token too), unless `eos_token_id` is
    given; the pad id defaults to the tokenizer's.
    """
    if not prompts:
        raise JpeftError("no prompts given; pass at least one prompt string")
    if batch_size < 1:
        raise JpeftError(f"batch_size must be >= 1, got {batch_size}")
    stops = [i for i in (tokenizer.eos_token_id, *model.config.eos_token_ids) if i is not None]
    sampling.setdefault("eos_token_id", list(dict.fromkeys(stops)) or None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling.setdefault("pad_token_id", pad or 0)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
               for p in prompts]
    # up front, so an error names the prompt's global index
    check_prompts(encoded, model.config, max_new_tokens, sum(sites.virtual_tokens(params)))
    starts = range(0, len(encoded), batch_size)
    outputs = []
    for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) <= 1):
        rows = slice(start, start + batch_size)
        new = generate(model, task_rows(params, rows, len(encoded)), encoded[rows], max_new_tokens, first_row=start,
                       **sampling)
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def prompt_room(cfg, max_new_tokens: int, virtual: int = 0) -> int | None:
    """How many prompt tokens fit the model's positions beside `virtual` tokens and the new tokens fed
    back; None for an encoder-decoder, whose encoder's relative positions have no end (T5)."""
    if cfg.is_encoder_decoder:
        return None
    return cfg.max_position_embeddings - virtual - (max_new_tokens - 1)


def require_prompt_room(cfg, max_new_tokens: int, virtual: int = 0, name: str = "max_new_tokens") -> int | None:
    """`prompt_room`, or an error naming `name` where the new tokens leave a prompt none."""
    room = prompt_room(cfg, max_new_tokens, virtual)
    if room is not None and room < 1:
        raise ConfigError(f"{name}={max_new_tokens}{f' beside {virtual} virtual tokens' if virtual else ''} leaves no "
                          f"room for a prompt in the model's {cfg.max_position_embeddings} positions "
                          f"({cfg.positions_key}); lower it")
    return room


def check_prompts(prompts: Sequence[Sequence[int]], cfg, max_new_tokens: int = 1, virtual: int = 0) -> None:
    """Refuse prompts the model cannot read, naming the offending one. With learned positions (GPT-2, OPT) the
    prompt, its `virtual` tokens and the new tokens fed back must all have a position: past the table
    the lookup would read no row and the logits turn NaN (transformers raises there too). T5's encoder
    reads any length, as in transformers."""
    if not prompts:
        raise JpeftError("no prompts given; pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if not len(prompt):
            raise JpeftError(f"prompt {i} is empty; give every prompt at least one token (e.g. BOS)")
        if not cfg.is_encoder_decoder and len(prompt) > cfg.max_position_embeddings:
            raise JpeftError(f"prompt {i} has {len(prompt)} tokens but the model reads at most "
                             f"{cfg.max_position_embeddings} ({cfg.positions_key}); shorten or truncate it")
        if cfg.learned_positions and len(prompt) > prompt_room(cfg, max_new_tokens, virtual):
            raise JpeftError(
                f"prompt {i} has {len(prompt)} tokens{f' after {virtual} virtual ones' if virtual else ''}; "
                f"with max_new_tokens={max_new_tokens} the model would need "
                f"{virtual + len(prompt) + max_new_tokens - 1} positions but has "
                f"{cfg.max_position_embeddings} ({cfg.positions_key}); shorten the prompt or lower max_new_tokens")
        if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise JpeftError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}); "
                             "was it tokenized with this model's tokenizer?")


def _cut_at_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
    return tokens


def _candidates(temperature: float, top_k: int, top_p: float, vocab_size: int) -> int | None:
    """How many of the most likely tokens a step ranks: None for greedy, 0 for none (plain sampling).

    A nucleus without top_k ranks the whole vocabulary (a full sort): any smaller bound would
    silently cut a flat distribution's nucleus, which can span most of the vocabulary.
    """
    if temperature == 0:
        return None
    if top_k:
        return min(top_k, vocab_size)
    return vocab_size if top_p < 1 else 0


def greedy(logits):
    """`jnp.argmax(logits, -1)` (the first maximum; the first NaN where there is one) as two plain reductions:
    XLA:CPU runs argmax's (value, index) reduction 2-10x slower (the bench's [8, 32000]: 555 vs 246 µs,
    [1, 32000]: 140 vs 12 µs, ~4% of a decoding step)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where((logits == top) | jnp.isnan(logits), ids, logits.shape[-1]), axis=-1)


def _pick(logits, keys, candidates, temperature, top_p):
    """Next token per row from logits [B, V]: argmax (candidates None), or a sample from `warp`'s logits, each
    row with its own key of `keys` [B]."""
    if candidates is None:
        return greedy(logits)
    return jax.vmap(jax.random.categorical)(keys, warp(logits, candidates, temperature, top_p)).astype(jnp.int32)


def warp(logits, candidates: int, temperature, top_p):
    """logits / temperature with -inf outside the `candidates` most likely tokens (0: all, unranked) and
    outside the top_p nucleus, as transformers' TopK and TopP warpers cut them: tokens tied with the k-th
    are kept; the nucleus is the smallest most-likely set whose probability reaches top_p, equally likely
    tokens at its edge taken highest id first (as torch's ascending sort leaves short rows; its sort is not
    stable, so in long rows transformers' choice among ties is its own)."""
    scaled = logits / temperature
    if not candidates:
        return scaled
    vocab = scaled.shape[-1]
    ranked, flipped = jax.lax.top_k(scaled[:, ::-1], candidates)  # ties: the highest id first
    ids = vocab - 1 - flipped
    in_top_k = scaled >= ranked[:, -1:]
    shifted = jnp.where(in_top_k, scaled, -jnp.inf) - ranked[:, :1]  # from the maximum: no float32 cancellation
    probs = jnp.exp(ranked - ranked[:, :1] - jax.nn.logsumexp(shifted, axis=-1, keepdims=True))
    nucleus = lambda mass_before: (top_p >= 1) | (mass_before < top_p)  # the most likely token always stays
    at_ranked = jnp.zeros(scaled.shape, bool).at[jnp.arange(scaled.shape[0])[:, None], ids]
    # tokens tied with the k-th that top_k lets through beyond the ranked k follow them, highest id first
    tied = in_top_k & ~at_ranked.set(True)
    tied_before = jnp.cumsum(tied[:, ::-1], axis=-1)[:, ::-1] - 1
    after_ranked = probs.sum(axis=-1, keepdims=True) + tied_before * probs[:, -1:]
    chosen = at_ranked.set(nucleus(jnp.cumsum(probs, axis=-1) - probs)) | (tied & nucleus(after_ranked))
    return jnp.where(chosen, scaled, -jnp.inf)


def _prefill(model, params, ids, mask, max_new_tokens):
    """(hidden states of the prompt, the cache after it, advance(tokens [B, 1], step, cache) -> (logits, cache)).

    A decoder reads the prompt into its cache (virtual tokens first); an encoder-decoder encodes
    it once, writes the cross-attention keys/values (and any decoder prefix), and starts its decoder
    at the start token. The steps after the prefill run without the virtual tokens' leaves: they are
    in the cache by then.
    """
    batch, width = ids.shape
    stepper, decoding = _stepping(model, params)
    if model.config.is_encoder_decoder:
        rows, keys = sites.virtual_tokens(params)  # a soft prompt lengthens the encoder's input, a prefix the decoder's
        cache = model.init_cache(batch, keys + max_new_tokens, encoder_len=rows + width)
        start = jnp.full((batch, 1), model.config.decoder_start_token_id, jnp.int32)
        hidden, cache = model.apply({"params": params}, ids, start, mask, cache=cache, return_hidden=True)
        return hidden, _for_steps(cache), lambda tokens, step, cache: stepper.apply({"params": decoding}, None,
                                                                                   tokens, cache=cache)
    virtual = sum(sites.virtual_tokens(params))
    hidden, cache = _read(model, params, ids, mask, virtual + width + max_new_tokens)
    lengths = virtual + mask.sum(axis=-1)  # the position of the first new token
    return hidden, _for_steps(cache), lambda tokens, step, cache: stepper.apply(
        {"params": decoding}, tokens, attention_mask=jnp.ones((batch, 1), jnp.int32),
        positions=(lengths + step - 1)[:, None], cache=cache)


def _read(model, params, ids, mask, slots: int):
    """(hidden states, cache of `slots`) of a decoder reading left-padded rows from position 0."""
    cache = model.init_cache(ids.shape[0], slots)
    positions = jnp.clip(jnp.cumsum(mask, axis=-1) - 1, 0, None)
    return model.apply({"params": params}, ids, attention_mask=mask, positions=positions, cache=cache,
                       return_hidden=True)


def _longrope_switch(model, params, ids, mask, max_new_tokens, next_logits):
    """`next_logits` with LongRoPE's switch as transformers' Phi-3 makes it while generating: the prompt and the
    steps whose positions stay within the original length use the short factors; at the first step past it
    transformers drops its cache and reads the whole sequence again, now with the long factors, and later steps
    extend that cache. Here that step reads prompt and new tokens (those not yet made masked) into a fresh cache
    of the same slots, whose next slot is then the step's own. Unchanged where no step of this call passes it,
    and for families without `longrope_rereads` (their transformers models switch the new tokens' factors only,
    as the steps do)."""
    cfg, virtual, width = model.config, sum(sites.virtual_tokens(params)), ids.shape[1]
    original = cfg.rope.original_max_positions
    if not cfg.longrope_rereads or cfg.rope.type != "longrope" or virtual + width + max_new_tokens - 1 <= original:
        return next_logits
    longest = virtual + mask.sum(axis=-1).max()

    def reread(tokens, step):
        made = (jnp.arange(max_new_tokens) < step).astype(mask.dtype)
        hidden, cache = _read(model, params, jnp.concatenate([ids, tokens], 1),
                              jnp.concatenate([mask, jnp.broadcast_to(made, tokens.shape)], 1),
                              virtual + width + max_new_tokens)
        last = jax.lax.dynamic_index_in_dim(hidden, width + step - 1, axis=1)
        return model.logits(model.head_leaves(params), last), _for_steps({**cache, "index": virtual + width + step})

    return lambda tokens, step, cache: jax.lax.cond(longest + step == original + 1, lambda: reread(tokens, step),
                                                    lambda: next_logits(tokens, step, cache))


def _stepping(model, params):
    """(model, params) of the decoding steps: the params without the cached leaves and, on CPU, the layers
    unrolled over per-layer copies of their weights and KV cache (`layers.Unrolled`, the cache as `_for_steps`
    makes it: XLA:CPU would copy a layer's slice out of each stacked array before every matmul, every step);
    accelerators read a stacked array's slice in place, so there no second copy of the weights is worth holding."""
    params = sites.decoding(params)
    if jax.default_backend() != "cpu":
        return model, params
    return model.clone(config=dataclasses.replace(model.config, unrolled=True)), T.unstack(params)


def _for_steps(cache: dict) -> dict:
    """A prefill's cache as the decoding steps read it (`_stepping`)."""
    return C.unstack_cache(cache) if jax.default_backend() == "cpu" else cache


@functools.cache
def _decoder(dtype: str):
    """The compiled decoding loop for a compute dtype. Float32 products run in XLA:CPU's own dot emitter,
    not YNNPACK: at decoding's few rows YNNPACK's float32 kernels took 46 of a 60 ms batch-8 step on an
    AVX2 CPU (its own emitter ~8 ms), and were no faster on AVX-512 (Zen 5). In bfloat16 XLA's emitter is
    the slow one (Zen 5, the bench model, batch 8: the whole call 726 vs 571 ms, the prefill 182 vs
    103). Both run XLA's own kernels at the CPU's widest vectors (`hardware.wide_vectors`). Other backends
    ignore the options."""
    options = {"xla_cpu_experimental_ynn_fusion_type": ""} if jnp.dtype(dtype) == jnp.float32 else {}
    return jax.jit(_decode, static_argnums=(0, 1, 2), compiler_options={**options, **wide_vectors()} or None)


def _decode(model, max_new_tokens, candidates, params, ids, mask, eos, temperature, top_p, key, first_row):
    """Prefill + decode loop -> tokens [B, max_new_tokens]; what follows a row's first EOS is filler.

    Compiled once per (model, batch, padded prompt length, max_new_tokens, candidates); the
    other sampling knobs are traced, so changing them does not recompile.
    """
    batch = ids.shape[0]
    pick = functools.partial(_pick, candidates=candidates, temperature=temperature, top_p=top_p)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, first_row + jnp.arange(batch))
    step_keys = lambda step: jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    is_eos = lambda token: (token[:, None] == eos[None, :]).any(axis=-1)
    hidden, cache, advance = _prefill(model, params, ids, mask, max_new_tokens)
    # The head on the last position only: the prompt's other logits are never used.
    last = model.logits(model.head_leaves(params), hidden[:, -1])
    first = pick(last, step_keys(0))
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    next_logits = _longrope_switch(model, params, ids, mask, max_new_tokens,
                                   lambda tokens, step, cache: advance(tokens[:, step - 1, None], step, cache))

    def body(state):
        step, tokens, done, cache = state
        prev = tokens[:, step - 1]
        logits, cache = next_logits(tokens, step, cache)
        token = pick(logits[:, -1], step_keys(step))
        token = jnp.where(done, prev, token)  # a finished row repeats its EOS
        return step + 1, tokens.at[:, step].set(token), done | is_eos(token), cache

    def cond(state):
        step, _, done, _ = state
        return (step < max_new_tokens) & ~done.all()

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, is_eos(first), cache))
    # whole on every device (and every host): the caller reads all rows
    return tokens if jax.sharding.get_abstract_mesh().empty else jax.lax.with_sharding_constraint(tokens, P())
