// INT8 x INT8 -> INT32 GEMM on Hopper: TMA + mbarrier ring + wgmma.mma_async s32.s8.s8, warp-specialized.
// Contract, scale layouts and requirements: see int8_gemm.h. No PyTorch headers here (CI compiles this
// file alone for sm_80, sm_89 and sm_90a; the kernel body exists only in the sm_90a pass).
//
// One persistent CTA per SM, 384 threads = 3 warpgroups:
//   * warpgroup 2 (producer, registers cut to 56 by setmaxnreg): thread 256 walks the CTA's tiles and,
//     per K-block of 128, waits until a ring stage is free (empty mbarrier), then TMA-loads the A tile
//     [128 x 128] and the B tile [BN x 128] into it (128-byte swizzle; the TMA engine zero-fills rows
//     past M / N and columns past K) and arms the stage's full mbarrier with the byte count. In BLOCK128
//     mode warp 9 copies the K-block's scales (sa for the 128 rows, sb for the BN columns) into the same
//     stage with cp.async, whose completion arrives on the full mbarrier too (32 arrivals): the warp
//     never waits for its loads.
//   * warpgroups 0 and 1 (consumers, 224 registers): warpgroup w owns rows [64 w, 64 w + 64) of the tile
//     and issues, per K-block, four wgmma m64nBNk32 (K = 4 x 32) from shared-memory descriptors into
//     INT32 accumulators held in registers; a consumer warp arrives on the empty mbarrier once the
//     wgmmas that read the stage have completed (wgmma.wait_group).
//       ROWCOL: one INT32 accumulation over all of K, kept in flight one K-block deep (wait_group 1);
//               epilogue float(acc) * sa[m] * sb[n] (+ bias).
//       BLOCK128 (tile 128x128): two INT32 accumulator sets. Block k+1's wgmmas are issued into one set
//               before block k's set is promoted (I2F + FFMA into the FP32 sum with sa * sb), so the
//               promotion overlaps tensor-core work of the same warpgroup (and of the other one).
//       BLOCK128 SERIAL: one set; issue, wait, promote (for comparison; the other warpgroup's wgmmas are
//               the only overlap, as in DeepGEMM's FP8 kernel).
//   Epilogue: the tile's column scales and bias are loaded at the start of the tile and parked in shared
//   memory after the K loop. BF16 out with 16-byte aligned rows (the default launch, TMA_OUT): each
//   consumer warpgroup writes its 64 rows into an output tile in shared memory (128-byte swizzle) and
//   one thread hands it to TMA stores, which drain while the warpgroup runs its next tile's main loop
//   (stores from registers took 15-33% of the kernel's time at K <= 4096 on an H100: every SM stored its
//   tile at the same moment, at HBM's write rate); the tile costs a ring stage. Otherwise each warp
//   stages 4 output rows at a time in shared memory and writes them with 16-byte stores (whole
//   sectors), or, when out rows are not 16-byte aligned, stores its fragment directly. INT8 out (the
//   data flow's fc1): the fragment becomes its FP32 values in place, each row's 128-column blocks get
//   their abs-max (a lane quad holds a block row) and scale, and the requantized bytes leave as the
//   BF16 tile does: through TMA stores from a shared-memory tile in the default launch
//   (store_tile_int8_tma), else through the staging rows (store_tile_int8). GELU_BWD (the data flow's fc2 dgrad, BF16 out through TMA
//   stores): the staged BF16 tile is multiplied by GELU' of the GELU's INT8 input at each place
//   before the TMA store (gelu_backward_rows), so that the GEMM writes the GELU input's gradient.
//   Tiles are visited in grouped order (group_m row tiles walk the column tiles together, for L2 reuse).
// wgmma operand descriptors: K-major, 128-byte swizzle, 8-row core-matrix groups 1024 bytes apart; the
// k-th 32-byte slice of a 128-byte row starts 32 k bytes into the (1024-aligned) tile.
#include "int8_gemm.h"

#include <cuda.h>           // CUtensorMap and its enums (types only: nothing links libcuda)
#include <cudaTypedefs.h>   // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_bf16.h>

#include <atomic>
#include <type_traits>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MEGAQ_INT8_GEMM_SM90A 1
#endif

namespace megaq {
namespace int8_gemm {

constexpr int BM = 128;                    // rows of A per tile (two consumer warpgroups x 64)
constexpr int BK = 128;                    // K per stage: one 128-byte swizzle row of int8
constexpr int THREADS = 384;               // 2 consumer warpgroups + 1 producer warpgroup
// setmaxnreg only moves registers inside the CTA's launch allocation (the kernel's register count x
// 384): 128 x 56 + 256 x 224 = 384 x 168, the most __launch_bounds__(384, 1) gives. The launcher
// checks the compiled count, since a smaller one would leave the consumers' setmaxnreg.inc waiting.
constexpr int PRODUCER_REGISTERS = 56;
constexpr int CONSUMER_REGISTERS = 224;
constexpr int LAUNCH_REGISTERS = (128 * PRODUCER_REGISTERS + 256 * CONSUMER_REGISTERS) / THREADS;
constexpr int DEFAULT_GROUP_M = 8;
constexpr int64_t ROWCOL_MAX_K = 133143;   // K * 127^2 < 2^31: the INT32 sum over all of K is exact

// Set in the sm_90a device pass only: lets the host tell a build with sm_90a code from one without.
__device__ int g_has_sm90a_code =
#ifdef MEGAQ_INT8_GEMM_SM90A
    1;
#else
    0;
#endif

struct Params {
  int M, N, K;
  const float* scale_a;
  int64_t sa_stride_m, sa_stride_kb;
  const float* scale_b;
  int64_t sb_rows, sb_stride_n, sb_stride_kb;
  // GELU_BWD kernels take no bias and write BF16, so their inputs share the bias and INT8-out fields
  // (a larger Params changed the SASS of every kernel): the GELU's INT8 input [M, N] (row stride
  // ldc, as out) and its (1, 128)-block scales, [M, ceil(N / 128)] with row stride ld_gelu_scale
  union {
    const float* bias;
    const int8_t* gelu_q;
  };
  void* out;
  int64_t ldc;
  union {
    float* out_scale;      // INT8 out: the (1, 128) blocks' scales, [M, ceil(N / 128)] with row stride
    const float* gelu_scale;
  };
  union {
    int64_t ld_out_scale;  // ld_out_scale (elements)
    int64_t ld_gelu_scale;
  };
  int group_m;
  bool pair_store;   // out rows and pointer allow 2-element vector stores
  bool row_store;    // out rows and pointer are 16-byte aligned: the staged, coalesced epilogue
  bool tma_store;    // the kernel writes its tiles with TMA stores (tmap_c; TMA_OUT kernels only)
};

template <int BN, int STAGES, bool BLOCKED, bool TMA_OUT = false, int OUT_ELEM = 2>
struct Layout {
  static constexpr int A_BYTES = BM * BK;
  static constexpr int B_BYTES = BN * BK;
  static constexpr int SCALES = BLOCKED ? BM + BN : 0;   // floats per stage
  static constexpr int A_OFFSET = 0;
  static constexpr int B_OFFSET = STAGES * A_BYTES;
  // TMA_OUT: the output tile, [BM x BN] elements of OUT_ELEM bytes as column chunks of 128-byte rows
  // (BF16: 64 columns, INT8: 128; 128-byte swizzle), which TMA stores write out while the next tile's
  // main loop runs
  static constexpr int OUT_BYTES = TMA_OUT ? BM * BN * OUT_ELEM : 0;
  static constexpr int OUT_OFFSET = B_OFFSET + STAGES * B_BYTES;
  static constexpr int SCALE_OFFSET = OUT_OFFSET + OUT_BYTES;
  // epilogue columns of a tile, double-buffered by tile parity: ROWCOL's sb, then the bias
  static constexpr int EPILOGUE_OFFSET = SCALE_OFFSET + STAGES * SCALES * 4;
  // per consumer warp, 4 output rows of up to 512 bytes (+16 against bank conflicts), where the
  // epilogue turns the fragment layout into whole rows for coalesced 16-byte stores (TMA_OUT kernels
  // use the output tile's memory for it when they cannot store with TMA)
  static constexpr int STAGING_PITCH = 512 + 16;
  static constexpr int STAGING_OFFSET = TMA_OUT ? OUT_OFFSET : EPILOGUE_OFFSET + 2 * 2 * BN * 4;
  static constexpr int BARRIER_OFFSET =
      TMA_OUT ? EPILOGUE_OFFSET + 2 * 2 * BN * 4 : STAGING_OFFSET + 8 * 4 * STAGING_PITCH;
  static constexpr int BYTES = BARRIER_OFFSET + 2 * STAGES * 8;
  static constexpr int ALLOC = BYTES + 1024;   // room to align the dynamic buffer to 1024
  static_assert(A_BYTES % 1024 == 0 && B_BYTES % 1024 == 0, "swizzle atoms must stay 1024-aligned");
  static_assert(!TMA_OUT || 8 * 4 * STAGING_PITCH <= OUT_BYTES, "staging fits in the output tile");
  static_assert(ALLOC <= 227 * 1024, "shared memory per block");
};

// Output tile (m_block, n_block) of linear tile index t: group_m row tiles walk the column tiles.
__device__ __forceinline__ void tile_coords(int t, int num_m, int num_n, int group_m, int& m_block,
                                            int& n_block) {
  const int per_group = group_m * num_n;
  const int first_m = (t / per_group) * group_m;
  const int rows = min(num_m - first_m, group_m);
  const int r = t % per_group;
  m_block = first_m + r % rows;
  n_block = r / rows;
}

#ifdef MEGAQ_INT8_GEMM_SM90A

constexpr int WGMMA_K = 32;
constexpr int PRODUCER_WARP = 8;           // first warp of the producer warpgroup: issues the TMA loads
constexpr int SCALE_WARP = 9;              // stages the BLOCK128 scales
constexpr int CONSUMER_ARRIVALS = 8;       // one per consumer warp on each empty mbarrier

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}

// Blocks until the phase of `bar` with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// TMA: box at coordinates (x = K offset, y = row) of `map` into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int x,
                                            int y) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(x), "r"(y)
      : "memory");
}

