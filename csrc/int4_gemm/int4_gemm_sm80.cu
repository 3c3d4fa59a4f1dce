// INT4 x INT4 -> INT32 GEMM on mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32.
// Contract, operand format and requirements: see int4_gemm.h. No PyTorch headers here (CI compiles
// this file alone for sm_80, sm_89 and sm_90a).
//
// Structure (one thread block = one 128 x 128 output tile, 256 threads = 8 warps):
//   * warps are laid out 2 (M) x 4 (N); each warp owns a 64 x 32 sub-tile = 4 x 4 mma tiles of 16 x 8,
//     i.e. 16 mma per k64 step and 64 INT32 accumulators per thread;
//   * K advances by BK = 128 values (64 bytes per row) per pipeline stage; 3 stages of
//     (128 + 128) rows x 64 bytes = 16 KiB each, filled with cp.async (16-byte chunks, zero-fill for
//     rows beyond M / N and chunks beyond K);
//   * shared memory rows are 64 bytes = four 16-byte chunks; chunk c of row r is stored at chunk
//     position c ^ ((r >> 1) & 3), which makes every ldmatrix (8 rows x 16 bytes) conflict-free;
//   * fragments come from ldmatrix.x4: for 4-bit operands the m16n8k64 A/B fragment layout is, in
//     bytes, the same as the m16n8k16 f16 layout in 16-bit words, so the usual b16 ldmatrix applies;
//   * epilogue straight from registers: out = float(acc) * scale_a[m] * scale_b[n], masked at the
//     M / N edges.
#include "int4_gemm.h"

#include <cuda_bf16.h>

