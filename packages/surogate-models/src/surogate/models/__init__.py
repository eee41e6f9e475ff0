"""surogate.models: Llama / Qwen2.5 / Qwen3 for training, with hand-written block backward passes, LoRA, QLoRA and
low-precision GEMM recipes (through surogate.quant), and Hugging Face safetensors in and out (full weights with the
source's sharding, or peft adapters)."""

from .__about__ import __version__
from ._errors import ModelError
from ._quant import QLORA_FORMATS, MemoryReport
from .config import ModelConfig
from .loading import init_model, load_pretrained
from .lora import LoraConfig
from .model import CausalLM

__all__ = [
    "CausalLM",
    "LoraConfig",
    "MemoryReport",
    "ModelConfig",
    "ModelError",
    "QLORA_FORMATS",
    "__version__",
    "init_model",
    "load_pretrained",
]
