"""megaq.kernels — fast implementations of megaq.quant's functions, chosen per device.

Callers (megaq.ops) use only these functions and never check for CUDA themselves: `dispatch` decides
to run the Triton kernels on CUDA GPUs (sm_80+, tuned for sm_90) and the `megaq.quant` reference
elsewhere; `quantizers` and `gemm` hold the functions and their launchers (dispatch's docstring: the
layering). `MEGAQ_KERNELS=reference|triton|auto` forces a path (`triton` on CPU tensors needs
TRITON_INTERPRET=1).
"""

from .dispatch import config_override, kernel_mode, triton_available
from .gemm import scaled_mm
from .quantizers import (dequantize, hadamard_quantize, hadamard_quantize_delayed, hadamard_quantize_dual, quantize,
                         quantize_dual, requantize_transposed)
from .int4 import (BitSplitGradient, bit_split_int4, hq_quantize_int4, int4_mm, int4_sampled_gradients)

__all__ = ["quantize", "quantize_dual", "hadamard_quantize", "hadamard_quantize_dual", "hadamard_quantize_delayed",
           "dequantize", "requantize_transposed",
           "scaled_mm", "kernel_mode", "triton_available", "config_override",
           "hq_quantize_int4", "int4_mm", "bit_split_int4", "int4_sampled_gradients", "BitSplitGradient"]