namespace megaq {
namespace int4_gemm {

constexpr int BM = 128;              // rows of A per block
constexpr int BN = 128;              // rows of B (= output columns) per block
constexpr int BK = 128;              // K values per stage
constexpr int BK_BYTES = BK / 2;     // 64 bytes per row per stage
constexpr int STAGES = 3;
constexpr int THREADS = 256;
constexpr int WARPS_M = 2;
constexpr int WARPS_N = 4;
constexpr int WM = BM / WARPS_M;     // 64
constexpr int WN = BN / WARPS_N;     // 32
constexpr int MMA_M = 16, MMA_N = 8, MMA_K = 64;
constexpr int TM = WM / MMA_M;       // 4 mma tiles along M per warp
constexpr int TN = WN / MMA_N;       // 4 mma tiles along N per warp
constexpr int A_STAGE_BYTES = BM * BK_BYTES;                    // 8 KiB
constexpr int B_STAGE_BYTES = BN * BK_BYTES;                    // 8 KiB
constexpr int STAGE_BYTES = A_STAGE_BYTES + B_STAGE_BYTES;      // 16 KiB
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;                // 48 KiB
constexpr int CHUNKS_PER_ROW = BK_BYTES / 16;                   // 4
constexpr int A_CHUNKS_PER_THREAD = BM * CHUNKS_PER_ROW / THREADS;  // 2
constexpr int B_CHUNKS_PER_THREAD = BN * CHUNKS_PER_ROW / THREADS;  // 2
static_assert(A_CHUNKS_PER_THREAD * THREADS == BM * CHUNKS_PER_ROW, "A tile load split");
static_assert(B_CHUNKS_PER_THREAD * THREADS == BN * CHUNKS_PER_ROW, "B tile load split");
static_assert(BK % MMA_K == 0, "BK must be a multiple of the mma K");
static_assert(TN % 2 == 0 && TM * TN * 4 <= 64, "B fragments load two n8 tiles per ldmatrix.x4");

// Byte offset of 16-byte chunk `chunk` of tile row `row` inside one operand's stage buffer.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * BK_BYTES + ((chunk ^ ((row >> 1) & 3)) << 4);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 fills the 16 bytes with zeros (no global read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A(16x64, s4) * B(64x8, s4) + D, INT32 accumulate.
__device__ __forceinline__ void mma_s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Loads K tile `kt` of A rows [m0, m0+BM) and B rows [n0, n0+BN) into stage buffer `stage`.
__device__ __forceinline__ void load_tile(uint8_t* stage, const uint8_t* __restrict__ A,
                                          const uint8_t* __restrict__ B, int64_t M, int64_t N,
                                          int64_t k_bytes, int64_t lda, int64_t ldb, int64_t m0,
                                          int64_t n0, int kt, int tid) {
  const int64_t kb0 = static_cast<int64_t>(kt) * BK_BYTES;
  const uint32_t a_base = smem_addr(stage);
  const uint32_t b_base = smem_addr(stage + A_STAGE_BYTES);
#pragma unroll
  for (int i = 0; i < A_CHUNKS_PER_THREAD; ++i) {
    const int id = tid + i * THREADS;
    const int row = id / CHUNKS_PER_ROW;
    const int chunk = id % CHUNKS_PER_ROW;
    const int64_t gm = m0 + row;
    const int64_t gk = kb0 + chunk * 16;
    const bool ok = gm < M && gk < k_bytes;
    const uint8_t* src = ok ? A + gm * lda + gk : A;  // any valid address when zero-filling
    cp_async_16(a_base + swizzled_offset(row, chunk), src, ok ? 16 : 0);
  }
#pragma unroll
  for (int i = 0; i < B_CHUNKS_PER_THREAD; ++i) {
    const int id = tid + i * THREADS;
    const int row = id / CHUNKS_PER_ROW;
    const int chunk = id % CHUNKS_PER_ROW;
    const int64_t gn = n0 + row;
    const int64_t gk = kb0 + chunk * 16;
    const bool ok = gn < N && gk < k_bytes;
    const uint8_t* src = ok ? B + gn * ldb + gk : B;
    cp_async_16(b_base + swizzled_offset(row, chunk), src, ok ? 16 : 0);
  }
}

template <typename OutT>
struct Store;
template <>
struct Store<float> {
  __device__ __forceinline__ static void one(float* p, int acc, float s) {
    *p = static_cast<float>(acc) * s;
  }
};
template <>
struct Store<__nv_bfloat16> {
  __device__ __forceinline__ static void one(__nv_bfloat16* p, int acc, float s) {
    *p = __float2bfloat16_rn(static_cast<float>(acc) * s);
  }
};
template <>
struct Store<int32_t> {
  __device__ __forceinline__ static void one(int32_t* p, int acc, float) { *p = acc; }
};

template <typename OutT>
__global__ void __launch_bounds__(THREADS, 2)
    int4_gemm_kernel(const uint8_t* __restrict__ A, const uint8_t* __restrict__ B,
                     const float* __restrict__ scale_a, const float* __restrict__ scale_b,
                     OutT* __restrict__ out, int64_t M, int64_t N, int64_t K, int64_t lda,
                     int64_t ldb, int64_t ldc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / WARPS_N;  // 0..1
  const int warp_n = warp % WARPS_N;  // 0..3
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t k_bytes = K / 2;
  const int k_tiles = static_cast<int>((K + BK - 1) / BK);

  int acc[TM][TN][4];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  // Prologue: fill STAGES - 1 stages (always commit, so group counting stays uniform).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_tile(smem + s * STAGE_BYTES, A, B, M, N, k_bytes, lda, ldb, m0, n0, s, tid);
    cp_async_commit();
  }

  // ldmatrix row / chunk selected by this lane (see the fragment layout note at the top).
  // A x4: matrices (rows 0-7, lo chunk), (rows 8-15, lo), (rows 0-7, hi), (rows 8-15, hi) -> a0..a3.
  const int a_row_in_tile = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int a_chunk_hi = lane >> 4;
  // B x4: matrices (n 0-7, lo), (n 0-7, hi), (n 8-15, lo), (n 8-15, hi) -> b0,b1 of two n8 tiles.
  const int b_row_in_tile = (lane & 7) + (lane >> 4) * 8;
  const int b_chunk_hi = (lane >> 3) & 1;

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread) ...
    __syncthreads();              // ... for all threads; and stage (kt-1)%STAGES is free again.

    const int next = kt + STAGES - 1;
    if (next < k_tiles)
      load_tile(smem + (next % STAGES) * STAGE_BYTES, A, B, M, N, k_bytes, lda, ldb, m0, n0, next,
                tid);
    cp_async_commit();

