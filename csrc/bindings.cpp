// pybind11 bindings of megaq._C: argument checks in PyTorch terms, then the plain-C launchers of the
// .cu files (raw pointers, sizes, the current CUDA stream). Kernels never see a torch type.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <optional>
#include <string>

#include "int4_gemm/int4_gemm.h"
#include "int8_gemm/int8_gemm.h"

namespace {

// Numbers and shapes in error messages are formatted with std::to_string, never streamed: a toolchain
// that links a private static libstdc++ into the extension (seen with the GPU image's /opt/gcc g++)
// leaves the stream locale that c10::str uses without its numeric facets, and `ss << int64_t` then
// segfaults (or prints nothing). Strings, devices and dtypes stream fine.
std::string num(int64_t v) { return std::to_string(v); }

std::string dims(c10::IntArrayRef d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

void check_packed_operand(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "int4_gemm: ", name, " must be a CUDA tensor; got device ",
              t.device().str());
  TORCH_CHECK(t.scalar_type() == torch::kUInt8 || t.scalar_type() == torch::kInt8, "int4_gemm: ",
              name, " must be packed INT4 as uint8 (two values per byte, megaq.quant.pack_int4); got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "int4_gemm: ", name, " must be 2-D [rows, K/2]; got shape ",
              dims(t.sizes()));
  TORCH_CHECK(t.size(1) == 0 || t.stride(1) == 1, "int4_gemm: ", name,
              " must have contiguous rows (stride(1) == 1); got strides ", dims(t.strides()));
  TORCH_CHECK(t.size(1) % 16 == 0, "int4_gemm: ", name,
              ".size(1) (K/2 bytes) must be a multiple of 16, i.e. K a multiple of 32; got ",
              num(t.size(1)), " bytes. megaq.kernels.cuda_ext.int4_gemm zero-pads K for you.");
  if (t.size(0) > 1 && t.size(1) > 0)
    TORCH_CHECK(t.stride(0) % 16 == 0, "int4_gemm: ", name,
                " row stride must be a multiple of 16 bytes; got ", num(t.stride(0)));
  if (t.numel() > 0)
    TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, "int4_gemm: ", name,
                " data pointer must be 16-byte aligned (use .contiguous() on a fresh tensor)");
}

void check_scale(const std::optional<torch::Tensor>& s, int64_t n, const torch::Tensor& ref,
                 const char* name, const char* dim_name) {
  if (!s.has_value()) return;
  const torch::Tensor& t = *s;
  TORCH_CHECK(t.device() == ref.device(), "int4_gemm: ", name, " must be on ", ref.device().str(),
              " like the operands; got ", t.device().str());
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, "int4_gemm: ", name, " must be float32; got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == n && t.is_contiguous(), "int4_gemm: ", name, " must be a contiguous ",
              "float32 vector with ", dim_name, " = ", num(n), " elements; got shape ",
              dims(t.sizes()), " and strides ", dims(t.strides()));
}

