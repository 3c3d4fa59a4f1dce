// INT8 x INT8 tensor-core GEMM for Hopper (sm_90a): wgmma.mma_async s32.s8.s8 fed by TMA, with
// warp specialization. The `scaled_mm` of megaq's int8 recipes (megaq/kernels/dispatch.py).
//
// This header is plain CUDA/C++: no PyTorch types. The pybind11 binding lives in csrc/bindings.cpp.
//
// Computes, for 0 <= m < M, 0 <= n < N (A [M, K] and B [N, K] int8, both K-contiguous):
//
//   ROWCOL:   out[m, n] = float(sum_k A[m, k] * B[n, k]) * (sa[m] * sb[n]) (+ bias[n])
//             one INT32 sum over all of K (exact while K * 127^2 < 2^31, i.e. K < 133144 -- the
//             launcher refuses larger K; megaq's dispatcher uses BLOCK128 with row scales there).
//   BLOCK128: out[m, n] = sum_kb sa[m, kb] * sb[n / sb_rows, kb] * float(P_kb[m, n]) (+ bias[n])
//             P_kb = sum_{k in [128 kb, 128 kb + 128)} A[m, k] * B[n, k], exact in INT32, promoted
//             to an FP32 sum every K-block of 128 (the per-block scaling of DeepSeek-V3 / Jetfire).
//
// Scales are FP32 and addressed by element strides, so strided views need no copy:
//   ROWCOL:   sa[m] = scale_a[m * sa_stride_m], sb[n] = scale_b[n * sb_stride_n]; sb_rows must be 1.
//   BLOCK128: sa[m, kb] = scale_a[m * sa_stride_m + kb * sa_stride_kb] (sa_stride_kb = 0: one scale
//             per row over all K), sb[n, kb] = scale_b[(n / sb_rows) * sb_stride_n + kb * sb_stride_kb]
//             with sb_rows = 1 (a scale per row of B = per output column) or a multiple of 128
//             (one scale per 128 x 128 block of B, DeepSeek-V3's weights).
// bias: FP32 [N] or null. out: [M, N] with row stride ldc (elements), FP32 or BF16 (out_kind), or
// INT8 requantized per (1, 128) block of each row (out_kind INT8: the INT8 data flow's GEMM epilogue):
//   s[m, j] = amax_j / 127 (IEEE division; 1 for an all-zero block) with amax_j = max |v[m, n]| over
//   n in [128 j, 128 j + 128) of the FP32 value v above (bias included), written to
//   out_scale[m * ld_out_scale + j]; out[m, n] = rint(clamp(v[m, n] * r[m, j], -127, 127)), round to
//   nearest even, with r = 1 / s (IEEE). The scales are those of megaq.quant.quantize_blockwise(v,
//   (1, 128)) bit for bit; the values differ from its v / s only within 1.5 ulp of a rounding tie (one
//   INT8 step, ~1e-5 of them). A NaN in a block makes its scale NaN (the reference's torch.where would
//   give 1), so it never passes.
// gelu_q (optional; BF16 out, mode ROWCOL, default tile, no bias): the GELU's backward fused into the
// epilogue (the INT8 data flow's fc2 dgrad, whose output is the GELU output's gradient):
//   out[m, n] = v[m, n] * GELU'(h[m, n]),  h[m, n] = gelu_q[m * ld_gelu_q + n] * gelu_scale[m * ld_gelu_scale + n / 128]
// with GELU the tanh approximation and its derivative in FP32 (the formula of megaq's Triton data-flow
// kernels: one ex2.approx and one approximate reciprocal); v is rounded to BF16 first and the product
// again (the two-step path's roundings). gelu_q is int8 [M, N] (the GELU's saved INT8 input, 16-byte
// aligned), gelu_scale its FP32 (1, 128)-block scales; out rows must allow TMA stores (N % 8 == 0,
// 16-byte aligned rows).
// A NaN or Inf scale makes the affected outputs NaN/Inf (never silently finite).
//
// Requirements (the launcher returns cudaErrorInvalidValue otherwise): M, N >= 1 (any tails);
// K >= 16 and K % 16 == 0; lda, ldb (bytes) multiples of 16 and >= K; A and B 16-byte aligned
// (the TMA engine's rules: it zero-fills the K tail of the last 128-wide K tile, and rows past M / N);
// ldc >= N; INT8 out: out_scale non-null, ld_out_scale >= ceil(N / 128); gelu_q: gelu_scale non-null,
// ld_gelu_q == ldc (the GELU input has the output's layout), ld_gelu_scale >= ceil(N / 128), gelu_q
// 16-byte aligned, out rows 16-byte aligned, and the combination above (else invalid value).
//
// Architecture: sm_90a only (wgmma, setmaxnreg). The file compiles for every target (CI checks
// sm_80 / sm_89 / sm_90a); elsewhere the kernel body is compiled out and megaq_int8_gemm_check_device
// reports cudaErrorNotSupported, as it does for an sm_90 device running a build without sm_90a code.
//
// Design (int8_gemm_sm90.cu): persistent CTAs of 3 warpgroups -- one producer (TMA loads into a ring
// of shared-memory stages guarded by full/empty mbarriers; in BLOCK128 one more producer warp stages
// each K-block's scales), two consumers issuing wgmma from shared-memory descriptors (128-byte
// swizzle: a 128-wide int8 K tile is one swizzle row), each owning 64 rows of the 128-row tile.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

