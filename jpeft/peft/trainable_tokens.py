"""Trainable tokens (PEFT's TRAINABLE_TOKENS): only the embedding rows of chosen token ids are trained, as after
adding special tokens to a vocabulary, with PEFT's semantics.

The rows live beside the token table (`trainable_tokens_delta` [n, D], PEFT's name and tensor: the rows
themselves, not a difference; `token_indices` [n], metadata) and replace the table's rows for those ids wherever
the table is read: at the embedding insertion point and, where the head is tied to the table, in the head too (as
PEFT's tied adapter does; an untied head keeps its own rows). PEFT's init copies the rows, so the model is
unchanged. Parameters: n·D. LoRA's `trainable_token_indices` (PEFT's) adds the same leaves to the input embedding,
saved in the LoRA dir under PEFT's `token_adapter` name (`lora_tensors`, `read_lora_tensors`).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import Method, hf_module, matches, refuse_second_init, target_option

INDICES = "token_indices"
# the token table's name in each family (get_input_embeddings)
INPUT_EMBEDDINGS = ("embed_tokens", "embed_in", "wte", "word_embeddings", "shared")
LORA_KEY = "token_adapter.trainable_tokens_delta"  # a LoRA dir's rows, under the table's name


class TrainableTokens(Method):
    name = "trainable_tokens"
    peft_type = "TRAINABLE_TOKENS"
    trainable = ("trainable_tokens_delta",)
    metadata = (INDICES,)
    axes = {"trainable_tokens_delta": (None, "embed"), INDICES: (None,)}

    def __init__(self, token_indices: Sequence[int] = (), targets: Sequence[str] | str = ("embed_tokens",)):
        self.token_indices = [int(i) for i in token_indices]
        if not self.token_indices or len(set(self.token_indices)) != len(self.token_indices):
            raise JpeftError(f"trainable tokens need one or more distinct token ids, got {list(token_indices)}")
        self.targets = target_option(targets)

    def __repr__(self):
        return f"TrainableTokens(token_indices={self.token_indices}, targets={self.targets!r})"

    def tables(self, grouped: dict, error=JpeftError) -> list[str]:
        """The token tables the targets pick (PEFT's matching), each holding every chosen id."""
        found = [path for path, leaves in grouped.items() if "embedding" in leaves and matches(hf_module(path),
                                                                                                self.targets)]
        if not found:
            raise error(f"trainable tokens: targets {self.targets!r} match no token embedding")
        for path in found:
            vocab = grouped[path]["embedding"].shape[0]
            if max(self.token_indices) >= vocab or min(self.token_indices) < 0:
                raise error(f"trainable tokens: token ids {self.token_indices} do not all fit {hf_module(path)}'s "
                            f"{vocab} rows")
        return found

    def init(self, key, params):
        grouped = T.modules(params)
        for path in self.tables(grouped):
            refuse_second_init(self, path, grouped[path], self.trainable)
            grouped[path] = self.attach(grouped[path], grouped[path]["embedding"][np.asarray(self.token_indices)])
        return T.from_modules(grouped)

    def attach(self, leaves: dict, rows) -> dict:
        return {**leaves, "trainable_tokens_delta": jnp.asarray(rows, jnp.float32),
                INDICES: jnp.asarray(self.token_indices, jnp.int32)}

    @staticmethod
    def embed_delta(leaves, ids):
        """The chosen ids' trained rows in place of the table's."""
        chosen = ids[..., None] == leaves[INDICES]
        rows = jnp.einsum("...n,nd->...d", chosen.astype(jnp.float32), leaves["trainable_tokens_delta"])
        return jnp.where(chosen.any(-1, keepdims=True), rows - jnp.take(leaves["embedding"], ids, axis=0), 0)

    @staticmethod
    def embed_table(leaves):
        """The table with the chosen rows replaced (what a tied head reads)."""
        table = leaves["embedding"]
        return table.at[leaves[INDICES]].set(leaves["trainable_tokens_delta"].astype(table.dtype))

    @classmethod
    def merge(cls, leaves: dict) -> dict:
        return {**{k: v for k, v in leaves.items() if k not in cls.trainable + cls.metadata},
                "embedding": cls.embed_table(leaves)}


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's rows per table (and under `lm_head` too where the head is the tied table, as PEFT saves it)."""
    tensors, indices = {}, set()
    for path, leaves in modules.items():
        rows = np.asarray(leaves["trainable_tokens_delta"], np.float32)
        tensors[f"{hf_module(path)}.trainable_tokens_delta"] = rows
        if "lm_head" not in tree:
            tensors["lm_head.trainable_tokens_delta"] = rows
        indices.add(tuple(int(i) for i in np.asarray(leaves[INDICES])))
    (chosen,) = indices
    return tensors, {"target_modules": sorted(hf_module(p).rpartition(".")[2] for p in modules),
                     "token_indices": list(chosen), "init_weights": True, "inference_mode": True}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    if isinstance(config.get("token_indices"), dict):
        raise AdapterError("trainable tokens with token ids per module (a dict) are not supported; jpeft trains one "
                           "set of ids")
    method = TrainableTokens(config["token_indices"], config.get("target_modules") or ["embed_tokens"])
    out = dict(modules)
    for path in method.tables(modules, AdapterError):
        key = f"{hf_module(path)}.trainable_tokens_delta"
        rows = tensors.take(key)
        tensors.fits(key, rows.shape, (len(method.token_indices), modules[path]["embedding"].shape[1]))
        if "lm_head" not in modules and "lm_head.trainable_tokens_delta" in tensors.left:
            tensors.take("lm_head.trainable_tokens_delta")  # the tied head's copy of the same rows
        out[path] = method.attach(modules[path], rows)
    return out


def input_embedding(modules: dict, error=JpeftError) -> str:
    """The path of the model's token table, the module PEFT's `get_input_embeddings` returns."""
    found = [p for p, leaves in modules.items() if "embedding" in leaves and p.rpartition("/")[2] in INPUT_EMBEDDINGS]
    if len(found) != 1:
        raise error(f"trainable token ids need the model's one token embedding ({' or '.join(INPUT_EMBEDDINGS)}); "
                    f"this tree has {len(found)}")
    return found[0]


def with_tokens(params, token_indices, error=JpeftError):
    """`params` with trainable rows for `token_indices` on the input embedding (LoRA's trainable_token_indices)."""
    grouped = T.modules(params)
    table = input_embedding(grouped, error)
    if "lora_a" in grouped[table]:
        raise error(f"{hf_module(table)} holds a LoRA and would get trainable token rows too; train the rows of "
                    "new tokens with trainable_token_indices or the table with a LoRA on it, not both")
    return TrainableTokens(token_indices, [hf_module(table)]).init(None, params)


def lora_tensors(modules: dict) -> tuple[dict, list[int]]:
    """The rows a LoRA dir carries (PEFT's key; a tied head's copy is not saved) and its trainable_token_indices."""
    (path, leaves), = modules.items()
    return ({f"{hf_module(path)}.{LORA_KEY}": np.asarray(leaves["trainable_tokens_delta"], np.float32)},
            [int(i) for i in np.asarray(leaves[INDICES])])


def read_lora_tensors(token_indices, tensors, modules: dict) -> dict:
    """The modules with a LoRA dir's trainable token rows on the input embedding."""
    table = input_embedding(modules, AdapterError)
    if isinstance(token_indices, dict):  # PEFT's per-layer form: jpeft takes the input embedding's alone
        if len(token_indices) != 1 or not matches(hf_module(table), list(token_indices)):
            raise AdapterError(f"trainable_token_indices {token_indices}: jpeft trains token rows of the input "
                               f"embedding ({hf_module(table)}) only")
        (token_indices,) = token_indices.values()
    key = f"{hf_module(table)}.{LORA_KEY}"
    rows = tensors.take(key)
    tensors.fits(key, rows.shape, (len(token_indices), modules[table]["embedding"].shape[1]))
    return {**modules, table: TrainableTokens(token_indices, [hf_module(table)]).attach(modules[table], rows)}
