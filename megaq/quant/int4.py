"""INT4 quantizers of "Training Transformers with 4-bit Integers" (ALGORITHMS.md §2).

- Hadamard quantizer (HQ): rotate the reduction axis with a block Hadamard, then quantize to INT4 —
  with a per-row dynamic scale (X per token, W per output channel) or an LSQ per-tensor step.
- Bit splitting: a gradient as a high INT4 part plus a stochastic-rounded INT4 residual, an
  INT8-precision gradient carried by two INT4 matrices.
"""

from __future__ import annotations

import math

import torch

from .blockwise import qmax_for_bits, quantize_blockwise, quantize_with_scale
from .checks import check_2d, check_finite
from .hadamard import block_hadamard, pad_to_multiple
from .tensor import QuantizedTensor

INT4_QMAX = 7
HQ_SCALE_MODES = ("row", "lsq")


def lsq_step(x: torch.Tensor, qmax: int = INT4_QMAX) -> torch.Tensor:
    """LSQ's step-size initialisation, 2·mean|x|/sqrt(qmax), as a `[1, 1]` FP32 scale.

    The paper cold-starts the learned step from this value every iteration, so using the
    initialisation directly is the same quantizer. Values beyond qmax·step clip."""
    step = 2.0 * x.float().abs().mean() / math.sqrt(qmax)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return step.reshape(1, 1)


def lsq_quantize(x: torch.Tensor, bits: int = 4, rounding: str = "nearest",
                 generator: torch.Generator | None = None) -> QuantizedTensor:
    """Quantize the 2-D `x` with one per-tensor LSQ step (`lsq_step`); values beyond qmax·step clip."""
    return quantize_with_scale(x.float(), lsq_step(x, qmax_for_bits(bits)), (-1, -1), bits, rounding, generator)


def hq_quantize(x: torch.Tensor, hadamard_block: int = 32, scale_mode: str = "row",
                check: bool = True) -> QuantizedTensor:
    """Hadamard quantizer: `Q4(pad(x) · H)` along the last dim.

    Returns the INT4 tensor in Hadamard space, shape `[R, C_padded]` where C is zero-padded to a
    multiple of `hadamard_block`. Multiply a product computed from it by H (self-inverse) to return to
    the original basis."""
    check_2d(x, "hq_quantize input")
    if check:
        check_finite(x, "hq_quantize input")
    rotated = block_hadamard(pad_to_multiple(x.float(), hadamard_block), hadamard_block)
    if scale_mode == "row":
        return quantize_blockwise(rotated, (1, -1), bits=4, check=False)
    if scale_mode == "lsq":
        return lsq_quantize(rotated, bits=4)
    raise ValueError(f"scale_mode must be one of {HQ_SCALE_MODES}; got {scale_mode!r}")


def bit_split(g: torch.Tensor, generator: torch.Generator | None = None,
              check: bool = True) -> tuple[QuantizedTensor, QuantizedTensor]:
    """Split `g` `[N, C]` into `(high, low)` INT4 tensors with per-row scales:
    high = Q4_nearest(g), low = Q4_stochastic(g − deq(high)), so g ≈ deq(high) + deq(low) with the
    residual's error unbiased. The low part's scale is about 1/14 of the high part's, giving roughly
    INT8 precision from two INT4 matrices (the rows of a 2N-row matrix for leverage score sampling)."""
    check_2d(g, "bit_split input")
    if check:
        check_finite(g, "bit_split input")
    high = quantize_blockwise(g.float(), (1, -1), bits=4, check=False)
    residual = g.float() - high.dequantize()
    low = quantize_blockwise(residual, (1, -1), bits=4, rounding="stochastic", generator=generator,
                             check=False)
    return high, low