enum MegaqInt8GemmMode {
  MEGAQ_INT8_ROWCOL = 0,
  MEGAQ_INT8_BLOCK128 = 1,
};

enum MegaqInt8GemmOut {
  MEGAQ_INT8_OUT_F32 = 0,
  MEGAQ_INT8_OUT_BF16 = 1,
  MEGAQ_INT8_OUT_INT8 = 2,   // INT8 + FP32 scales per (1, 128) block of a row (needs out_scale)
};

// Tile configurations (M x N of one CTA's output tile). AUTO picks per mode; the others exist for
// tests and benchmarks. A configuration that does not apply to a mode is refused (invalid value).
enum MegaqInt8GemmTile {
  MEGAQ_INT8_TILE_AUTO = 0,
  MEGAQ_INT8_TILE_128x256 = 1,         // ROWCOL: 4 stages of 48 KB, stores from registers (AUTO with BF16
                                       // or INT8 out: 3 stages, and the tile leaves through TMA stores)
  MEGAQ_INT8_TILE_128x128 = 2,         // ROWCOL: 6 stages; BLOCK128: two INT32 accumulator sets
                                       // per consumer (block k+1 in flight while k is promoted), stores
                                       // from registers (AUTO with BF16 out: 5 stages, TMA stores)
  MEGAQ_INT8_TILE_128x128_SERIAL = 3,  // BLOCK128: one accumulator set, promote after each block
};

// cudaSuccess when the current device runs the kernel (sm_90 with this build's sm_90a code);
// cudaErrorNotSupported otherwise. The first call per device reads a device symbol (a synchronous
// copy, so not inside a CUDA graph capture); later calls return a cached answer.
cudaError_t megaq_int8_gemm_check_device(void);

// Launches the GEMM on `stream` (the current device). Returns cudaSuccess, cudaErrorInvalidValue for
// arguments that break the requirements above, cudaErrorNotSupported (see check_device), or the
// launch / driver error.
cudaError_t megaq_int8_gemm(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K,
                            int64_t lda, int64_t ldb, int mode, const float* scale_a,
                            int64_t sa_stride_m, int64_t sa_stride_kb, const float* scale_b,
                            int64_t sb_rows, int64_t sb_stride_n, int64_t sb_stride_kb,
                            const float* bias, void* out, int out_kind, int64_t ldc, float* out_scale,
                            int64_t ld_out_scale, const int8_t* gelu_q, int64_t ld_gelu_q,
                            const float* gelu_scale, int64_t ld_gelu_scale, int tile, int group_m,
                            cudaStream_t stream);

#ifdef __cplusplus
}
#endif