// out = (A @ B^T) * scale_a[:, None] * scale_b[None, :], written into `out` (returned).
// a: uint8 [M, K/2], b: uint8 [N, K/2] packed INT4; scale_a: f32 [M] or None; scale_b: f32 [N] or
// None; out: [M, N] float32 / bfloat16, or int32 (raw accumulators; then both scales must be None).
torch::Tensor int4_gemm(const torch::Tensor& a, const torch::Tensor& b,
                        torch::Tensor out, const std::optional<torch::Tensor>& scale_a,
                        const std::optional<torch::Tensor>& scale_b) {
  check_packed_operand(a, "a");
  check_packed_operand(b, "b");
  TORCH_CHECK(a.device() == b.device(), "int4_gemm: a and b must be on the same device; got ",
              a.device().str(), " and ", b.device().str());
  TORCH_CHECK(a.size(1) == b.size(1), "int4_gemm: a and b must have the same packed K; got a ",
              dims(a.sizes()), " and b ", dims(b.sizes()));
  const int64_t M = a.size(0), N = b.size(0), K = 2 * a.size(1);
  check_scale(scale_a, M, a, "scale_a", "M");
  check_scale(scale_b, N, a, "scale_b", "N");

  TORCH_CHECK(out.device() == a.device(), "int4_gemm: out must be on ", a.device().str(), "; got ",
              out.device().str());
  int out_kind;
  switch (out.scalar_type()) {
    case torch::kFloat32: out_kind = MEGAQ_OUT_F32; break;
    case torch::kBFloat16: out_kind = MEGAQ_OUT_BF16; break;
    case torch::kInt32: out_kind = MEGAQ_OUT_I32; break;
    default:
      TORCH_CHECK(false, "int4_gemm: out dtype must be float32, bfloat16 or int32; got ",
                  out.scalar_type());
  }
  TORCH_CHECK(out_kind != MEGAQ_OUT_I32 || (!scale_a.has_value() && !scale_b.has_value()),
              "int4_gemm: int32 output returns the raw accumulators; pass no scales");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N, "int4_gemm: out must be [",
              num(M), ", ", num(N), "]; got ", dims(out.sizes()));
  TORCH_CHECK(N <= 1 || out.stride(1) == 1, "int4_gemm: out must have contiguous rows; got strides ",
              dims(out.strides()));
  const int64_t ldc = M <= 1 ? N : out.stride(0);
  TORCH_CHECK(ldc >= N, "int4_gemm: out row stride ", num(ldc), " < N = ", num(N));
  if (M == 0 || N == 0) return out;

  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  const cudaError_t err = megaq_int4_gemm(
      static_cast<const uint8_t*>(a.data_ptr()), static_cast<const uint8_t*>(b.data_ptr()),
      scale_a.has_value() ? scale_a->data_ptr<float>() : nullptr,
      scale_b.has_value() ? scale_b->data_ptr<float>() : nullptr, out.data_ptr(), out_kind, M, N,
      K, M <= 1 ? a.size(1) : a.stride(0), N <= 1 ? b.size(1) : b.stride(0), ldc, stream);
  TORCH_CHECK(err != cudaErrorNotSupported,
              "int4_gemm: this GPU has no INT4 mma (needs compute capability >= 8.0); device ",
              a.device().str());
  TORCH_CHECK(err == cudaSuccess, "int4_gemm: CUDA error: ", cudaGetErrorString(err));
  return out;
}

void check_int8_operand(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "int8_gemm: ", name, " must be a CUDA tensor; got device ", t.device().str());
  TORCH_CHECK(t.scalar_type() == torch::kInt8, "int8_gemm: ", name, " must be int8; got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "int8_gemm: ", name, " must be 2-D [rows, K]; got shape ", dims(t.sizes()));
  TORCH_CHECK(t.size(0) >= 1, "int8_gemm: ", name, " must have at least one row; got shape ",
              dims(t.sizes()));
  TORCH_CHECK(t.stride(1) == 1, "int8_gemm: ", name,
              " must have contiguous rows (stride(1) == 1); got strides ", dims(t.strides()));
  TORCH_CHECK(t.size(1) >= 16 && t.size(1) % 16 == 0, "int8_gemm: K (", name,
              ".size(1)) must be a positive multiple of 16 (TMA rows are whole 16-byte units); got ",
              num(t.size(1)));
  TORCH_CHECK(t.size(0) == 1 || t.stride(0) % 16 == 0, "int8_gemm: ", name,
              " row stride must be a multiple of 16 bytes; got ", num(t.stride(0)));
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, "int8_gemm: ", name,
              " data pointer must be 16-byte aligned (use .contiguous() on a fresh tensor)");
}

// A 2-D FP32 scale grid of `rows` x (1 or `kb`) on `ref`'s device; returns its (row, K-block) strides
// in elements, the K-block stride 0 when one scale covers the whole row.
std::pair<int64_t, int64_t> check_int8_scale(const torch::Tensor& s, int64_t rows, int64_t kb,
                                             const torch::Tensor& ref, const char* name,
                                             const char* shape_hint) {
  TORCH_CHECK(s.device() == ref.device(), "int8_gemm: ", name, " must be on ", ref.device().str(),
              " like the operands; got ", s.device().str());
  TORCH_CHECK(s.scalar_type() == torch::kFloat32, "int8_gemm: ", name, " must be float32; got ",
              s.scalar_type());
  const bool row_vector = s.dim() == 1 && s.size(0) == rows;
  const bool grid = s.dim() == 2 && s.size(0) == rows && (s.size(1) == kb || s.size(1) == 1);
  TORCH_CHECK(row_vector || grid, "int8_gemm: ", name, " must have shape ", shape_hint, " = [",
              num(rows), ", ", num(kb), "] (or [", num(rows), ", 1] for one scale per row); got ",
              dims(s.sizes()));
  const int64_t row_stride = s.stride(0);
  const int64_t kb_stride = grid && s.size(1) > 1 ? s.stride(1) : 0;
  TORCH_CHECK(row_stride >= 0 && kb_stride >= 0, "int8_gemm: ", name,
              " must have non-negative strides; got ", dims(s.strides()));
  return {row_stride, kb_stride};
}

