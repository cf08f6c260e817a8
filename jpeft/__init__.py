"""jpeft: functional fine-tuning for JAX/Flax that reads and writes Hugging Face formats.

    model, params = jpeft.from_pretrained("hf_dir")
    params = jpeft.LoRA(rank=8, alpha=16, targets=["q_proj", "v_proj"]).init(key, params)
    logits = model.apply({"params": params}, input_ids)
    jpeft.save_adapter("out/adapter", params); plain = jpeft.merge(params)

Names load on first use, so `jpeft --help` and the PyTorch bench worker never import jax.
"""
import importlib

from jpeft.errors import AdapterError, CheckpointError, ConfigError, DataError, JpeftError

_LAZY = {
    "from_pretrained": "jpeft.models.hf", "save_pretrained": "jpeft.models.hf",
    **{name: "jpeft.peft" for name in ("LoRA", "QLoRA", "VeRA", "LoHa", "LoKr", "OFT", "HRA", "IA3", "RoAd", "TrainableTokens", "BitFit", "NormTuning", "Bottleneck",
                                       "Full", "modules_to_save", "freeze", "trainable_mask", "merge", "count_parameters", "parameter_report")},
    **{name: "jpeft.peft" for name in ("PromptTuning", "PTuning", "PrefixTuning", "LlamaAdapter", "select_task")},
    "Classifier": "jpeft.peft", "classify": "jpeft.peft",
    **{name: "jpeft.peft.multi" for name in ("add_adapter", "use_adapter", "route", "add_weighted_adapter")},
    "save_adapter": "jpeft.peft.hf_format", "load_adapter": "jpeft.peft.hf_format",
}
SUBMODULES = ("data", "evaluate", "generate", "models", "parallel", "peft", "train")
__all__ = [*_LAZY, "JpeftError", "CheckpointError", "AdapterError", "ConfigError", "DataError"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in SUBMODULES:  # jpeft.parallel.make_mesh(...) after a plain `import jpeft`
        return importlib.import_module(f"jpeft.{name}")
    raise AttributeError(f"module 'jpeft' has no attribute {name!r}")
