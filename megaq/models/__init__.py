"""Models built from megaq.nn: the tensor-parallel, quantized GPT and its Hugging Face export."""

from megaq.models.gpt import GPT, GPTConfig, configure_optimizer_groups

__all__ = ["GPT", "GPTConfig", "configure_optimizer_groups"]