// TMA: shared-memory box to coordinates (x = column, y = row) of `map`, in this thread's bulk group.
// Rows and columns outside the map's extent are not written.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int x, int y) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_u32(src)), "r"(x), "r"(y)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Waits until this thread's bulk groups have read their shared memory (the buffer may be rewritten).
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}
// Waits until this thread's bulk groups are complete (their writes done).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// Makes this thread's shared-memory writes visible to the TMA engine (the async proxy).
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// Barrier 2 + w among the 128 threads of consumer warpgroup w.
__device__ __forceinline__ void warpgroup_sync(int w) {
  asm volatile("bar.sync %0, 128;" ::"r"(2 + w) : "memory");
}

// 4-byte global -> shared copy (zero-filled, no read, when !valid); completion is tracked by
// cp_async_arrive_on, so the copying warp never waits for it.
__device__ __forceinline__ void cp_async_4(float* dst, const float* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}

// One arrival on `bar` (counted in its init count) once this thread's earlier cp.async are complete.
__device__ __forceinline__ void cp_async_arrive_on(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(bar)) : "memory");
}

// Barrier 1 among the 256 consumer threads (barrier 0 is __syncthreads).
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, 256;" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accumulator reads / writes across the asynchronous wgmma statements.
template <int N>
__device__ __forceinline__ void fence_operands(int (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(acc[i])::"memory");
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, stride between 8-row groups 1024 bytes.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  return static_cast<uint64_t>((smem_u32(p) & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (static_cast<uint64_t>(1) << 62);
}

// D[64 x N] (+)= A[64 x 32] * B[N x 32]^T, s8 inputs, s32 accumulators; accumulate = 0 overwrites D.
// The two shapes differ only in N: the asm placeholders and "+r" operand lists of the first 64
// accumulators are shared, the 256-wide shape appends 64 more.
#define MEGAQ_WGMMA_D8(i)                                                                             \
  "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3]), "+r"(d[i + 4]), "+r"(d[i + 5]),         \
      "+r"(d[i + 6]), "+r"(d[i + 7])
#define MEGAQ_WGMMA_D64(i)                                                                            \
  MEGAQ_WGMMA_D8(i), MEGAQ_WGMMA_D8(i + 8), MEGAQ_WGMMA_D8(i + 16), MEGAQ_WGMMA_D8(i + 24),            \
      MEGAQ_WGMMA_D8(i + 32), MEGAQ_WGMMA_D8(i + 40), MEGAQ_WGMMA_D8(i + 48), MEGAQ_WGMMA_D8(i + 56)
#define MEGAQ_WGMMA_REGS_0_63                                                                         \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "                  \
  "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "                  \
  "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "                  \
  "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MEGAQ_WGMMA_REGS_64_127                                                                       \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, "       \
  "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, "                  \
  "%98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, "              \
  "%126, %127"

template <int N>
struct Wgmma;

template <>
struct Wgmma<128> {
  __device__ __forceinline__ static void mma(int (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {" MEGAQ_WGMMA_REGS_0_63 "}, %64, %65, p;\n}\n"
        : MEGAQ_WGMMA_D64(0)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  }
};

template <>
struct Wgmma<256> {
  __device__ __forceinline__ static void mma(int (&d)[128], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {" MEGAQ_WGMMA_REGS_0_63 ", " MEGAQ_WGMMA_REGS_64_127
        "}, %128, %129, p;\n}\n"
        : MEGAQ_WGMMA_D64(0), MEGAQ_WGMMA_D64(64)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  }
};

#undef MEGAQ_WGMMA_D8
#undef MEGAQ_WGMMA_D64
#undef MEGAQ_WGMMA_REGS_0_63
#undef MEGAQ_WGMMA_REGS_64_127

// One K-block (4 x k32) of this warpgroup's 64 x BN product into acc; the first wgmma overwrites acc
// unless `accumulate`. Descriptors advance 32 bytes (2 in the >>4 encoding) per k32 slice.
template <int BN>
__device__ __forceinline__ void issue_block(int (&acc)[BN / 2], uint64_t desc_a, uint64_t desc_b,
                                            bool accumulate) {
  fence_operands(acc);
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < BK / WGMMA_K; ++k)
    Wgmma<BN>::mma(acc, desc_a + 2 * k, desc_b + 2 * k, (k > 0 || accumulate) ? 1 : 0);
  wgmma_commit();
}

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* p, float v0, float v1, bool both, bool pair);
template <>
__device__ __forceinline__ void store_pair<float>(float* p, float v0, float v1, bool both, bool pair) {
  if (both && pair) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  } else {
    p[0] = v0;
    if (both) p[1] = v1;
  }
}
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* p, float v0, float v1, bool both,
                                                          bool pair) {
  if (both && pair) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
  } else {
    p[0] = __float2bfloat16_rn(v0);
    if (both) p[1] = __float2bfloat16_rn(v1);
  }
}

// Where a consumer thread's accumulators sit in its warpgroup's 64 x BN tile (wgmma D fragment):
// acc[4 i + 2 h + c] is row (16 warp + lane / 4 + 8 h), column (8 i + 2 (lane % 4) + c).
struct Fragment {
  int row;   // tile row of h = 0 (h = 1 is row + 8), including the warpgroup's 64-row offset
  int col;   // tile column of i = 0, c = 0
  __device__ __forceinline__ Fragment(int warpgroup, int thread_in_group) {
    const int warp = thread_in_group / 32, lane = thread_in_group % 32;
    row = warpgroup * 64 + warp * 16 + lane / 4;
    col = 2 * (lane % 4);
  }
};

