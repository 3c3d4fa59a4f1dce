// INT4 x INT4 -> INT32 tensor-core GEMM (mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32).
//
// This header is plain CUDA/C++: no PyTorch types. The pybind11 binding lives in csrc/bindings.cpp.
//
// Computes, for 0 <= m < M, 0 <= n < N:
//
//     acc[m, n] = sum_k A[m, k] * B[n, k]                       (exact, INT32)
//     out[m, n] = float(acc[m, n]) * scale_a[m] * scale_b[n]     (kOutF32 / kOutBF16)
//     out[m, n] = acc[m, n]                                      (kOutI32; scales ignored)
//
// i.e. out = (A @ B^T) * scale_a[:, None] * scale_b[None, :]  -- the `Y = X W^T` of a linear layer with
// per-token (row) scales for X and per-output-channel (column) scales for W.
//
// Operand format (shared with megaq/quant/packing.py: pack_int4 / unpack_int4):
//   * A is [M, K] and B is [N, K], both row-major with K contiguous ("row.col" in mma terms), two
//     4-bit values per byte: element 2i in the LOW nibble, element 2i+1 in the HIGH nibble of byte i,
//     each 4-bit two's complement in [-8, 7] (megaq produces [-7, 7]).
//   * lda_bytes / ldb_bytes: row strides in BYTES (K/2 for contiguous rows).
//   * Requirements (checked by the launcher, which returns cudaErrorInvalidValue otherwise):
//       K % 32 == 0 (each row is a whole number of 16-byte chunks; the Python wrapper
//         megaq.kernels.cuda_ext.int4_gemm zero-pads K up to a multiple of 32 -- zero nibbles
//         contribute nothing -- so callers may pass any K),
//       lda_bytes % 16 == 0, ldb_bytes % 16 == 0, A and B 16-byte aligned,
//       M, N >= 0 arbitrary (tails are masked: out-of-range rows are zero-filled in shared memory
//         and never stored), K tails inside a 128-wide K tile are zero-filled.
//   * scale_a: FP32 [M] (may be null = all ones), scale_b: FP32 [N] (may be null = all ones).
//   * out: [M, N] row-major with row stride ldc (elements), FP32, BF16 or INT32 per out_kind.
//
// Accumulation is exact in INT32 (|acc| <= 64 * K, so K < 2^25). float(acc) is exact while
// |acc| < 2^24 (always for K < 262144); the FP32 epilogue then rounds twice (scale_a * scale_b, and
// the product with acc): relative error <= 2^-23 against the exact value. BF16 rounds once more.
//
// Architectures: the native INT4 tensor-core path is sm_80 / sm_86 / sm_89 (A100, RTX 30xx / 40xx).
// The same code compiles for sm_90 (H100), where the s4 mma is emulated (measured ~47 TOP/s at
// 4096^3 against ~750-850 for torch._int_mm's INT8): correct but slow, use the INT8 tensor cores
// there. nvcc 13.0 also compiles it for sm_100 / sm_120 (not run). For targets below sm_80 the kernel
// body is compiled out and the launcher returns cudaErrorNotSupported on such a device.
//
// Tiling: 128 x 128 x 128 (M x N x K) thread-block tile, 8 warps each computing 64 x 32, 3-stage
// cp.async pipeline through 48 KiB of dynamic shared memory (XOR-swizzled, conflict-free ldmatrix).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

enum MegaqInt4OutKind {
  MEGAQ_OUT_F32 = 0,
  MEGAQ_OUT_BF16 = 1,
  MEGAQ_OUT_I32 = 2,
};

// Launches the GEMM on `stream`. Returns cudaSuccess, cudaErrorInvalidValue for arguments that break
// the requirements above, cudaErrorNotSupported when the current device has no s4
// mma (compute capability < 8.0), or the launch error.
cudaError_t megaq_int4_gemm(const uint8_t* A, const uint8_t* B, const float* scale_a,
                            const float* scale_b, void* out, int out_kind, int64_t M, int64_t N,
                            int64_t K, int64_t lda_bytes, int64_t ldb_bytes, int64_t ldc,
                            cudaStream_t stream);

#ifdef __cplusplus
}
#endif
