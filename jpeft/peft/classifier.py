"""Sequence classification: a head on the final hidden states, over a frozen (or LoRA-adapted) base.

    logits = score(pool(hidden))                  linear head (HF's `score`, no bias)
    logits = score(tanh(score_hidden(pool(hidden))))   MLP head (`hidden` units, with biases)

`pool` is the hidden state of each row's last attended token ("last": HF's Llama and GPT-2
*ForSequenceClassification read the last non-pad token, the same token whether the rows
are padded on the right or the left) or the masked mean over tokens ("mean"). The head is
whole top-level modules beside the base (`score`, `score_hidden`), named as in HF, so a linear
head is HF's `score.weight`; the LM head is dropped, as HF's classifier has none. The pooling
is a metadata leaf (`score/pooling`) so a tree says how it classifies: `classify` needs
nothing else, and a tree without it (an HF checkpoint) pools as HF does.

Parameters: D·num_labels (linear), D·hidden + hidden + hidden·num_labels + num_labels (MLP),
plus LoRA's when trained together.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree as T
from jpeft.errors import AdapterError, CheckpointError, JpeftError, read_json
from jpeft.peft.base import Method
from jpeft.peft.lora import LoRA

POOLINGS = ("last", "mean")
# PEFT's SEQ_CLS adapters save the head as `modules_to_save`; it names every usual head module (PEFT 0.22 added
# DistilBERT's pre_classifier; a name no module has saves nothing).
PEFT_HEAD_MODULES = ("classifier", "score", "pre_classifier")
LABELS_FILE = "classifier.json"  # beside an adapter: what AutoModelForSequenceClassification needs besides it


class Classifier(Method):
    """A classification head over `num_labels` classes (default: len(labels)), trained alone or with
    LoRA (`lora`: a LoRA, or a dict of its options). `labels` names the classes in id order."""
    name = "classifier"
    metadata = ("pooling",)
    heads = ("score_hidden", "score")
    scope = ("the head reads a decoder's final features, as HF's Llama and GPT-2 *ForSequenceClassification "
             "do; jpeft has no classification head for encoder-decoders (T5)")

    def __init__(self, num_labels: int | None = None, pooling: str = "last", hidden: int | None = None,
                 lora: LoRA | dict | None = None, labels: Sequence[str] | None = None):
        num_labels = len(labels) if num_labels is None and labels is not None else num_labels
        if num_labels is None:
            raise JpeftError("Classifier needs num_labels (method.num_labels), or the class labels "
                             "(jpeft train reads them from the data.label column)")
        if num_labels < 2:
            raise JpeftError(f"Classifier num_labels must be >= 2, got {num_labels} (one output would be "
                             "regression, which this head does not do)")
        if labels is not None and len(labels) != num_labels:
            raise JpeftError(f"Classifier has {len(labels)} labels for num_labels={num_labels}")
        if pooling not in POOLINGS:
            raise JpeftError(f"Classifier pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if hidden is not None and hidden < 1:
            raise JpeftError(f"Classifier hidden must be a positive number of units (or None), got {hidden}")
        self.num_labels, self.pooling, self.hidden = int(num_labels), pooling, hidden
        self.lora = LoRA(**lora) if isinstance(lora, dict) else lora
        self.labels = None if labels is None else [str(x) for x in labels]

    def __repr__(self):
        return (f"Classifier(num_labels={self.num_labels}, pooling={self.pooling!r}, hidden={self.hidden!r}, "
                f"lora={self.lora!r})")

    @staticmethod
    def pool(hidden, attention_mask, pooling=None, not_pad=None):
        """The `pool` insertion point: [B, T, D] -> [B, D] float32, the last token of `not_pad` (default: the
        last attended one; the rightmost, so left padding works too), or, where `pooling` is the index of
        "mean", the masked mean."""
        mask = attention_mask.astype(jnp.int32)
        last_of = mask if not_pad is None else not_pad.astype(jnp.int32)
        last = jnp.argmax(jnp.arange(mask.shape[1]) * last_of, axis=1)  # HF's rule
        picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        if pooling is None:
            return picked
        weights = mask.astype(jnp.float32)[..., None]
        mean = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return jnp.where(pooling == POOLINGS.index("mean"), mean, picked)

    @property
    def dropout(self) -> float:
        return self.lora.dropout if self.lora else 0.0

    @property
    def lr_ratio(self) -> float:
        return self.lora.lr_ratio if self.lora else 1.0

    @property
    def lr_embedding(self) -> float | None:
        return self.lora.lr_embedding if self.lora else None

    @property
    def saves_model(self) -> bool:
        """Whether training exports a whole HF model: nothing trained but a head HF can hold."""
        return self.lora is None and self.hidden is None and self.pooling == "last"

    def init(self, key, params):
        """The base without its LM head, LoRA's leaves if asked (before the head exists, so LoRA can
        never target it), then the head."""
        lora_key, head_key = jax.random.split(key)
        body = {k: v for k, v in params.items() if k != "lm_head"}
        if self.lora is not None:
            body = self.lora.init(lora_key, body)
        return {**body, **self.init_head(head_key, hidden_size(params))}

    def init_head(self, key, width: int) -> dict:
        """HF's init: weights ~ N(0, 0.02), biases zero."""
        hidden_key, score_key = jax.random.split(key)
        head = {}
        if self.hidden is not None:
            head["score_hidden"] = {"kernel": 0.02 * jax.random.normal(hidden_key, (width, self.hidden)),
                                    "bias": jnp.zeros((self.hidden,))}
            width = self.hidden
        head["score"] = {"kernel": 0.02 * jax.random.normal(score_key, (width, self.num_labels)),
                         "pooling": jnp.asarray(POOLINGS.index(self.pooling), jnp.int32)}
        if self.hidden is not None:
            head["score"]["bias"] = jnp.zeros((self.num_labels,))
        return head

    def mask(self, params):
        trained = T.flatten(self.lora.mask(params)) if self.lora else {}
        return T.map_with_path(lambda p, _: is_head_leaf(p) or trained.get(p, False), params)