// Writes the tile at (m0, n0), masked to M x N. Fragment element j (row half h) of tile column c is
// value(j, h, col_scale[c]) + col_bias[c]; col_scale / col_bias are the tile's BN columns in shared
// memory (zeros past N).
template <int BN, typename OutT, typename Value>
__device__ __forceinline__ void store_tile(const Value& value, const float* col_scale, const float* col_bias,
                                           const Params& p, const Fragment& f, int m0, int n0) {
  OutT* out = static_cast<OutT*>(p.out);
  const int r0 = m0 + f.row;
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int c = 8 * i + f.col;
    if (n0 + c >= p.N) continue;
    const bool both = n0 + c + 1 < p.N;
    const float2 s = *reinterpret_cast<const float2*>(col_scale + c);
    const float2 b = *reinterpret_cast<const float2*>(col_bias + c);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + 8 * h;
      if (r < p.M)
        store_pair<OutT>(out + static_cast<int64_t>(r) * p.ldc + n0 + c, value(4 * i + 2 * h, h, s.x) + b.x,
                         value(4 * i + 2 * h + 1, h, s.y) + b.y, both, p.pair_store);
    }
  }
}

template <typename OutT>
__device__ __forceinline__ void put_pair(uint8_t* p, float v0, float v1);
template <>
__device__ __forceinline__ void put_pair<float>(uint8_t* p, float v0, float v1) {
  *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
}
template <>
__device__ __forceinline__ void put_pair<__nv_bfloat16>(uint8_t* p, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
}

// store_tile with whole-row stores (out rows 16-byte aligned): each warp moves its fragment through
// its shared-memory staging rows, 4 output rows x up to 512 bytes at a time, and writes them with
// 16-byte stores that cover whole 32-byte sectors (the fragment layout would write 16 bytes per row).
template <int BN, typename OutT, typename Value>
__device__ __forceinline__ void store_tile_rows(const Value& value, const float* col_scale,
                                                const float* col_bias, const Params& p, const Fragment& f,
                                                int m0, int n0, uint8_t* staging, int pitch) {
  constexpr int COLS = BN * static_cast<int>(sizeof(OutT)) <= 512 ? BN : 512 / static_cast<int>(sizeof(OutT));
  constexpr int CHUNK = 16 / static_cast<int>(sizeof(OutT));    // elements per 16-byte store
  constexpr int CHUNKS = COLS / CHUNK;                           // per staged row
  OutT* out = static_cast<OutT*>(p.out);
  const int lane = threadIdx.x % 32, g = lane / 4;
  const int slab = m0 + f.row - g;   // first of this warp's 16 rows
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int pass = 0; pass < BN / COLS; ++pass) {
        if (g / 4 == half) {   // lanes holding rows slab + 8 h + 4 half + (g % 4)
          uint8_t* row = staging + (g % 4) * pitch;
#pragma unroll
          for (int ii = 0; ii < COLS / 8; ++ii) {
            const int i = pass * (COLS / 8) + ii;
            const int c = 8 * i + f.col;
            const float2 s = *reinterpret_cast<const float2*>(col_scale + c);
            const float2 b = *reinterpret_cast<const float2*>(col_bias + c);
            put_pair<OutT>(row + (8 * ii + f.col) * sizeof(OutT), value(4 * i + 2 * h, h, s.x) + b.x,
                           value(4 * i + 2 * h + 1, h, s.y) + b.y);
          }
        }
        __syncwarp();
#pragma unroll
        for (int q = lane; q < 4 * CHUNKS; q += 32) {
          const int r = slab + 8 * h + 4 * half + q / CHUNKS;
          const int c = n0 + pass * COLS + (q % CHUNKS) * CHUNK;
          const uint8_t* src = staging + (q / CHUNKS) * pitch + (q % CHUNKS) * 16;
          if (r < p.M && c < p.N) {
            OutT* dst = out + static_cast<int64_t>(r) * p.ldc + c;
            if (c + CHUNK <= p.N) {
              *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(src);
            } else {
              for (int e = 0; e < p.N - c; ++e) dst[e] = reinterpret_cast<const OutT*>(src)[e];
            }
          }
        }
        __syncwarp();
      }
    }
  }
}

// GELU'(v) of the tanh approximation, as megaq's Triton data-flow kernels compute it (_gelu_grad in
// megaq/kernels/triton_dataflow.py): GELU(v) = v·σ(2z), 2z = 2·sqrt(2/π)·(v + 0.044715 v³); with
// e = 2^-|w| (w = 2z·log2 e, never overflows) σ(2z) is 1/(1+e) or e/(1+e) by the sign of w, and
// σ(2z)σ(-2z) = e/(1+e)². A NaN input gives NaN.
__device__ __forceinline__ float gelu_tanh_grad(float v) {
  const float w = v * (2.302208198144325f + 0.1029432395800235f * v * v);
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-fabsf(w)));
  const float r = __fdividef(1.f, 1.f + e);
  const float sig = w >= 0.f ? r : e * r;
  return sig + v * (e * r * r) * (1.5957691216057308f + 0.21406444881780073f * v * v);
}

// The TMA_OUT tile's shared-memory halves (store_tile_tma, store_tile_int8_tma): consumer warpgroup w
// owns rows [64 w, 64 w + 64) as column chunks of [64 rows x 128 bytes], 128-byte swizzled.
constexpr int OUT_CHUNK_BYTES = 64 * 128;

// Byte `byte` (< 128) of row r in a column chunk: 16-byte piece j sits at j ^ (r % 8), so that the 8
// rows a fragment store spans hit different banks (the tensor map's CU_TENSOR_MAP_SWIZZLE_128B).
__device__ __forceinline__ uint8_t* swizzled(uint8_t* chunk, int r, int byte) {
  return chunk + r * 128 + ((((byte >> 4) ^ (r & 7))) << 4) + (byte & 15);
}

// Before warpgroup w rewrites its half: the TMA stores of its previous tile have read it.
__device__ __forceinline__ void await_out_half(int w) {
  if (threadIdx.x % 128 == 0) bulk_wait_read();
  warpgroup_sync(w);
}

// After it: make the half visible to the async proxy, then one thread issues its CHUNKS TMA stores
// (CHUNK_COLS elements wide each), which drain under the next tile's main loop.
template <int CHUNK_COLS, int CHUNKS>
__device__ __forceinline__ void store_out_half(const CUtensorMap* map, uint8_t* mine, int m0, int n0, int w) {
  fence_async_shared();
  warpgroup_sync(w);
  if (threadIdx.x % 128 == 0) {
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k)
      tma_store_2d(map, mine + k * OUT_CHUNK_BYTES, n0 + k * CHUNK_COLS, m0 + 64 * w);
    bulk_commit();
  }
}

// GELU_BWD: the warpgroup's 64 x BN BF16 rows in shared memory (store_tile_tma's swizzled layout)
// multiplied by GELU'(h) in place, h = gelu_q * gelu_scale at the same place. Over 16-byte chunks (8
// values), consecutive threads on consecutive chunks of a row, so that each warp reads 256 contiguous
// bytes of gelu_q; unrolled, so that all of a thread's loads are in flight at once (the accumulators
// are dead by now: registers are free). Written out in the fragment loop instead, the per-value loads
// and GELU' math made the epilogue 20x the code of this one (29k instructions) and the GEMM took
// 2.1 ms more at 16384 x 16384 x 4096 (H100). Rows past M are skipped (TMA clips them); the launcher
// guarantees N % 8 == 0 and 16-byte aligned rows (TMA stores), so chunks are whole and the 8-byte
// loads aligned. The product is rounded to BF16 before the multiplication, as in the two-step path
// (the GEMM's BF16 output, then the GELU backward).
template <int BN>
__device__ __forceinline__ void gelu_backward_rows(const Params& p, uint8_t* rows, int row0, int n0, int t) {
  constexpr int CHUNKS = BN / 8;                  // 16-byte chunks per tile row
  constexpr int ROWS_PER_PASS = 128 / CHUNKS;     // rows the warpgroup covers per pass
  constexpr int PASSES = 64 / ROWS_PER_PASS;
  const int c = (t % CHUNKS) * 8;                 // this thread's tile column: the same in every pass
  const int gc = n0 + c;
  const int r0 = t / CHUNKS;
  // every pass's loads first, all in flight together (the compiler does not move them above the
  // previous pass's shared-memory store itself)
  uint2 q[PASSES];
  float sc[PASSES];
#pragma unroll
  for (int i = 0; i < PASSES; ++i) {
    const int gr = row0 + r0 + i * ROWS_PER_PASS;
    const bool ok = gr < p.M && gc < p.N;
    q[i] = ok ? __ldg(reinterpret_cast<const uint2*>(p.gelu_q + static_cast<int64_t>(gr) * p.ldc + gc))
              : make_uint2(0u, 0u);
    sc[i] = ok ? __ldg(p.gelu_scale + static_cast<int64_t>(gr) * p.ld_gelu_scale + gc / 128) : 0.f;
  }
#pragma unroll
  for (int i = 0; i < PASSES; ++i) {
    const int r = r0 + i * ROWS_PER_PASS;
    if (row0 + r >= p.M || gc >= p.N) continue;
    uint4* chunk = reinterpret_cast<uint4*>(swizzled(rows + (c / 64) * OUT_CHUNK_BYTES, r, (c % 64) * 2));
    uint4 v = *chunk;
    uint32_t* words = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t qw = e < 2 ? q[i].x : q[i].y;
      const int shift = 16 * (e % 2);
      const float h0 = static_cast<float>(static_cast<int8_t>((qw >> shift) & 0xff)) * sc[i];
      const float h1 = static_cast<float>(static_cast<int8_t>((qw >> (shift + 8)) & 0xff)) * sc[i];
      const float2 g = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[e]));
      const __nv_bfloat162 out = __floats2bfloat162_rn(g.x * gelu_tanh_grad(h0), g.y * gelu_tanh_grad(h1));
      words[e] = *reinterpret_cast<const uint32_t*>(&out);
    }
    *chunk = v;
  }
}

