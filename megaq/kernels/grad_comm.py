"""The fused passes of the error-feedback compressed gradient all-reduce (`int8_ef` / `int4_ef`,
`megaq.parallel.grad_compression`): Triton kernels (`megaq.kernels.triton_comm`) on the path
`megaq.kernels.dispatch` picks (CUDA sm_80+, or `MEGAQ_KERNELS=triton` under the interpreter).

One bucket of n gradient elements is viewed as `[rows, block]` with rows = world * rc (zero padded
to whole `world x block` units, as `megaq.parallel.quantized_comm._flat_blocks`); block rows
[j*rc, (j+1)*rc) belong to rank j. Per bucket:

    worker_quantize      g (+ e) -> INT8/INT4 + scales in the all-to-all send buffer, e in place
    (all-to-all)
    server_quantize      received shard -> FP32 sum (/ world) (+ E) -> requantized into the
                         all-gather segment, E in place
    (all-gather)
    dequantize_gathered  gathered segments -> out[:n]; a device flag set by any NaN scale
    zero_residuals_if_flag   both residuals zeroed when the flag is set (no host synchronization)

Exchange buffers are `megaq.parallel.quantized_comm`'s packed wire format with one scale per row:
uint8 `[world, seg]`, segment j = [rc FP32 scales | rc payload rows of block (INT8) or block/2
(packed INT4) bytes | zero pad to 16 bytes] (`exchange_buffer`). The kernels write and read that
layout in place, so no pack/unpack copies exist and the bytes on the wire are those of the torch path.

What they reproduce, bit for bit for round-to-nearest (tests/test_triton_comm.py): the torch path of
`grad_compression` — `quantize_propagating(g + e, (1, block))` (megaq.quant.quantize_blockwise plus a
NaN scale for blocks with NaN/Inf), e <- (g + e) - dequantize, the FP32 sum of the dequantized
received chunks in rank order, / world, + E, the same quantization again, dequantize. Stochastic
rounding draws from Philox keyed by a seed from torch's generator (as `megaq.kernels.quantize`): the
same distribution as the torch path, not the same numbers; the worker's counter is offset by the rank
so that ranks with equally seeded generators round independently.
"""

from __future__ import annotations

import torch

from . import dispatch
from .dispatch import _cdiv, _cfg, _qmax, _rint_libdevice, _seed_tensor

FUSED_BLOCKS = (32, 64, 128, 256, 512, 1024)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN = 16          # bytes: segment alignment of the packed wire format
# elements per program (rows x block) and warps; config_override keys COMM_TILE, COMM_WARPS
_TILE = 4096
_WARPS = 4



def _kernel(name: str):
    return dispatch._kernel("triton_comm", name)


def fused_supported(x: torch.Tensor, block: int, bits: int) -> bool:
    """Whether the fused kernels run for the 1-D bucket x: the Triton path by dispatch's rule,
    a float dtype, block a power of two in 32..1024, 8 or 4 bits."""
    return (bits in (4, 8) and block in FUSED_BLOCKS and x.dtype in _FLOATS and x.dim() == 1
            and x.is_contiguous() and dispatch._use_triton(x))


def row_bytes(block: int, bits: int) -> int:
    return block * bits // 8


