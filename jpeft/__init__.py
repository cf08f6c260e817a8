"""jpeft: functional fine-tuning for JAX/Flax that reads and writes Hugging Face formats.

    model, params = jpeft.from_pretrained("hf_dir")
    params = jpeft.LoRA(rank=8, alpha=16, targets=["q_proj", "v_proj"]).init(key, params)
    logits = model.apply({"params": params}, input_ids)
    jpeft.save_adapter("out/adapter", params); plain = jpeft.merge(params)
"""
from jpeft.errors import AdapterError, CheckpointError, ConfigError, DataError, JpeftError
from jpeft.models import from_pretrained, save_pretrained
from jpeft.peft import Full, LoRA, count_parameters, merge, parameter_report, trainable_mask
from jpeft.peft.hf_format import load_adapter, save_adapter

__all__ = [
    "from_pretrained", "save_pretrained", "LoRA", "Full", "trainable_mask", "merge",
    "count_parameters", "parameter_report", "save_adapter", "load_adapter",
    "JpeftError", "CheckpointError", "AdapterError", "ConfigError", "DataError",
]