// The TMA_OUT epilogue of consumer warpgroup w: its 64 x BN rows of the tile, converted to BF16
// into its half of the output tile in shared memory (the 128-byte swizzle of the map: 16-byte chunk j
// of row r sits at chunk j ^ (r % 8), so that the 8 rows a warp's fragment spans hit different
// banks), then written by one thread's TMA stores, which complete while the warpgroup goes on to its
// next tile's main loop. The buffer is rewritten only once the previous stores have read it.
template <int BN, bool GELU_BWD, typename Value>
__device__ __forceinline__ void store_tile_tma(const Value& value, const float* col_scale, const float* col_bias,
                                               const CUtensorMap* map, const Params& p, const Fragment& f, int w,
                                               uint8_t* tile, int m0, int n0) {
  constexpr int CHUNK_COLS = 64;   // 128 bytes of BF16: one swizzle row
  uint8_t* mine = tile + w * (BN / CHUNK_COLS) * OUT_CHUNK_BYTES;
  await_out_half(w);
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int c = 8 * i + f.col;
    const float2 s = *reinterpret_cast<const float2*>(col_scale + c);
    const float2 b = *reinterpret_cast<const float2*>(col_bias + c);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = f.row - 64 * w + 8 * h;
      uint8_t* dst = swizzled(mine + (c / CHUNK_COLS) * OUT_CHUNK_BYTES, r, (c % CHUNK_COLS) * 2);
      *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(value(4 * i + 2 * h, h, s.x) + b.x,
                                                                       value(4 * i + 2 * h + 1, h, s.y) + b.y);
    }
  }
  if constexpr (GELU_BWD) {
    warpgroup_sync(w);   // the whole 64-row half is in shared memory
    gelu_backward_rows<BN>(p, mine, m0 + 64 * w, n0, threadIdx.x % 128);
  }
  store_out_half<CHUNK_COLS, BN / CHUNK_COLS>(map, mine, m0, n0, w);
}

// INT8 out (the data flow's epilogue, int8_gemm.h): max that keeps a NaN (fmaxf would drop it, and
// the block's scale would come out finite)
__device__ __forceinline__ float max_keep_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// v times the reciprocal scale, clamped to [-127, 127] and rounded to nearest even by adding 1.5 * 2^23
// (the integer lands in the low mantissa bits: the int8 is the float's low byte). Full-rate ALU work
// only: an IEEE division per value (FCHK, a slow-path call, a convergence barrier) and the F2I / FRND
// conversions (quarter rate) made this epilogue cost ~1 ms more than the whole BF16 one at 16384 x
// 16384 x 4096 on an H100. A product with the reciprocal differs from the reference's division only
// within 1.5 ulp of a rounding tie (the data-flow quantizers' rule, megaq/kernels/triton_dataflow.py).
__device__ __forceinline__ signed char quantize_q8(float v, float inv_s) {
  const float x = fminf(fmaxf(v * inv_s, -127.f), 127.f);   // a NaN (NaN scale) comes out as -127
  return static_cast<signed char>(__float_as_int(__fadd_rn(x, 12582912.f)) & 0xff);
}

__device__ __forceinline__ float as_float(int bits) { return __int_as_float(bits); }
__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ void set_float(int& bits, float v) { bits = __float_as_int(v); }
__device__ __forceinline__ void set_float(float& x, float v) { x = v; }

// Turns the fragment into the tile's final FP32 values in place: acc[j] = value(j) + bias (ROWCOL's
// INT32 accumulators hold the float's bits afterwards), so that the INT8 epilogue's two passes over
// them (abs-max, then quantize) need no second set of registers.
template <int BN, typename T, typename Value>
__device__ __forceinline__ void finish_values(T (&acc)[BN / 2], const Value& value, const float* col_scale,
                                              const float* col_bias, const Fragment& f) {
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int c = 8 * i + f.col;
    const float2 sc = *reinterpret_cast<const float2*>(col_scale + c);
    const float2 b = *reinterpret_cast<const float2*>(col_bias + c);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // the FP32 / BF16 epilogues' expression, so that the values are theirs bit for bit
      const float v0 = value(4 * i + 2 * h, h, sc.x) + b.x;
      const float v1 = value(4 * i + 2 * h + 1, h, sc.y) + b.y;
      set_float(acc[4 * i + 2 * h], v0);
      set_float(acc[4 * i + 2 * h + 1], v1);
    }
  }
}

// INT8 out: the scale of each (1, 128) block of the tile at (m0, n0), from its final FP32 values v
// (finish_values; columns past N hold zeros: their scale and bias read 0), written to p.out_scale;
// s[h][q] comes back as the reciprocal of block q's scale on the fragment's row half h. Each
// 128-column block of a fragment row lives in one lane quad (32 values per lane): the abs-max is
// reduced in the lane, then over the quad by two shuffles; lane 0 of the quad writes the scale.
template <int BN, typename T>
__device__ __forceinline__ void int8_block_scales(const T (&v)[BN / 2], const Params& p, const Fragment& f,
                                                  int m0, int n0, float (&s)[2][BN / 128]) {
  constexpr int NQ = BN / 128;   // scale blocks per tile row
  constexpr int IPQ = 128 / 8;   // fragment column groups (i) per block
  static_assert(BN % 128 == 0 && BN <= 512, "INT8 out: whole 128-column blocks, staged rows <= 512 bytes");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int q = 0; q < NQ; ++q) s[h][q] = 0.f;
#pragma unroll
  for (int i = 0; i < BN / 8; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s[h][i / IPQ] = max_keep_nan(s[h][i / IPQ], fabsf(as_float(v[4 * i + 2 * h])));
      s[h][i / IPQ] = max_keep_nan(s[h][i / IPQ], fabsf(as_float(v[4 * i + 2 * h + 1])));
    }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      float a = s[h][q];
      a = max_keep_nan(a, __shfl_xor_sync(0xffffffffu, a, 1));
      a = max_keep_nan(a, __shfl_xor_sync(0xffffffffu, a, 2));
      const float scale = (a > 0.f || a != a) ? __fdiv_rn(a, 127.f) : 1.f;
      const int r = m0 + f.row + 8 * h;
      if (lane % 4 == 0 && r < p.M && n0 + 128 * q < p.N)
        p.out_scale[static_cast<int64_t>(r) * p.ld_out_scale + n0 / 128 + q] = scale;
      s[h][q] = __fdiv_rn(1.f, scale);   // from here on: the reciprocal
    }
  }
}

