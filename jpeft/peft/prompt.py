"""Prompt tuning (Lester et al. 2021): n trained virtual-token embeddings before the input.

The soft prompts live beside the token embedding table (`model/embed_tokens/soft_prompt`, GPT-2's
`transformer/wte/soft_prompt` [tasks, n, D]); the embedding insertion point prepends one per row, and the
model gives the virtual tokens positions 0..n-1 (GPT-2 adds its learned position embeddings to them, as
PEFT's inputs_embeds get them), lets every real token attend to them and drops them from its
output, so they are never a loss target. An encoder-decoder (T5, table `shared/embedding`)
prepends them to the encoder's input only, as PEFT does; PEFT's file for it holds 2n rows
(one block per transformer submodule) of which only the first n are ever read. Several
prompts side by side (`tasks`) serve several tasks from one tree: `select_task(params, task_ids)` picks one per call or per row.
Parameters: tasks·n·D.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError, JpeftError
from jpeft.peft.base import Method
from jpeft.peft.trainable_tokens import INPUT_EMBEDDINGS

TASK_IDS = "prompt_task_ids"


class PromptTuning(Method):
    """`init_text`: start from the embeddings of this text's tokens (PEFT's `prompt_tuning_init="TEXT"`),
    repeated or cut to n; needs `tokenizer` (a tokenizer or its directory). Otherwise rows of
    the embedding table drawn at random, so the prompts start at the scale of real tokens."""
    name = "prompt"
    peft_type = "PROMPT_TUNING"
    trainable = ("soft_prompt",)
    metadata = (TASK_IDS,)
    axes = {"soft_prompt": (None, None, "embed")}
    cached = True  # a prefill writes the virtual tokens into the KV cache

    def __init__(self, num_virtual_tokens: int = 20, init_text: str | None = None, tasks: int = 1,
                 tokenizer=None):
        if num_virtual_tokens < 1 or tasks < 1:
            raise JpeftError(f"prompt tuning needs num_virtual_tokens >= 1 and tasks >= 1, "
                             f"got {num_virtual_tokens} and {tasks}")
        if init_text is not None and tokenizer is None:
            raise JpeftError("PromptTuning(init_text=...) needs tokenizer= (a tokenizer or its directory)")
        self.num_virtual_tokens, self.init_text, self.tasks, self.tokenizer = num_virtual_tokens, init_text, tasks, tokenizer

    def __repr__(self):
        return f"PromptTuning(num_virtual_tokens={self.num_virtual_tokens}, init_text={self.init_text!r}, tasks={self.tasks})"

    def init(self, key, params):
        path = _table_path(params)
        table = T.flatten(params)[path]
        n = self.num_virtual_tokens
        if self.init_text is None:
            rows = jax.random.randint(key, (self.tasks, n), 0, table.shape[0])
        else:
            ids = _token_ids(self.tokenizer, self.init_text)
            rows = jnp.asarray((ids * -(-n // len(ids)))[:n])[None].repeat(self.tasks, 0)
        prompt = jnp.take(table, rows, axis=0).astype(jnp.float32)
        return T.combine(params, T.unflatten({path.replace("embedding", "soft_prompt"): prompt}))

    @staticmethod
    def embed_prepend(leaves, batch: int):
        prompts = leaves["soft_prompt"]
        if TASK_IDS in leaves:
            ids = jnp.asarray(leaves[TASK_IDS], jnp.int32)
            if ids.size not in (1, batch):
                raise JpeftError(f"select_task gave {ids.size} task ids for a batch of {batch} rows; give one id "
                                 "for the batch or one per row")
            return jnp.take(prompts, jnp.broadcast_to(ids, (batch,)), axis=0)
        if prompts.shape[0] > 1:
            raise JpeftError(f"this tree holds {prompts.shape[0]} task prompts; pick one per call or per row "
                             "with jpeft.select_task(params, task_ids)")
        return jnp.broadcast_to(prompts[0], (batch, *prompts.shape[1:]))

    @staticmethod
    def virtual_tokens(leaves: dict) -> tuple[int, int]:
        return (leaves["soft_prompt"].shape[-2], 0) if "soft_prompt" in leaves else (0, 0)


def select_task(params, task_ids):
    """The tree with soft prompt `task_ids` active: an int for the whole batch, or one id per row."""
    flat = T.flatten(params)
    prompts = [p for p in flat if T.leaf_name(p) == "soft_prompt"]
    if not prompts:
        raise JpeftError("select_task: the tree holds no soft prompts (call jpeft.PromptTuning(...).init first)")
    tasks = flat[prompts[0]].shape[0]
    ids = np.asarray(task_ids)
    if ids.ndim > 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= tasks:
        raise JpeftError(f"task_ids must be one int or one per row, each in [0, {tasks}); got {task_ids!r}")
    return T.unflatten({**flat, prompts[0].replace("soft_prompt", TASK_IDS): jnp.asarray(ids, jnp.int32)})


SEQ2SEQ_TABLE = "shared/embedding"  # T5's table, shared by encoder and decoder
# a decoder's token table (Llama-like, GPT-NeoX, GPT-2, GPT-J and BLOOM): every family's input embedding but T5's
TOKEN_TABLES = tuple(f"{name}/embedding" for name in INPUT_EMBEDDINGS if f"{name}/embedding" != SEQ2SEQ_TABLE)


def _submodules(table_path: str) -> int:
    """PEFT's `num_transformer_submodules` for a base with this table: 2 for an encoder-decoder."""
    return 2 if table_path == SEQ2SEQ_TABLE else 1


