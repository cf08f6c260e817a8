"""A checkpoint's generation_config.json: the EOS ids decoding stops at, and the settings transformers' `generate()`
would apply that jpeft's decoding does not (named to the user, never silently dropped)."""
from __future__ import annotations

import os

import numpy as np

from jpeft.errors import CheckpointError, read_json

# generation_config.json fields transformers' `generate()` applies by default, which jpeft's decoding leaves to its
# own options (sampling) or does not have (penalties, bans, minimum lengths)
DECODING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size",
                   "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "min_new_tokens", "min_length")


def _generation_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "generation_config.json")
    return read_json(path, CheckpointError, "") if os.path.exists(path) else {}


def stop_ids(model_dir: str, hf: dict) -> tuple[int, ...]:
    """The EOS ids transformers' `generate` stops at: generation_config.json's, else config.json's."""
    eos = _generation_config(model_dir).get("eos_token_id", hf.get("eos_token_id"))
    return tuple(int(i) for i in np.atleast_1d(eos if eos is not None else []))


def decoding_settings(model_dir: str) -> dict:
    """The DECODING_FIELDS generation_config.json sets away from transformers' defaults (an instruct checkpoint's
    do_sample, temperature, top_p, repetition_penalty ...)."""
    from transformers import GenerationConfig
    defaults = GenerationConfig().to_dict()
    return {k: v for k, v in _generation_config(model_dir).items() if k in DECODING_FIELDS and v != defaults.get(k)}