// fragment values (i, h) of v as the char2 of INT8 out, s the reciprocal scales (int8_block_scales)
template <int BN, typename T>
__device__ __forceinline__ char2 int8_pair(const T (&v)[BN / 2], const float (&s)[2][BN / 128], int i, int h) {
  constexpr int IPQ = 128 / 8;   // fragment column groups (i) per block
  return make_char2(quantize_q8(as_float(v[4 * i + 2 * h]), s[h][i / IPQ]),
                    quantize_q8(as_float(v[4 * i + 2 * h + 1]), s[h][i / IPQ]));
}

// The tile at (m0, n0) as INT8 with a scale per (1, 128) block of each row (int8_block_scales).
// Stores go through the warp's staging rows as 16-byte stores (as store_tile_rows) when out rows are
// 16-byte aligned, else straight from the fragment.
template <int BN, typename T>
__device__ __forceinline__ void store_tile_int8(const T (&v)[BN / 2], const Params& p, const Fragment& f,
                                                int m0, int n0, uint8_t* staging, int pitch) {
  const int lane = threadIdx.x % 32;
  float s[2][BN / 128];
  int8_block_scales<BN>(v, p, f, m0, n0, s);
  auto pair = [&](int i, int h) { return int8_pair<BN>(v, s, i, h); };
  int8_t* out = static_cast<int8_t*>(p.out);
  if (p.row_store) {
    constexpr int CHUNKS = BN / 16;   // 16-byte stores per row
    const int g = lane / 4;
    const int slab = m0 + f.row - g;   // first of this warp's 16 rows
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (g / 4 == half) {   // lanes holding rows slab + 8 h + 4 half + (g % 4)
          uint8_t* row = staging + (g % 4) * pitch;
#pragma unroll
          for (int i = 0; i < BN / 8; ++i) *reinterpret_cast<char2*>(row + 8 * i + f.col) = pair(i, h);
        }
        __syncwarp();
#pragma unroll
        for (int q = lane; q < 4 * CHUNKS; q += 32) {
          const int r = slab + 8 * h + 4 * half + q / CHUNKS;
          const int c = n0 + (q % CHUNKS) * 16;
          const uint8_t* src = staging + (q / CHUNKS) * pitch + (q % CHUNKS) * 16;
          if (r < p.M && c < p.N) {
            int8_t* dst = out + static_cast<int64_t>(r) * p.ldc + c;
            if (c + 16 <= p.N) {
              *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(src);
            } else {
              for (int e = 0; e < p.N - c; ++e) dst[e] = static_cast<int8_t>(src[e]);
            }
          }
        }
        __syncwarp();
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      const int c = n0 + 8 * i + f.col;
      if (c >= p.N) continue;
      const bool both = c + 1 < p.N;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + f.row + 8 * h;
        if (r >= p.M) continue;
        const char2 q = pair(i, h);
        int8_t* dst = out + static_cast<int64_t>(r) * p.ldc + c;
        if (both && p.pair_store) {
          *reinterpret_cast<char2*>(dst) = q;
        } else {
          dst[0] = q.x;
          if (both) dst[1] = q.y;
        }
      }
    }
  }
}

// store_tile_int8 through TMA stores (TMA_OUT kernels, 16-byte aligned out rows): consumer warpgroup w
// writes its 64 x BN bytes into its half of the output tile in shared memory as BN / 128 chunks of
// [64 x 128] (128-byte swizzle: 16-byte chunk j of row r at j ^ (r % 8), so the 8 rows of a fragment
// store hit different banks), and one thread hands them to TMA stores, which drain under the next
// tile's main loop (as store_tile_tma; the staged 16-byte stores held the warpgroup until HBM took
// them: 1,230 TOPS against the BF16-out kernel's ~1,440 at 16384 x 16384 x 4096 on an H100).
template <int BN, typename T>
__device__ __forceinline__ void store_tile_int8_tma(const T (&v)[BN / 2], const CUtensorMap* map, const Params& p,
                                                    const Fragment& f, int w, uint8_t* tile, int m0, int n0) {
  constexpr int CHUNK_COLS = 128;              // 128 bytes of INT8: one swizzle row
  float s[2][BN / 128];
  int8_block_scales<BN>(v, p, f, m0, n0, s);   // before the wait: it overlaps the previous stores
  uint8_t* mine = tile + w * (BN / CHUNK_COLS) * OUT_CHUNK_BYTES;
  await_out_half(w);
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int c = 8 * i + f.col;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = f.row - 64 * w + 8 * h;
      uint8_t* dst = swizzled(mine + (c / CHUNK_COLS) * OUT_CHUNK_BYTES, r, c % CHUNK_COLS);
      *reinterpret_cast<char2*>(dst) = int8_pair<BN>(v, s, i, h);
    }
  }
  store_out_half<CHUNK_COLS, BN / CHUNK_COLS>(map, mine, m0, n0, w);
}