def is_head_leaf(path: str) -> bool:
    """A trained leaf of a classification head (its pooling is metadata)."""
    return path.split("/", 1)[0] in Classifier.heads and T.leaf_name(path) not in Classifier.metadata


# Where a decoder family's tree holds the width of the features the head pools, by the tree's top-level module
# (Llama-like and OPT: `model`, GPT-NeoX: `gpt_neox`, GPT-2 and GPT-J: `transformer`, as HF's
# *ForSequenceClassification name the base): its final norm's scale (Phi's `final_layernorm`), or its token embedding
# where the norms learn nothing (OLMo 1) or where the features are projected back to its width (OPT's `project_out`).
WIDTHS = ("model/norm/scale", "model/embed_tokens/embedding", "model/final_layernorm/scale",
          "model/decoder/embed_tokens/embedding",
          "gpt_neox/final_layer_norm/scale", "transformer/ln_f/scale", "transformer/norm_f/scale")


def hidden_size(params) -> int:
    """The width of the features the head reads (`WIDTHS`)."""
    flat = T.flatten({top: params[top] for top in ("model", "gpt_neox", "transformer") if top in params})
    if widths := [flat[path] for path in WIDTHS if path in flat]:
        return int(np.shape(widths[0])[-1])
    if {"encoder", "decoder"} <= set(params):
        raise JpeftError("jpeft has no classification head for encoder-decoders (T5): HF's T5ForSequenceClassification "
                         "runs the decoder over the shifted input and reads its last EOS token through a dense-tanh "
                         "head of its own, which jpeft does not implement; fine-tune T5 to generate the label text "
                         "instead (data.prompt + data.target)")
    raise JpeftError(f"the classifier reads a decoder's final features (their width from {', '.join(WIDTHS)}), "
                     "which this parameter tree does not have; pass the tree jpeft.from_pretrained returns")


def require_head(params) -> dict:
    """The head's output layer (`score`), or an error saying how to get one."""
    if "score" not in params:
        raise JpeftError("the parameter tree has no classification head (score); add one with "
                         "jpeft.Classifier(...).init, or load a classifier's adapter or exported model dir")
    return params["score"]


def classify(model, params, input_ids, attention_mask, dropout_rng=None):
    """Logits [B, num_labels] (float32) of a tree holding a classification head; a pure function."""
    from jpeft.peft import sites  # sites imports the registry, which imports this module
    score = require_head(params)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    hidden = model.apply({"params": params}, input_ids, attention_mask, return_hidden=True, rngs=rngs)
    # HF reads the last token that is not its config's pad id: where EOS stands in for pad and the tokenizer
    # appends it, the token before that EOS (rows a run trains on never end in the pad id: check_last_not_pad)
    pad = model.config.pad_token_id
    not_pad = None if pad is None else attention_mask * (input_ids != pad)
    x = Classifier.pool(hidden, attention_mask, score.get("pooling"), not_pad)
    if "score_hidden" in params:
        x = jnp.tanh(sites.dense(params["score_hidden"], x))
    return sites.dense(score, x).astype(jnp.float32)


