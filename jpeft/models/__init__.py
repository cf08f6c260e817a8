"""Model families owned by jpeft (transformers 5 has no Flax models)."""
from jpeft.models.config import ModelConfig
from jpeft.models.hf import from_pretrained, save_pretrained
from jpeft.models.llama import CausalLM, init_cache

__all__ = ["ModelConfig", "CausalLM", "init_cache", "from_pretrained", "save_pretrained"]