// BLOCK128 promotion of one K-block: v += float(acc) * sa[m, kb] * sb[n, kb], scales from the stage.
template <int BN, bool SB_VEC>
__device__ __forceinline__ void promote(const int (&acc)[BN / 2], float (&v)[BN / 2], const float* sa_s,
                                        const float* sb_s, const Fragment& f) {
  const float sa0 = sa_s[f.row], sa1 = sa_s[f.row + 8];
  if constexpr (!SB_VEC) {
    const float sb = sb_s[0];   // one B scale for all BN columns (128 x 128 blocks, BN = 128)
    const float s0 = sa0 * sb, s1 = sa1 * sb;
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      v[4 * i + 0] = fmaf(__int2float_rn(acc[4 * i + 0]), s0, v[4 * i + 0]);
      v[4 * i + 1] = fmaf(__int2float_rn(acc[4 * i + 1]), s0, v[4 * i + 1]);
      v[4 * i + 2] = fmaf(__int2float_rn(acc[4 * i + 2]), s1, v[4 * i + 2]);
      v[4 * i + 3] = fmaf(__int2float_rn(acc[4 * i + 3]), s1, v[4 * i + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      const float2 sb = *reinterpret_cast<const float2*>(sb_s + 8 * i + f.col);
      v[4 * i + 0] = fmaf(__int2float_rn(acc[4 * i + 0]), sa0 * sb.x, v[4 * i + 0]);
      v[4 * i + 1] = fmaf(__int2float_rn(acc[4 * i + 1]), sa0 * sb.y, v[4 * i + 1]);
      v[4 * i + 2] = fmaf(__int2float_rn(acc[4 * i + 2]), sa1 * sb.x, v[4 * i + 2]);
      v[4 * i + 3] = fmaf(__int2float_rn(acc[4 * i + 3]), sa1 * sb.y, v[4 * i + 3]);
    }
  }
}

struct Pipe {   // position in the ring of stages: stage index and the parity of its current use
  int stage = 0;
  uint32_t phase = 0;
  template <int STAGES>
  __device__ __forceinline__ void advance() {
    if (++stage == STAGES) {
      stage = 0;
      phase ^= 1;
    }
  }
};

#endif  // MEGAQ_INT8_GEMM_SM90A

// MODE: MEGAQ_INT8_ROWCOL / MEGAQ_INT8_BLOCK128. DUAL: two INT32 accumulator sets (BLOCK128).
// SB_VEC: a B scale per output column (sb_rows = 1) rather than one per 128-column tile (BLOCK128).
// TMA_OUT (BF16 out): tiles leave through TMA stores from shared memory when p.tma_store
// (store_tile_tma), else as in the other kernels. GELU_BWD: each output value is multiplied by GELU' of
// the GELU input at its place (p.gelu_q, p.gelu_scale; int8_gemm.h) before it is stored.
template <int BN, int STAGES, int MODE, bool DUAL, bool SB_VEC, bool TMA_OUT, typename OutT,
          bool GELU_BWD = false>
__global__ void __launch_bounds__(THREADS, 1)
    int8_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a,
                     const __grid_constant__ CUtensorMap tmap_b,
                     const __grid_constant__ CUtensorMap tmap_c, const Params p) {
#ifdef MEGAQ_INT8_GEMM_SM90A
  constexpr bool BLOCKED = MODE == MEGAQ_INT8_BLOCK128;
  static_assert(!TMA_OUT || std::is_same_v<OutT, __nv_bfloat16> || std::is_same_v<OutT, int8_t>,
                "TMA_OUT: BF16 or INT8 out");
  using L = Layout<BN, STAGES, BLOCKED, TMA_OUT, sizeof(OutT)>;
  static_assert(!DUAL || BLOCKED, "two accumulator sets only pay off with per-block promotion");
  static_assert(!SB_VEC || BLOCKED, "ROWCOL reads its column scales in the epilogue");
  static_assert(!BLOCKED || BN == 128, "BLOCK128 keeps an FP32 sum plus INT32 sets: 128 columns fit");

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // 1024-aligned for the 128-byte swizzle atoms (offset arithmetic keeps the compiler aware that
  // these are shared-memory pointers: ld.shared, not generic loads)
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint8_t* smem_a = smem + L::A_OFFSET;
  uint8_t* smem_b = smem + L::B_OFFSET;
  float* smem_scales = reinterpret_cast<float*>(smem + L::SCALE_OFFSET);
  float* smem_epilogue = reinterpret_cast<float*>(smem + L::EPILOGUE_OFFSET);
  uint8_t* smem_staging = smem + L::STAGING_OFFSET;
  uint8_t* smem_out = smem + L::OUT_OFFSET;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::BARRIER_OFFSET);
  uint64_t* empty = full + STAGES;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == PRODUCER_WARP * 32) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_a)) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_b)) : "memory");
    if (TMA_OUT && p.tma_store)
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tmap_c)) : "memory");
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], BLOCKED ? 1 + 32 : 1);
      mbar_init(&empty[s], CONSUMER_ARRIVALS);
    }
    // make the initialized barriers visible to the TMA engine (async proxy)
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();

  const int num_m = (p.M + BM - 1) / BM;
  const int num_n = (p.N + BN - 1) / BN;
  const int num_tiles = num_m * num_n;
  const int num_kb = (p.K + BK - 1) / BK;

  if (warp >= PRODUCER_WARP) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGISTERS));
    if (threadIdx.x == PRODUCER_WARP * 32) {
      Pipe pipe;
      for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
        int mb, nb;
        tile_coords(t, num_m, num_n, p.group_m, mb, nb);
        for (int kb = 0; kb < num_kb; ++kb) {
          mbar_wait(&empty[pipe.stage], pipe.phase ^ 1);
          mbar_arrive_expect_tx(&full[pipe.stage], L::A_BYTES + L::B_BYTES);
          tma_load_2d(smem_a + pipe.stage * L::A_BYTES, &tmap_a, &full[pipe.stage], kb * BK, mb * BM);
          tma_load_2d(smem_b + pipe.stage * L::B_BYTES, &tmap_b, &full[pipe.stage], kb * BK, nb * BN);
          pipe.template advance<STAGES>();
        }
      }
    } else if (BLOCKED && warp == SCALE_WARP) {
      Pipe pipe;
      for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
        int mb, nb;
        tile_coords(t, num_m, num_n, p.group_m, mb, nb);
        // this lane's rows of A and columns of B: source of K-block 0 (advanced by the K-block
        // stride), and whether it exists (else the copy writes a zero)
        const float* src_a[BM / 32];
        const float* src_b[BN / 32];
        uint32_t valid = 0;
#pragma unroll
        for (int j = 0; j < BM / 32; ++j) {
          const int m = mb * BM + 32 * j + lane;
          src_a[j] = p.scale_a + (m < p.M ? m * p.sa_stride_m : 0);
          valid |= (m < p.M ? 1u : 0u) << j;
        }
#pragma unroll
        for (int j = 0; j < BN / 32; ++j) {
          const int n = nb * BN + 32 * j + lane;
          src_b[j] = p.scale_b + (n < p.N ? (n / static_cast<int>(p.sb_rows)) * p.sb_stride_n : 0);
          valid |= (n < p.N ? 1u : 0u) << (BM / 32 + j);
        }
        for (int kb = 0; kb < num_kb; ++kb) {
          float* sa_s = smem_scales + pipe.stage * L::SCALES;
          float* sb_s = sa_s + BM;
          mbar_wait(&empty[pipe.stage], pipe.phase ^ 1);
#pragma unroll
          for (int j = 0; j < BM / 32; ++j) {
            const bool ok = (valid >> j) & 1;
            cp_async_4(sa_s + 32 * j + lane, src_a[j], ok);
            if (ok) src_a[j] += p.sa_stride_kb;
          }
#pragma unroll
          for (int j = 0; j < BN / 32; ++j) {
            const bool ok = (valid >> (BM / 32 + j)) & 1;
            cp_async_4(sb_s + 32 * j + lane, src_b[j], ok);
            if (ok) src_b[j] += p.sb_stride_kb;
          }
          cp_async_arrive_on(&full[pipe.stage]);
          pipe.template advance<STAGES>();
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGISTERS));
  const int warpgroup = threadIdx.x / 128;
  const Fragment frag(warpgroup, threadIdx.x % 128);
  // descriptors of stage 0; a stage adds its byte offset >> 4
  const uint64_t desc_a0 = smem_desc(smem_a + warpgroup * 64 * BK);
  const uint64_t desc_b0 = smem_desc(smem_b);
  auto desc_a = [&](int stage) { return desc_a0 + static_cast<uint64_t>(stage * (L::A_BYTES >> 4)); };
  auto desc_b = [&](int stage) { return desc_b0 + static_cast<uint64_t>(stage * (L::B_BYTES >> 4)); };
  auto release = [&](int stage) {
    if (lane == 0) mbar_arrive(&empty[stage]);
  };

  uint8_t* staging = smem_staging + warp * 4 * L::STAGING_PITCH;
  // The tile's epilogue, from its fragment `vals` (ROWCOL's INT32 accumulators or BLOCK128's FP32 sums)
  // and `value` (fragment element -> FP32 before the bias): INT8 out requantizes it (store_tile_int8,
  // which reuses `vals` for the final values); BF16 out with TMA leaves through TMA stores; else the
  // staged rows or the direct fragment stores. Only the branch of this kernel's OutT is instantiated.
  auto store = [&](auto& vals, const auto& value, const float* col_scales, const float* col_biases, int m0,
                   int n0) {
    if constexpr (std::is_same_v<OutT, int8_t>) {
      finish_values<BN>(vals, value, col_scales, col_biases, frag);
      if constexpr (TMA_OUT) {
        if (p.tma_store) {
          store_tile_int8_tma<BN>(vals, &tmap_c, p, frag, warpgroup, smem_out, m0, n0);
          return;
        }
      }
      store_tile_int8<BN>(vals, p, frag, m0, n0, staging, L::STAGING_PITCH);
    } else {
      if constexpr (TMA_OUT) {
        if (p.tma_store) {
          store_tile_tma<BN, GELU_BWD>(value, col_scales, col_biases, &tmap_c, p, frag, warpgroup, smem_out, m0,
                                       n0);
          return;
        }
      }
      if constexpr (!GELU_BWD) {   // GELU_BWD kernels always store with TMA (the launcher sees to it)
        if (p.row_store)
          store_tile_rows<BN, OutT>(value, col_scales, col_biases, p, frag, m0, n0, staging, L::STAGING_PITCH);
        else
          store_tile<BN, OutT>(value, col_scales, col_biases, p, frag, m0, n0);
      }
    }
  };

  Pipe pipe;
  int parity = 0;   // which epilogue buffer this tile uses
  for (int t = blockIdx.x; t < num_tiles; t += gridDim.x, parity ^= 1) {
    int mb, nb;
    tile_coords(t, num_m, num_n, p.group_m, mb, nb);
    const int m0 = mb * BM, n0 = nb * BN;
    // The epilogue's per-column values, loaded now (latency hidden by the K loop) one column per
    // consumer thread, parked in shared memory after the loop. ROWCOL also needs its 2 row scales.
    float col_scale = 0.f, col_bias = 0.f;
    if (threadIdx.x < BN && n0 + static_cast<int>(threadIdx.x) < p.N) {
      const int n = n0 + threadIdx.x;
      if (!BLOCKED) col_scale = p.scale_b[n * p.sb_stride_n];
      if (!GELU_BWD && p.bias != nullptr) col_bias = p.bias[n];
    }
    float sa[2] = {0.f, 0.f};
    if (!BLOCKED) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + frag.row + 8 * h;
        if (r < p.M) sa[h] = p.scale_a[r * p.sa_stride_m];
      }
    }
    float* col_scales = smem_epilogue + parity * 2 * BN;
    float* col_biases = col_scales + BN;
    auto park_columns = [&]() {
      if (threadIdx.x < BN) {
        col_scales[threadIdx.x] = col_scale;
        col_biases[threadIdx.x] = col_bias;
      }
      // also orders this buffer's reads two tiles ago before the writes above: every thread has
      // passed the previous tile's barrier, hence finished the epilogue before it
      consumer_sync();
    };
    if constexpr (!BLOCKED) {
      int acc[BN / 2];
      int prev = 0;
      for (int kb = 0; kb < num_kb; ++kb) {
        mbar_wait(&full[pipe.stage], pipe.phase);
        issue_block<BN>(acc, desc_a(pipe.stage), desc_b(pipe.stage), kb > 0);
        wgmma_wait<1>();   // the previous K-block's wgmmas are done: its stage can be refilled
        if (kb > 0) release(prev);
        prev = pipe.stage;
        pipe.template advance<STAGES>();
      }
      wgmma_wait<0>();
      release(prev);
      park_columns();
      auto value = [&](int j, int h, float sb) { return __int2float_rn(acc[j]) * (sa[h] * sb); };
      store(acc, value, col_scales, col_biases, m0, n0);
    } else {
      float v[BN / 2];
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) v[i] = 0.f;
      auto promote_stage = [&](const int (&acc)[BN / 2], int stage) {
        const float* sa_s = smem_scales + stage * L::SCALES;
        promote<BN, SB_VEC>(acc, v, sa_s, sa_s + BM, frag);
        release(stage);
      };
      if constexpr (DUAL) {
        // K-blocks alternate between the two sets: block kb + 1's wgmmas are issued before block kb
        // is promoted. Straight-line code per pair of blocks, so that ptxas can see which group each
        // wgmma.wait_group retires (it serializes the wgmmas when it cannot).
        int acc0[BN / 2], acc1[BN / 2];
        auto issue_next = [&](int (&acc)[BN / 2]) {
          const int stage = pipe.stage;
          mbar_wait(&full[stage], pipe.phase);
          issue_block<BN>(acc, desc_a(stage), desc_b(stage), false);
          pipe.template advance<STAGES>();
          return stage;
        };
        int cur = issue_next(acc0);
        int kb = 0;
        for (; kb + 2 < num_kb; kb += 2) {
          const int s1 = issue_next(acc1);
          wgmma_wait<1>();
          promote_stage(acc0, cur);
          const int s2 = issue_next(acc0);
          wgmma_wait<1>();
          promote_stage(acc1, s1);
          cur = s2;
        }
        if (kb + 1 < num_kb) {
          const int s1 = issue_next(acc1);
          wgmma_wait<1>();
          promote_stage(acc0, cur);
          wgmma_wait<0>();
          promote_stage(acc1, s1);
        } else {
          wgmma_wait<0>();
          promote_stage(acc0, cur);
        }
      } else {
        int acc[BN / 2];
        for (int kb = 0; kb < num_kb; ++kb) {
          mbar_wait(&full[pipe.stage], pipe.phase);
          issue_block<BN>(acc, desc_a(pipe.stage), desc_b(pipe.stage), false);
          wgmma_wait<0>();
          promote_stage(acc, pipe.stage);
          pipe.template advance<STAGES>();
        }
      }
      park_columns();
      auto value = [&](int j, int, float) { return v[j]; };
      store(v, value, col_scales, col_biases, m0, n0);
    }
  }
  if (TMA_OUT && p.tma_store && threadIdx.x % 128 == 0) bulk_wait_all();   // before the buffer goes away