def class_nll(logits, labels):
    """Each row's cross-entropy [B] of its class `labels` [B] under `logits` [B, num_labels]."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def split_head(params) -> tuple[dict, dict]:
    """(the tree without its head, the head's modules)."""
    return ({k: v for k, v in params.items() if k not in Classifier.heads},
            {k: v for k, v in params.items() if k in Classifier.heads})


def head_options(head: dict) -> dict:
    """The Classifier options a head's leaves imply."""
    pooling = head["score"].get("pooling")
    return {"pooling": "last" if pooling is None else POOLINGS[int(pooling)],
            "hidden": int(np.shape(head["score_hidden"]["kernel"])[-1]) if "score_hidden" in head else None}


def hf_unsupported(head: dict) -> str | None:
    """Why HF's sequence classifiers cannot hold this head, or None when they can."""
    options = head_options(head)
    if options["pooling"] != "last":
        return (f"{options['pooling']} pooling: HF's *ForSequenceClassification models pool the last "
                "non-pad token")
    if options["hidden"] is not None:
        return "an MLP head: HF's *ForSequenceClassification models have one linear `score` layer"
    return None


def hf_tree(params):
    """The tree as an HF sequence classifier holds it (the pooling leaf dropped), or a CheckpointError
    saying why it cannot; a tree without a head as it is."""
    body, head = split_head(params)
    if not head:
        return params
    reason = hf_unsupported(head)
    if reason:
        raise CheckpointError(f"this classification head has no HF checkpoint form ({reason}); save it with "
                              "jpeft.save_adapter, which writes jpeft's own adapter dir")
    return {**body, "score": {k: v for k, v in head["score"].items() if k not in Classifier.metadata}}


def head_tensors(head: dict) -> dict:
    """The head's trained leaves under their HF names, in HF's [out, in] layout (`score.weight`, ...)."""
    from jpeft.models.hf import hf_layout, hf_names  # models import the peft package, which imports this module
    return {hf_names(path, 1)[0]: np.ascontiguousarray(hf_layout(path, np.asarray(value)), np.float32)
            for path, value in T.flatten(jax.device_get(head)).items() if is_head_leaf(path)}


def read_head(tensors, params, pooling: str = "last", hidden: int | None = None):
    """`params` with the head an adapter file holds (`tensors`: hf_format.Tensors) in place of the LM head."""
    from jpeft.models.hf import hf_layout, hf_names
    if "score.weight" not in tensors.left:
        raise AdapterError(f"{tensors.source}: no classification head (score.weight) in a classifier adapter")
    num_labels = tensors.left["score.weight"].shape[0]
    head = T.flatten(Classifier(num_labels, pooling, hidden).init_head(jax.random.key(0), hidden_size(params)))
    for path in [p for p in head if is_head_leaf(p)]:
        name = hf_names(path, 1)[0]
        got = hf_layout(path, tensors.take(name))
        tensors.fits(name, got.shape, head[path].shape)
        head[path] = jnp.asarray(got, jnp.float32)
    return {**{k: v for k, v in params.items() if k != "lm_head"}, **T.unflatten(head)}


def label_config(labels: Sequence[str], pad_token_id: int) -> dict:
    """HF config fields of a classifier: class names both ways, and the pad id HF's pooling skips."""
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)},
            "pad_token_id": int(pad_token_id)}


def save_label_config(directory: str, fields: dict) -> None:
    """`LABELS_FILE` beside an adapter: the AutoModelForSequenceClassification.from_pretrained keyword
    arguments that give the base model this head's shape and names (PEFT's adapter files have no place
    for them)."""
    with open(os.path.join(directory, LABELS_FILE), "w") as f:
        json.dump(fields, f, indent=2)


def read_label_config(directory: str) -> dict | None:
    """The `LABELS_FILE` fields `save_label_config` wrote beside an adapter, if any."""
    path = os.path.join(directory, LABELS_FILE)
    return read_json(path, CheckpointError, "") if os.path.exists(path) else None


def read_labels(directory: str) -> list[str] | None:
    """Class names in id order, from an adapter's `LABELS_FILE` or an HF classifier's config.json."""
    for name in (LABELS_FILE, "config.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            id2label = read_json(path, CheckpointError, "").get("id2label")
            if id2label:
                return [id2label[str(i)] for i in range(len(id2label))]
    return None
