"""megaq.ops — autograd operators built from the quantization numerics and kernels: the quantized
linear under a recipe, the INT8 data-flow LayerNorm and GELU, and causal attention that can keep
INT8 copies of its inputs and output for backward."""

from .attention import ATTENTION_SAVES, causal_attention, split_heads
from .layernorm import add_layernorm, layer_norm
from .dataflow import (Int8Activation, Int8Operand, gelu_operand, int8_gelu, int8_layernorm,
                       layernorm_operand)
from .dataflow_linear import data_flow_format, dataflow_linear
from . import weight_cache
from .linear import quantized_gemm, quantized_linear, quantize_operand
from .recipe import (RECIPE_PRESETS, GemmSpec, Int4Backward, OperandSpec, Recipe, RecipeError,
                     get_recipe)

__all__ = ["quantized_linear", "quantized_gemm", "quantize_operand", "Recipe", "GemmSpec",
           "OperandSpec", "Int4Backward", "RecipeError", "RECIPE_PRESETS", "get_recipe",
           "Int8Activation", "int8_layernorm", "int8_gelu",
           "Int8Operand", "layernorm_operand", "gelu_operand", "dataflow_linear", "data_flow_format",
           "weight_cache", "causal_attention", "split_heads", "ATTENTION_SAVES", "layer_norm", "add_layernorm"]