#endif  // MEGAQ_INT8_GEMM_SM90A (other targets get an empty kernel; check_device refuses them)
}

// ------------------------------------------------------------------------------------------- host

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// cuTensorMapEncodeTiled from the driver, found through the runtime (no -lcuda at link time).
EncodeTiled encode_tiled() {
  static std::atomic<EncodeTiled> cached{nullptr};
  EncodeTiled fn = cached.load();
  if (fn != nullptr) return fn;
  void* sym = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &sym, 12000, cudaEnableDefault, &found);
#else
  const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &sym, cudaEnableDefault, &found);
#endif
  if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) return nullptr;
  fn = reinterpret_cast<EncodeTiled>(sym);
  cached.store(fn);
  return fn;
}

// A 2-D map of an int8 [rows, K] matrix with row stride ld bytes, boxes of box_rows x 128 bytes,
// 128-byte swizzle; out-of-bounds parts of a box read as zeros.
bool make_map(CUtensorMap* map, EncodeTiled encode, const int8_t* base, int64_t rows, int64_t K,
              int64_t ld, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld)};
  const cuuint32_t box[2] = {BK, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(base), dims, strides, box,
                elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// A 2-D map of the output [rows, cols] (BF16 or INT8: elem bytes) with row stride ldc elements, boxes of
// 64 rows x 128 bytes (one swizzle row), 128-byte swizzle: what store_tile_tma / store_tile_int8_tma write.
bool make_out_map(CUtensorMap* map, EncodeTiled encode, void* base, int64_t rows, int64_t cols, int64_t ldc,
                  int elem) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ldc * elem)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(128 / elem), 64};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, elem == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, base, dims,
                strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int BN, int STAGES, int MODE, bool DUAL, bool SB_VEC, bool TMA_OUT, typename OutT,
          bool GELU_BWD = false>
