"""megaq: GPT pretraining with every linear layer on integer tensor cores (INT8 / INT4)."""

__version__ = "0.1.0"
