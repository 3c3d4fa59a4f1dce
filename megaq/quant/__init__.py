"""megaq.quant — the numerics of INT8 (Jetfire) and INT4 (HQ + bit splitting + LSS) training, in plain
PyTorch on any device. This is the specification every GPU kernel is tested against; it never imports
kernels."""

from .blockwise import (SUPPORTED_BITS, block_absmax, dequantize, fake_quantize, qmax_for_bits,
                        quantize_blockwise, quantize_with_scale, resolve_block)
from .delayed import DelayedAmax, quantize_rows_delayed, update_prediction
from .checks import NonFiniteError, check_finite
from .hadamard import SUPPORTED_HADAMARD_BLOCKS, block_hadamard, hadamard_matrix, pad_to_multiple
from .int4 import HQ_SCALE_MODES, bit_split, hq_quantize, lsq_quantize, lsq_step
from .lss import (LSS_MODES, keep_probabilities, leverage_score_sample, leverage_score_weights,
                  leverage_scores)
from .packing import pack_int4, unpack_int4
from .rounding import ROUNDING_MODES, round_nearest, round_stochastic
from .tensor import QuantizedTensor

__all__ = [
    "QuantizedTensor", "quantize_blockwise", "quantize_with_scale", "dequantize", "fake_quantize",
    "block_absmax", "qmax_for_bits", "resolve_block", "SUPPORTED_BITS",
    "round_nearest", "round_stochastic", "ROUNDING_MODES",
    "check_finite", "NonFiniteError",
    "DelayedAmax", "quantize_rows_delayed", "update_prediction",
    "hadamard_matrix", "block_hadamard", "pad_to_multiple", "SUPPORTED_HADAMARD_BLOCKS",
    "pack_int4", "unpack_int4",
    "hq_quantize", "lsq_step", "lsq_quantize", "bit_split", "HQ_SCALE_MODES",
    "leverage_scores", "keep_probabilities", "leverage_score_sample", "leverage_score_weights",
    "LSS_MODES",
]