def _table_path(params) -> str:
    tables = [p for p in T.flatten(params) if p.endswith(TOKEN_TABLES) or p == SEQ2SEQ_TABLE]
    if len(tables) != 1:
        raise JpeftError("prompt tuning needs the tree of a model with one input embedding table "
                         f"(.../embed_tokens/embedding, gpt_neox/embed_in/embedding, transformer/wte/embedding, "
                         f"transformer/word_embeddings/embedding or shared/embedding); "
                         f"found {tables or 'none'}")
    return tables[0]


def _token_ids(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise JpeftError(f"init_text {text!r} tokenizes to no tokens")
    return list(ids)


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's `prompt_embeddings` [submodules·n, D]: one prompt (PEFT's prompt tuning has no tasks)."""
    ((path, leaves),) = modules.items()
    prompts = np.asarray(leaves["soft_prompt"], np.float32)
    chosen = np.asarray(leaves.get(TASK_IDS, 0))
    if prompts.shape[0] > 1 and (TASK_IDS not in leaves or chosen.ndim):
        raise AdapterError(f"PEFT's prompt-tuning directory holds one prompt and this tree has {prompts.shape[0]}; "
                           "save one task's: jpeft.save_adapter(dir, jpeft.select_task(params, task))")
    tensors, config = peft_prompt(path, prompts[int(chosen)])
    return tensors, {**config, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                     "tokenizer_name_or_path": None}


def peft_prompt(path: str, prompt) -> tuple[dict, dict]:
    """PEFT's `prompt_embeddings` [submodules·n, D] for one prompt [n, D] beside the table module `path`, and the
    config fields of every prompt-learning dir (PEFT reads an inference-mode dir's prompt as it is)."""
    n, dim = prompt.shape
    submodules = _submodules(f"{path}/embedding")  # PEFT's decoder block: never read, written as zeros
    prompt = np.concatenate([np.asarray(prompt, np.float32), np.zeros(((submodules - 1) * n, dim), np.float32)])
    return {"prompt_embeddings": prompt}, {
        "num_virtual_tokens": n, "token_dim": dim, "num_transformer_submodules": submodules,
        "num_attention_heads": None, "num_layers": None, "inference_mode": True}


def from_peft(config: dict, tensors, modules: dict) -> dict:
    params = T.from_modules(modules)
    path = _table_path(params)
    submodules = _submodules(path)
    if config.get("num_transformer_submodules") not in (None, submodules):
        raise AdapterError(f"this prompt-tuning adapter has num_transformer_submodules="
                           f"{config['num_transformer_submodules']}; this base needs {submodules} "
                           f"({'an encoder-decoder' if submodules == 2 else 'a decoder-only model'})")
    dim = T.flatten(params)[path].shape[-1]
    n = config["num_virtual_tokens"]
    got = tensors.take("prompt_embeddings")
    tensors.fits("prompt_embeddings", got.shape, (submodules * n, dim))
    got = got[:n]  # PEFT reads only the first block: the encoder's
    grouped = dict(modules)
    module = path.rsplit("/", 1)[0]
    grouped[module] = {**grouped[module], "soft_prompt": jnp.asarray(got, jnp.float32)[None]}
    return grouped


def task_rows(params, rows: slice | np.ndarray, count: int):
    """The tree for rows `rows` (a slice or row indices) of a call's `count` prompts: per-row task ids
    (select_task) taken at those rows, as a caller that splits its prompts into batches or repeats rows needs;
    one id for all rows stays as it is."""
    flat = T.flatten(params)
    for path, ids in flat.items():
        if T.leaf_name(path) == TASK_IDS and np.size(ids) > 1:
            if np.size(ids) != count:
                raise JpeftError(f"select_task gave {np.size(ids)} task ids for {count} prompts; give one id for "
                                 "all or one per prompt")
            return T.unflatten({**flat, path: ids[rows]})
    return params
