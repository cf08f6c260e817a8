"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): prompt tuning whose n virtual-token embeddings are the
output of a trained encoder, with PEFT's semantics (its MLP encoder, `encoder_reparameterization_type="MLP"`).

    prompt = MLP(E),   MLP: Linear(D, H), ReLU, Linear(H, H), ReLU, Linear(H, D);   E [n, D]

The encoder's leaves live beside the token embedding table, as prompt tuning's soft prompt does:
`p_tuning_embedding` [n, D] and `p_tuning_{in,mid,out}_{kernel,bias}` (H: `projection`, PEFT's
`encoder_hidden_size`, by default D). The embedding insertion point prepends the encoded prompt exactly where
prompt tuning prepends its own (an encoder-decoder's encoder input only). As PEFT does, `save_adapter` writes the
encoded prompt (`prompt_embeddings`) in a P_TUNING dir, which PEFT reads for inference without its encoder, and
`load_adapter` reads such a dir (an MLP or LSTM encoder's alike) as the prompt-tuning tree it is at inference.
PEFT's init: E ~ N(0, 1), the linear layers torch's default. Parameters: n·D + (D+1)·H + (H+1)·H + (H+1)·D.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft import tree as T
from jpeft.errors import JpeftError
from jpeft.peft.base import Method, linear_uniform
from jpeft.peft.prompt import _table_path, from_peft as read_prompt, peft_prompt

LAYERS = ("in", "mid", "out")


class PTuning(Method):
    name = "p_tuning"
    peft_type = "P_TUNING"
    trainable = ("p_tuning_embedding", *(f"p_tuning_{layer}_{part}" for layer in LAYERS for part in ("kernel", "bias")))
    cached = True  # a prefill writes the virtual tokens into the KV cache

    def __init__(self, num_virtual_tokens: int = 20, projection: int | None = None):
        if num_virtual_tokens < 1 or (projection is not None and projection < 1):
            raise JpeftError(f"P-tuning needs num_virtual_tokens >= 1 and projection None or >= 1, "
                             f"got {num_virtual_tokens} and {projection}")
        self.num_virtual_tokens, self.projection = num_virtual_tokens, projection

    def __repr__(self):
        return f"PTuning(num_virtual_tokens={self.num_virtual_tokens}, projection={self.projection})"

    def init(self, key, params):
        path = _table_path(params)
        d = T.flatten(params)[path].shape[-1]
        h = self.projection or d
        keys = iter(jax.random.split(key, 7))
        leaves = {"p_tuning_embedding": jax.random.normal(next(keys), (self.num_virtual_tokens, d))}
        for layer, (fan_in, fan_out) in zip(LAYERS, ((d, h), (h, h), (h, d))):
            leaves[f"p_tuning_{layer}_kernel"] = linear_uniform(next(keys), (fan_in, fan_out), fan_in)
            leaves[f"p_tuning_{layer}_bias"] = linear_uniform(next(keys), (fan_out,), fan_in)
        module = path.rsplit("/", 1)[0]
        return T.combine(params, T.unflatten({f"{module}/{name}": value for name, value in leaves.items()}))

    @staticmethod
    def embed_prepend(leaves, batch: int):
        prompt = encoded(leaves)
        return jnp.broadcast_to(prompt, (batch, *prompt.shape))

    @staticmethod
    def virtual_tokens(leaves: dict) -> tuple[int, int]:
        return (leaves["p_tuning_embedding"].shape[0], 0) if "p_tuning_embedding" in leaves else (0, 0)


def encoded(leaves) -> jax.Array:
    """The prompt [n, D] the encoder gives, in float32."""
    h = leaves["p_tuning_embedding"].astype(jnp.float32)
    for i, layer in enumerate(LAYERS):
        h = h @ leaves[f"p_tuning_{layer}_kernel"].astype(jnp.float32) + leaves[f"p_tuning_{layer}_bias"]
        h = jax.nn.relu(h) if i < len(LAYERS) - 1 else h
    return h


def to_peft(modules: dict, tree: dict) -> tuple[dict, dict]:
    """PEFT's P_TUNING dir: the encoded prompt, and the encoder's description PEFT keeps beside it."""
    ((path, leaves),) = modules.items()
    tensors, config = peft_prompt(path, jax.device_get(encoded(leaves)))
    return tensors, {**config, "encoder_reparameterization_type": "MLP",
                     "encoder_hidden_size": int(leaves["p_tuning_in_kernel"].shape[-1]), "encoder_num_layers": 2,
                     "encoder_dropout": 0.0}


from_peft = read_prompt  # a P_TUNING dir holds the encoded prompt: at inference it is that prompt-tuning tree
