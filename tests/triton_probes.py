"""Small Triton kernels that expose one `megaq.kernels.triton_quant` helper to a test (imported only by
tests that run under the Triton interpreter or on a GPU: it imports triton)."""

import triton
import triton.language as tl

from megaq.kernels import triton_quant


@triton.jit
def fixed_point_stochastic_kernel(a_ptr, rn_ptr, k_ptr, q_ptr, BLOCK: tl.constexpr, RINT_LIBDEVICE: tl.constexpr):
    """q = `triton_quant._quantize_scaled` (stochastic, QMAX 127) of the values a with the reciprocals
    rn and the 16-bit dithers k given, element by element (BLOCK elements per program)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rn = tl.load(rn_ptr + i)
    q = triton_quant._quantize_scaled(tl.load(a_ptr + i), rn * 0.0 + 1.0, rn, tl.load(k_ptr + i), True, 127,
                                      RINT_LIBDEVICE)
    tl.store(q_ptr + i, q)