// out = scaled_mm(A, B) on Hopper INT8 tensor cores, written into `out` (returned); see int8_gemm.h.
// a: int8 [M, K], b: int8 [N, K] (K-contiguous rows); mode "rowcol": scale_a [M] / [M, 1], scale_b
// [N] / [N, 1], one INT32 sum over K; mode "block128": scale_a [M, ceil(K/128)], scale_b
// [ceil(N/scale_b_rows), ceil(K/128)] (either may be [rows, 1]: one scale per row), promoted to FP32
// every 128 of K. bias: float32 [N] or None. out: [M, N] float32 / bfloat16 with contiguous rows, or
// int8 (requantized per (1, 128) block of each row, nearest; the scales go to out_scale, float32
// [M, ceil(N/128)] with contiguous rows). gelu_q / gelu_scale (bfloat16 out, rowcol, no bias): the
// product times GELU'(gelu_q * gelu_scale) — int8 [M, N] with out's row stride and float32
// [M, ceil(N/128)] with contiguous rows.
torch::Tensor int8_gemm(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor out,
                        const torch::Tensor& scale_a, const torch::Tensor& scale_b,
                        const std::optional<torch::Tensor>& bias, const std::string& mode,
                        int64_t scale_b_rows, int64_t tile, int64_t group_m,
                        const std::optional<torch::Tensor>& out_scale,
                        const std::optional<torch::Tensor>& gelu_q,
                        const std::optional<torch::Tensor>& gelu_scale) {
  check_int8_operand(a, "a");
  check_int8_operand(b, "b");
  TORCH_CHECK(a.device() == b.device(), "int8_gemm: a and b must be on the same device; got ",
              a.device().str(), " and ", b.device().str());
  TORCH_CHECK(a.size(1) == b.size(1), "int8_gemm: a and b must have the same K; got a ", dims(a.sizes()),
              " and b ", dims(b.sizes()));
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  const int64_t kb = (K + 127) / 128;
  int mode_id;
  if (mode == "rowcol") {
    mode_id = MEGAQ_INT8_ROWCOL;
    TORCH_CHECK(scale_b_rows == 1, "int8_gemm: mode rowcol takes one scale per row of B "
                "(scale_b_rows = 1); got ", num(scale_b_rows));
    TORCH_CHECK(K <= 133143, "int8_gemm: mode rowcol sums INT32 over all of K, exact only for "
                "K * 127^2 < 2^31 (K <= 133143); got K = ", num(K), ". Use mode block128.");
  } else if (mode == "block128") {
    mode_id = MEGAQ_INT8_BLOCK128;
    TORCH_CHECK(scale_b_rows == 1 || (scale_b_rows > 0 && scale_b_rows % 128 == 0),
                "int8_gemm: scale_b_rows (rows of B sharing a scale) must be 1 or a multiple of 128; got ",
                num(scale_b_rows));
  } else {
    TORCH_CHECK(false, "int8_gemm: mode must be 'rowcol' or 'block128'; got '", mode, "'");
  }
  const int64_t kb_a = mode_id == MEGAQ_INT8_ROWCOL ? 1 : kb;
  const int64_t b_rows = (N + scale_b_rows - 1) / scale_b_rows;
  const auto sa = check_int8_scale(scale_a, M, kb_a, a, "scale_a", "[M, ceil(K/128)]");
  const auto sb = check_int8_scale(scale_b, b_rows, kb_a, a, "scale_b",
                                   "[ceil(N/scale_b_rows), ceil(K/128)]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == a.device() && bias->scalar_type() == torch::kFloat32 &&
                    bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                "int8_gemm: bias must be a contiguous float32 [N] tensor on ", a.device().str(),
                " with N = ", num(N), "; got ", bias->scalar_type(), " ", dims(bias->sizes()), " on ",
                bias->device().str());
  }
  TORCH_CHECK(out.device() == a.device(), "int8_gemm: out must be on ", a.device().str(), "; got ",
              out.device().str());
  int out_kind;
  switch (out.scalar_type()) {
    case torch::kFloat32: out_kind = MEGAQ_INT8_OUT_F32; break;
    case torch::kBFloat16: out_kind = MEGAQ_INT8_OUT_BF16; break;
    case torch::kInt8: out_kind = MEGAQ_INT8_OUT_INT8; break;
    default:
      TORCH_CHECK(false, "int8_gemm: out dtype must be float32, bfloat16 or int8; got ", out.scalar_type());
  }
  const int64_t out_blocks = (N + 127) / 128;
  float* out_scale_ptr = nullptr;
  int64_t ld_out_scale = 0;
  if (out_kind == MEGAQ_INT8_OUT_INT8) {
    TORCH_CHECK(out_scale.has_value(), "int8_gemm: int8 out needs out_scale (float32 [M, ceil(N/128)])");
    const torch::Tensor& os = *out_scale;
    TORCH_CHECK(os.device() == a.device() && os.scalar_type() == torch::kFloat32 && os.dim() == 2 &&
                    os.size(0) == M && os.size(1) == out_blocks && (out_blocks == 1 || os.stride(1) == 1),
                "int8_gemm: out_scale must be a float32 [", num(M), ", ", num(out_blocks), "] tensor with "
                "contiguous rows on ", a.device().str(), "; got ", os.scalar_type(), " ", dims(os.sizes()),
                " strides ", dims(os.strides()), " on ", os.device().str());
    out_scale_ptr = os.data_ptr<float>();
    ld_out_scale = M == 1 ? out_blocks : os.stride(0);
    TORCH_CHECK(ld_out_scale >= out_blocks, "int8_gemm: out_scale row stride ", num(ld_out_scale), " < ",
                num(out_blocks));
  } else {
    TORCH_CHECK(!out_scale.has_value(), "int8_gemm: out_scale is for int8 out only; out is ", out.scalar_type());
  }
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N, "int8_gemm: out must be [", num(M),
              ", ", num(N), "]; got ", dims(out.sizes()));
  TORCH_CHECK(N == 1 || out.stride(1) == 1, "int8_gemm: out must have contiguous rows; got strides ",
              dims(out.strides()));
  const int64_t ldc = M == 1 ? N : out.stride(0);
  TORCH_CHECK(ldc >= N, "int8_gemm: out row stride ", num(ldc), " < N = ", num(N));
  TORCH_CHECK(tile >= 0 && tile <= MEGAQ_INT8_TILE_128x128_SERIAL, "int8_gemm: unknown tile ", num(tile));
  TORCH_CHECK(gelu_q.has_value() == gelu_scale.has_value(),
              "int8_gemm: gelu_q and gelu_scale come together (the GELU input and its scales)");
  const int8_t* gelu_q_ptr = nullptr;
  const float* gelu_scale_ptr = nullptr;
  int64_t ld_gelu_q = 0, ld_gelu_scale = 0;
  if (gelu_q.has_value()) {
    TORCH_CHECK(out_kind == MEGAQ_INT8_OUT_BF16 && mode_id == MEGAQ_INT8_ROWCOL && !bias.has_value() &&
                    tile == MEGAQ_INT8_TILE_AUTO,
                "int8_gemm: the GELU-backward epilogue (gelu_q) runs with bfloat16 out, mode rowcol, no bias "
                "and the default tile; got out ", out.scalar_type(), ", mode ", mode, ", bias ",
                bias.has_value() ? "given" : "none", ", tile ", num(tile));
    const torch::Tensor& gq = *gelu_q;
    const torch::Tensor& gs = *gelu_scale;
    TORCH_CHECK(gq.device() == a.device() && gq.scalar_type() == torch::kInt8 && gq.dim() == 2 &&
                    gq.size(0) == M && gq.size(1) == N && (N == 1 || gq.stride(1) == 1),
                "int8_gemm: gelu_q must be an int8 [", num(M), ", ", num(N), "] tensor with contiguous rows on ",
                a.device().str(), "; got ", gq.scalar_type(), " ", dims(gq.sizes()), " strides ",
                dims(gq.strides()), " on ", gq.device().str());
    TORCH_CHECK(gs.device() == a.device() && gs.scalar_type() == torch::kFloat32 && gs.dim() == 2 &&
                    gs.size(0) == M && gs.size(1) == out_blocks && (out_blocks == 1 || gs.stride(1) == 1),
                "int8_gemm: gelu_scale must be a float32 [", num(M), ", ", num(out_blocks), "] tensor with "
                "contiguous rows on ", a.device().str(), "; got ", gs.scalar_type(), " ", dims(gs.sizes()),
                " on ", gs.device().str());
    TORCH_CHECK(N % 8 == 0 && ldc % 8 == 0 && reinterpret_cast<std::uintptr_t>(out.data_ptr()) % 16 == 0 &&
                    reinterpret_cast<std::uintptr_t>(gq.data_ptr()) % 16 == 0,
                "int8_gemm: the GELU-backward epilogue needs 16-byte aligned rows (N and the row stride "
                "multiples of 8, out and gelu_q 16-byte aligned: TMA stores); got N = ", num(N), ", ldc = ",
                num(ldc));
    gelu_q_ptr = static_cast<const int8_t*>(gq.data_ptr());
    gelu_scale_ptr = gs.data_ptr<float>();
    ld_gelu_q = M == 1 ? N : gq.stride(0);
    ld_gelu_scale = M == 1 ? out_blocks : gs.stride(0);
    TORCH_CHECK(ld_gelu_q == ldc, "int8_gemm: gelu_q must have out's row stride (", num(ldc), "); got ",
                num(ld_gelu_q));
    TORCH_CHECK(ld_gelu_scale >= out_blocks, "int8_gemm: gelu_scale row stride ", num(ld_gelu_scale),
                " < ", num(out_blocks));
  }

  const c10::cuda::CUDAGuard guard(a.device());
  const cudaError_t ready = megaq_int8_gemm_check_device();
  TORCH_CHECK(ready != cudaErrorNotSupported, "int8_gemm: needs an sm_90 GPU (H100/H200) and a build "
              "with sm_90a code (TORCH_CUDA_ARCH_LIST with 9.0a); device ", a.device().str());
  TORCH_CHECK(ready == cudaSuccess, "int8_gemm: CUDA error: ", cudaGetErrorString(ready));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  const cudaError_t err = megaq_int8_gemm(
      static_cast<const int8_t*>(a.data_ptr()), static_cast<const int8_t*>(b.data_ptr()), M, N, K,
      M == 1 ? K : a.stride(0), N == 1 ? K : b.stride(0), mode_id, scale_a.data_ptr<float>(), sa.first,
      sa.second, scale_b.data_ptr<float>(), scale_b_rows, sb.first, sb.second,
      bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr(), out_kind, ldc, out_scale_ptr,
      ld_out_scale, gelu_q_ptr, ld_gelu_q, gelu_scale_ptr, ld_gelu_scale, static_cast<int>(tile),
      static_cast<int>(group_m), stream);
  TORCH_CHECK(err != cudaErrorInvalidValue, "int8_gemm: the kernel refused tile ", num(tile),
              " for mode ", mode, " (or an argument the checks above missed)");
  TORCH_CHECK(err == cudaSuccess, "int8_gemm: CUDA error: ", cudaGetErrorString(err));
  return out;
}