    const uint8_t* stage = smem + (kt % STAGES) * STAGE_BYTES;
    const uint32_t a_base = smem_addr(stage);
    const uint32_t b_base = smem_addr(stage + A_STAGE_BYTES);

#pragma unroll
    for (int ks = 0; ks < BK / MMA_K; ++ks) {  // two k64 steps per stage
      uint32_t a_frag[TM][4];
      uint32_t b_frag[TN][2];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int row = warp_m * WM + i * MMA_M + a_row_in_tile;
        ldmatrix_x4(a_frag[i], a_base + swizzled_offset(row, ks * 2 + a_chunk_hi));
      }
#pragma unroll
      for (int j = 0; j < TN / 2; ++j) {
        const int row = warp_n * WN + j * 2 * MMA_N + b_row_in_tile;
        uint32_t r[4];
        ldmatrix_x4(r, b_base + swizzled_offset(row, ks * 2 + b_chunk_hi));
        b_frag[2 * j][0] = r[0];
        b_frag[2 * j][1] = r[1];
        b_frag[2 * j + 1][0] = r[2];
        b_frag[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) mma_s4(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue. Accumulator layout of m16n8: c0,c1 -> (row g, cols 2t, 2t+1); c2,c3 -> (row g+8, ...),
  // with g = lane / 4, t = lane % 4.
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + warp_m * WM + i * MMA_M + g + h * 8;
      if (m >= M) continue;
      const float sa = scale_a != nullptr ? scale_a[m] : 1.0f;
      OutT* out_row = out + m * ldc;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t n = n0 + warp_n * WN + j * MMA_N + 2 * t + c;
          if (n < N) {
            const float sb = scale_b != nullptr ? scale_b[n] : 1.0f;
            Store<OutT>::one(out_row + n, acc[i][j][h * 2 + c], sa * sb);
          }
        }
      }
    }
  }
#endif  // __CUDA_ARCH__ >= 800 (older targets get an empty kernel; the launcher refuses them)
}

template <typename OutT>
cudaError_t launch(const uint8_t* A, const uint8_t* B, const float* scale_a, const float* scale_b,
                   void* out, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                   int64_t ldc, cudaStream_t stream) {
  auto kernel = int4_gemm_kernel<OutT>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((N + BN - 1) / BN), static_cast<unsigned>((M + BM - 1) / BM));
  kernel<<<grid, THREADS, SMEM_BYTES, stream>>>(A, B, scale_a, scale_b, static_cast<OutT*>(out), M,
                                                 N, K, lda, ldb, ldc);
  return cudaGetLastError();
}

}  // namespace int4_gemm
}  // namespace megaq

extern "C" cudaError_t megaq_int4_gemm(const uint8_t* A, const uint8_t* B, const float* scale_a,
                                       const float* scale_b, void* out, int out_kind, int64_t M,
                                       int64_t N, int64_t K, int64_t lda_bytes, int64_t ldb_bytes,
                                       int64_t ldc, cudaStream_t stream) {
  using namespace megaq::int4_gemm;
  if (M < 0 || N < 0 || K < 0 || K % 32 != 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (ldc < N) return cudaErrorInvalidValue;
  if ((M + BM - 1) / BM > 65535 || (N + BN - 1) / BN > 0x7fffffff) return cudaErrorInvalidValue;
  if (K > 0) {
    if (A == nullptr || B == nullptr) return cudaErrorInvalidValue;
    if (lda_bytes < K / 2 || ldb_bytes < K / 2 || lda_bytes % 16 != 0 || ldb_bytes % 16 != 0)
      return cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(A) % 16 != 0 || reinterpret_cast<uintptr_t>(B) % 16 != 0)
      return cudaErrorInvalidValue;
  }
  if (out == nullptr) return cudaErrorInvalidValue;

  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNotSupported;  // no s4 mma before Ampere

  switch (out_kind) {
    case MEGAQ_OUT_F32:
      return launch<float>(A, B, scale_a, scale_b, out, M, N, K, lda_bytes, ldb_bytes, ldc, stream);
    case MEGAQ_OUT_BF16:
      return launch<__nv_bfloat16>(A, B, scale_a, scale_b, out, M, N, K, lda_bytes, ldb_bytes, ldc,
                                   stream);
    case MEGAQ_OUT_I32:
      return launch<int32_t>(A, B, nullptr, nullptr, out, M, N, K, lda_bytes, ldb_bytes, ldc,
                             stream);
    default:
      return cudaErrorInvalidValue;
  }
}
