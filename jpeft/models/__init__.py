"""Model families owned by jpeft (transformers 5 has no Flax models).

The model protocol: everything outside this package (trainer, loss, generation, methods,
sharding) uses only this surface of the module `from_pretrained` returns, so it knows no family:

- `model.apply({"params": p}, input_ids, attention_mask=None, positions=None, cache=None,
  return_hidden=False)`: logits, or the final hidden states the LM head reads;
- `model.head_leaves(p)`: the LM head's leaves (the tied embedding, transposed, or its own kernel
  with any adapter leaves), and `model.logits(head, hidden, rng=None)`: the head applied (soft-capped
  where the family does; `rng` drops its adapter's input), so a chunked loss can run the head chunk by chunk;
- `model.init_cache(batch, max_len)`: an empty KV cache for `apply(..., cache=...)`;
- `model.insertion_points`: the adapter hooks it calls (`jpeft.peft.sites.require` refuses others);
- encoder-decoders (`config.is_encoder_decoder`, T5) take decoder ids as `apply`'s second argument
  and encode once into their cache (`jpeft.models.t5`);
- `model.config` (a `ModelConfig`); the parameters' logical axes come with `abstract_params`,
  and their HF names from the tree paths (`jpeft.models.hf`).
"""
from jpeft.models.config import ModelConfig
from jpeft.models.hf import from_pretrained, save_pretrained
from jpeft.models.llama import CausalLM
from jpeft.models.t5 import T5

__all__ = ["ModelConfig", "CausalLM", "T5", "from_pretrained", "save_pretrained"]