// True when int8_gemm runs on the current device (sm_90 and this build has sm_90a code). The first
// call per device does a synchronous read of a device symbol: not inside a CUDA graph capture.
bool int8_gemm_supported() { return megaq_int8_gemm_check_device() == cudaSuccess; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megaq CUDA kernels (csrc/); see megaq.kernels.cuda_ext for the Python API";
  m.def("int4_gemm", &int4_gemm, pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("out"),
        pybind11::arg("scale_a") = pybind11::none(), pybind11::arg("scale_b") = pybind11::none(),
        "out = (A @ B^T) * scale_a[:, None] * scale_b[None, :] on mma.sync m16n8k64 s4.s4 "
        "(A [M, K/2], B [N, K/2] packed INT4 uint8, low nibble = even index; K % 32 == 0). "
        "out: preallocated [M, N] float32 / bfloat16 / int32 (int32: raw accumulators, no scales).");
  m.def("int8_gemm", &int8_gemm, pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("out"),
        pybind11::arg("scale_a"), pybind11::arg("scale_b"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("mode") = "rowcol", pybind11::arg("scale_b_rows") = 1, pybind11::arg("tile") = 0,
        pybind11::arg("group_m") = 0, pybind11::arg("out_scale") = pybind11::none(),
        pybind11::arg("gelu_q") = pybind11::none(), pybind11::arg("gelu_scale") = pybind11::none(),
        "out = scaled_mm(A, B) (+ bias) on sm_90a wgmma s8 tensor cores (TMA, warp-specialized). "
        "a [M, K], b [N, K] int8, K % 16 == 0; mode 'rowcol' (scales [M] x [N], INT32 over all K) or "
        "'block128' (scales per 128 of K, B scale per row or per 128-row block: scale_b_rows). "
        "out: preallocated [M, N] float32 / bfloat16, or int8 requantized per (1, 128) block of each row "
        "(nearest) with its scales in out_scale (float32 [M, ceil(N/128)]). gelu_q, gelu_scale (bfloat16 "
        "out, rowcol, no bias): out times GELU'(gelu_q * gelu_scale), the (1, 128)-block INT8 GELU input.");
  m.def("int8_gemm_supported", &int8_gemm_supported,
        "True when int8_gemm runs on the current CUDA device (sm_90 with sm_90a code in this build).");
}