cudaError_t launch(const int8_t* A, const int8_t* B, int64_t lda, int64_t ldb, Params p,
                   int device, cudaStream_t stream) {
  using L = Layout<BN, STAGES, MODE == MEGAQ_INT8_BLOCK128, TMA_OUT, sizeof(OutT)>;
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  CUtensorMap map_a, map_b, map_c;
  if (!make_map(&map_a, encode, A, p.M, p.K, lda, BM) || !make_map(&map_b, encode, B, p.N, p.K, ldb, BN))
    return cudaErrorInvalidValue;
  // TMA stores need 16-byte aligned rows (the staged epilogue's condition) and rows of whole 16-byte
  // pieces: past a row end inside a 16-byte piece they write the whole piece (measured on an H100: N =
  // 301 INT8 / 1601 BF16 wrote up to the next 16 bytes of a strided out). Else the kernel stores from
  // registers as the other kernels do.
  p.tma_store = TMA_OUT && p.row_store && (static_cast<int64_t>(p.N) * sizeof(OutT)) % 16 == 0 &&
                make_out_map(&map_c, encode, p.out, p.M, p.N, p.ldc, sizeof(OutT));
  if (GELU_BWD && !p.tma_store) return cudaErrorInvalidValue;   // its epilogue works on the TMA tile
  if (!p.tma_store) map_c = map_a;   // unused
  auto kernel = int8_gemm_kernel<BN, STAGES, MODE, DUAL, SB_VEC, TMA_OUT, OutT, GELU_BWD>;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  if (attr.numRegs < LAUNCH_REGISTERS) return cudaErrorNotSupported;   // see LAUNCH_REGISTERS
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::ALLOC);
  if (err != cudaSuccess) return err;
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t tiles = ((p.M + BM - 1) / BM) * static_cast<int64_t>((p.N + BN - 1) / BN);
  const int grid = static_cast<int>(tiles < sms ? tiles : sms);
  kernel<<<grid, THREADS, L::ALLOC, stream>>>(map_a, map_b, map_c, p);
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t dispatch(const int8_t* A, const int8_t* B, int64_t lda, int64_t ldb, int mode, int tile, bool gelu,
                     const Params& p, int device, cudaStream_t stream) {
  constexpr int ROW = MEGAQ_INT8_ROWCOL, BLK = MEGAQ_INT8_BLOCK128;
  constexpr bool BF16_OUT = std::is_same_v<OutT, __nv_bfloat16>;
  if (gelu) {   // the data flow's fc2 dgrad: one kernel (int8_gemm.h)
    if constexpr (BF16_OUT) {
      if (mode == ROW && tile == MEGAQ_INT8_TILE_AUTO)
        return launch<256, 3, ROW, false, false, true, OutT, true>(A, B, lda, ldb, p, device, stream);
    }
    return cudaErrorInvalidValue;
  }
  if (mode == ROW) {
    switch (tile) {
      case MEGAQ_INT8_TILE_AUTO:
        // BF16 and INT8 out: 3 stages, the output tile leaving through TMA stores under the next
        // tile's main loop (the 4-stage kernel's synchronous stores took 15-33% of its time at
        // K <= 4096, H100)
        if constexpr (BF16_OUT || std::is_same_v<OutT, int8_t>)
          return launch<256, 3, ROW, false, false, true, OutT>(A, B, lda, ldb, p, device, stream);
        else
          return launch<256, 4, ROW, false, false, false, OutT>(A, B, lda, ldb, p, device, stream);
      case MEGAQ_INT8_TILE_128x256:
        return launch<256, 4, ROW, false, false, false, OutT>(A, B, lda, ldb, p, device, stream);
      case MEGAQ_INT8_TILE_128x128:
        return launch<128, 6, ROW, false, false, false, OutT>(A, B, lda, ldb, p, device, stream);
      default:
        return cudaErrorInvalidValue;
    }
  }
  const bool sb_vec = p.sb_rows % 128 != 0;   // else one B scale per 128-column tile
  switch (tile) {
    case MEGAQ_INT8_TILE_AUTO:
      // BF16 out: 5 stages and the TMA-store epilogue, as for ROWCOL
      if constexpr (BF16_OUT)
        return sb_vec ? launch<128, 5, BLK, true, true, true, OutT>(A, B, lda, ldb, p, device, stream)
                      : launch<128, 5, BLK, true, false, true, OutT>(A, B, lda, ldb, p, device, stream);
      else
        return sb_vec ? launch<128, 6, BLK, true, true, false, OutT>(A, B, lda, ldb, p, device, stream)
                      : launch<128, 6, BLK, true, false, false, OutT>(A, B, lda, ldb, p, device, stream);
    case MEGAQ_INT8_TILE_128x128:
      return sb_vec ? launch<128, 6, BLK, true, true, false, OutT>(A, B, lda, ldb, p, device, stream)
                    : launch<128, 6, BLK, true, false, false, OutT>(A, B, lda, ldb, p, device, stream);
    case MEGAQ_INT8_TILE_128x128_SERIAL:
      return sb_vec ? launch<128, 6, BLK, false, true, false, OutT>(A, B, lda, ldb, p, device, stream)
                    : launch<128, 6, BLK, false, false, false, OutT>(A, B, lda, ldb, p, device, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace int8_gemm
}  // namespace megaq

extern "C" cudaError_t megaq_int8_gemm_check_device(void) {
  using namespace megaq::int8_gemm;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> verdict[kMaxDevices];   // 0 unknown, 1 runs, 2 does not
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && verdict[device].load() != 0)
    return verdict[device].load() == 1 ? cudaSuccess : cudaErrorNotSupported;
  int major = 0, minor = 0;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  int has_code = 0;
  if (major == 9 && minor == 0) {
    // fails (no image for this device) or reads 0 when the build lacks sm_90a code
    if (cudaMemcpyFromSymbol(&has_code, g_has_sm90a_code, sizeof(int)) != cudaSuccess) {
      cudaGetLastError();   // not sticky: clear it
      has_code = 0;
    }
  }
  if (device < kMaxDevices) verdict[device].store(has_code ? 1 : 2);
  return has_code ? cudaSuccess : cudaErrorNotSupported;
}

extern "C" cudaError_t megaq_int8_gemm(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K,
                                       int64_t lda, int64_t ldb, int mode, const float* scale_a,
                                       int64_t sa_stride_m, int64_t sa_stride_kb, const float* scale_b,
                                       int64_t sb_rows, int64_t sb_stride_n, int64_t sb_stride_kb,
                                       const float* bias, void* out, int out_kind, int64_t ldc,
                                       float* out_scale, int64_t ld_out_scale, const int8_t* gelu_q,
                                       int64_t ld_gelu_q, const float* gelu_scale, int64_t ld_gelu_scale,
                                       int tile, int group_m, cudaStream_t stream) {
  using namespace megaq::int8_gemm;
  constexpr int64_t kIntMax = 0x7fffffff;
  if (M < 1 || N < 1 || K < 16 || K % 16 != 0 || M > kIntMax || N > kIntMax || K > kIntMax)
    return cudaErrorInvalidValue;
  if (A == nullptr || B == nullptr || scale_a == nullptr || scale_b == nullptr || out == nullptr)
    return cudaErrorInvalidValue;
  if (lda < K || ldb < K || lda % 16 != 0 || ldb % 16 != 0 || reinterpret_cast<uintptr_t>(A) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(B) % 16 != 0)
    return cudaErrorInvalidValue;
  if (ldc < N || sa_stride_m < 0 || sa_stride_kb < 0 || sb_stride_n < 0 || sb_stride_kb < 0 || group_m < 0)
    return cudaErrorInvalidValue;
  if (mode == MEGAQ_INT8_ROWCOL) {
    if (sb_rows != 1 || K > ROWCOL_MAX_K) return cudaErrorInvalidValue;
  } else if (mode == MEGAQ_INT8_BLOCK128) {
    if (sb_rows < 1 || (sb_rows != 1 && sb_rows % 128 != 0)) return cudaErrorInvalidValue;
  } else {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = megaq_int8_gemm_check_device();
  if (err != cudaSuccess) return err;
  int device = 0;
  err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;

  Params p;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.scale_a = scale_a;
  p.sa_stride_m = sa_stride_m;
  p.sa_stride_kb = sa_stride_kb;
  p.scale_b = scale_b;
  p.sb_rows = sb_rows;
  p.sb_stride_n = sb_stride_n;
  p.sb_stride_kb = sb_stride_kb;
  p.bias = bias;
  p.out = out;
  p.ldc = ldc;
  p.group_m = group_m > 0 ? group_m : DEFAULT_GROUP_M;
  p.out_scale = out_scale;
  p.ld_out_scale = ld_out_scale;
  if (out_kind == MEGAQ_INT8_OUT_INT8 && (out_scale == nullptr || ld_out_scale < (N + 127) / 128))
    return cudaErrorInvalidValue;
  const bool gelu = gelu_q != nullptr;
  if (gelu) {
    // its inputs share fields with the bias and the INT8 output's scales (Params), and its row stride
    // is out's
    if (gelu_scale == nullptr || ld_gelu_q != ldc || ld_gelu_scale < (N + 127) / 128 || bias != nullptr ||
        out_kind != MEGAQ_INT8_OUT_BF16 || reinterpret_cast<uintptr_t>(gelu_q) % 16 != 0)
      return cudaErrorInvalidValue;
    p.gelu_q = gelu_q;
    p.gelu_scale = gelu_scale;
    p.ld_gelu_scale = ld_gelu_scale;
  }
  const int elem = out_kind == MEGAQ_INT8_OUT_F32 ? 4 : out_kind == MEGAQ_INT8_OUT_BF16 ? 2 : 1;
  p.pair_store = ldc % 2 == 0 && reinterpret_cast<uintptr_t>(out) % (2 * elem) == 0;
  p.row_store = (ldc * elem) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  p.tma_store = false;   // the TMA_OUT launchers decide
  switch (out_kind) {
    case MEGAQ_INT8_OUT_F32:
      return dispatch<float>(A, B, lda, ldb, mode, tile, gelu, p, device, stream);
    case MEGAQ_INT8_OUT_BF16:
      return dispatch<__nv_bfloat16>(A, B, lda, ldb, mode, tile, gelu, p, device, stream);
    case MEGAQ_INT8_OUT_INT8:
      return dispatch<int8_t>(A, B, lda, ldb, mode, tile, gelu, p, device, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
