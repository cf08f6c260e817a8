"""jpeft: functional fine-tuning for JAX/Flax that reads and writes Hugging Face formats."""
from jpeft.errors import AdapterError, CheckpointError, ConfigError, DataError, JpeftError
from jpeft.models import from_pretrained, save_pretrained
from jpeft.peft.lora import LoRA