def segment_bytes(rows_per_rank: int, block: int, bits: int) -> int:
    """Bytes of one rank's segment: rc scales, rc payload rows, padded to 16."""
    used = rows_per_rank * (4 + row_bytes(block, bits))
    return -(-used // _ALIGN) * _ALIGN


def exchange_buffer(world: int, rows_per_rank: int, block: int, bits: int, device) -> torch.Tensor:
    """uint8 [world, seg] for the kernels to fill; the pad bytes (the kernels never write them) are
    zeroed, as in the packed wire format."""
    seg = segment_bytes(rows_per_rank, block, bits)
    buf = torch.empty((world, seg), dtype=torch.uint8, device=device)
    used = rows_per_rank * (4 + row_bytes(block, bits))
    if used < seg:
        buf[:, used:].zero_()
    return buf


def _tile(block: int) -> tuple[int, int]:
    return max(1, _cfg("COMM_TILE", _TILE) // block), _cfg("COMM_WARPS", _WARPS)


def _check_rounding(rounding: str) -> bool:
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be one of ('nearest', 'stochastic'); got {rounding!r}")
    return rounding == "stochastic"


def _check_buffer(buf: torch.Tensor, world: int, rows_per_rank: int, block: int, bits: int, what: str):
    seg = segment_bytes(rows_per_rank, block, bits)
    if buf.dtype != torch.uint8 or tuple(buf.shape) != (world, seg) or not buf.is_contiguous():
        raise ValueError(f"{what} must be a contiguous uint8 [{world}, {seg}] buffer (world, segment "
                         f"bytes of {rows_per_rank} rows of {block} at {bits} bits); got "
                         f"{buf.dtype} {tuple(buf.shape)}")
    if buf.numel() >= 2 ** 31:   # the kernels' byte offsets within a buffer are 32-bit
        raise ValueError(f"{what} of {buf.numel()} bytes is over 2 GiB: use smaller buckets "
                         f"(GradCompressionState.bucket_numel)")


def _check_residual(residual: torch.Tensor | None, numel: int, side: str) -> None:
    if residual is not None and (residual.dtype != torch.float32 or residual.numel() != numel):
        raise ValueError(f"{side} residual must be FP32 of {numel} elements; got "
                         f"{residual.dtype} of {residual.numel()}")


def worker_quantize(x: torch.Tensor, residual: torch.Tensor | None, send: torch.Tensor,
                    rows_per_rank: int, block: int, bits: int, rounding: str = "nearest",
                    rank: int = 0) -> None:
    """Quantize the bucket x (1-D, n elements, zeros past n) plus the worker residual into `send`
    ([world, seg], world = its first dim); residual (FP32 [world * rc * block] or None without
    error feedback) <- (x + residual) - dequantized."""
    stochastic = _check_rounding(rounding)
    world = send.shape[0]
    total_rows = world * rows_per_rank
    _check_buffer(send, world, rows_per_rank, block, bits, "the send buffer")
    if x.numel() > total_rows * block:
        raise ValueError(f"bucket of {x.numel()} elements does not fit {total_rows} blocks of {block}")
    _check_residual(residual, total_rows * block, "worker")
    dev = x.device
    BR, nw = _tile(block)
    seed = _seed_tensor(dev, None, 1) if stochastic else send
    _kernel("_worker_kernel")[(_cdiv(total_rows, BR),)](
        x, x.numel(), residual if residual is not None else send, send.view(torch.int8),
        send.view(torch.float32), total_rows, rows_per_rank, send.shape[1], seed, rank * total_rows,
        BR=BR, BLOCK=block, BITS=bits, QMAX=_qmax(bits), HAS_RESIDUAL=residual is not None,
        STOCHASTIC=stochastic, RINT_LIBDEVICE=_rint_libdevice(), num_warps=nw, enable_fp_fusion=False)


def server_quantize(recv: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor,
                    rows_per_rank: int, block: int, bits: int, rounding: str = "nearest",
                    average: bool = True) -> None:
    """Sum the `world` received segments of this rank's shard (recv [world, seg]) in FP32, / world
    when `average`, + residual (FP32 [rc * block] or None), requantize into `out` (uint8 [1, seg]);
    residual <- that sum - dequantized."""
    stochastic = _check_rounding(rounding)
    world = recv.shape[0]
    _check_buffer(recv, world, rows_per_rank, block, bits, "the receive buffer")
    _check_buffer(out, 1, rows_per_rank, block, bits, "the all-gather segment")
    _check_residual(residual, rows_per_rank * block, "server")
    dev = recv.device
    BR, nw = _tile(block)
    seed = _seed_tensor(dev, None, 1) if stochastic else recv
    _kernel("_server_kernel")[(_cdiv(rows_per_rank, BR),)](
        recv.view(torch.int8), recv.view(torch.float32), world, rows_per_rank, recv.shape[1],
        residual if residual is not None else out, out.view(torch.int8), out.view(torch.float32), seed,
        BR=BR, BLOCK=block, BITS=bits, QMAX=_qmax(bits), AVERAGE=average,
        HAS_RESIDUAL=residual is not None, STOCHASTIC=stochastic, RINT_LIBDEVICE=_rint_libdevice(),
        num_warps=nw, enable_fp_fusion=False)


def dequantize_gathered(gathered: torch.Tensor, out: torch.Tensor, rows_per_rank: int, block: int,
                        bits: int) -> torch.Tensor:
    """Dequantize the all-gathered segments (uint8 [world, seg]) into `out` (1-D, the bucket's first
    n elements, FP32/BF16/FP16). Returns a device int32 [1] flag: 1 if a gathered scale is NaN."""
    world = gathered.shape[0]
    total_rows = world * rows_per_rank
    _check_buffer(gathered, world, rows_per_rank, block, bits, "the gathered buffer")
    if out.dim() != 1 or not out.is_contiguous() or out.dtype not in _FLOATS or out.numel() > total_rows * block:
        raise ValueError(f"out must be a contiguous 1-D float tensor of at most {total_rows * block} "
                         f"elements; got {out.dtype} {tuple(out.shape)}")
    flag = torch.zeros(1, dtype=torch.int32, device=gathered.device)
    BR, nw = _tile(block)
    _kernel("_dequant_gathered_kernel")[(_cdiv(total_rows, BR),)](
        gathered.view(torch.int8), gathered.view(torch.float32), total_rows, rows_per_rank,
        gathered.shape[1], out.numel(), out, flag, BR=BR, BLOCK=block, BITS=bits, num_warps=nw)
    return flag


def zero_residuals_if_flag(flag: torch.Tensor, worker: torch.Tensor, server: torch.Tensor) -> None:
    """worker.zero_() and server.zero_() when flag[0] != 0, decided on the device."""
    BLOCK = 4096
    _kernel("_zero_if_flag_kernel")[(_cdiv(max(worker.numel(), server.numel(), 1), BLOCK),)](
        flag, worker, worker.numel(), server, server.numel(), BLOCK=BLOCK, num_warps=4)
