"""megaq.kernels — fast implementations of megaq.quant's functions, chosen per device.

Callers (megaq.ops) use only these functions and never check for CUDA themselves: `dispatch` runs the
Triton kernels on CUDA GPUs (sm_80+, tuned for sm_90) and the `megaq.quant` reference elsewhere.
`MEGAQ_KERNELS=reference|triton|auto` forces a path (`triton` on CPU tensors needs TRITON_INTERPRET=1).
"""

from .dispatch import (config_override, dequantize, hadamard_quantize, kernel_mode, quantize,
                       quantize_dual, scaled_mm, triton_available)

__all__ = ["quantize", "quantize_dual", "hadamard_quantize", "dequantize", "scaled_mm",
           "kernel_mode", "triton_available", "config_override"]
