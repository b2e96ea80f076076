// One-row bf16 linear on CPUs with AVX512-BF16: y[n] = bf16(sum_k x[k] w[n, k] (+ b[n])).
//
// The 1-row decode step of a small model is a chain of matrix-vector products that only read
// weights; torch's bf16 gemv and oneDNN's packed kernels read them at ~13-16 GB/s on the 2-core
// machines this project is measured on, llama.cpp's at >22 GB/s. This kernel streams ROWS weight
// rows at a time against one register-resident slice of x (vdpbf16ps: 32 bf16 products per
// instruction, fp32 accumulators), splits the rows over torch's own OpenMP pool (at::parallel_for),
// and rounds each fp32 sum to bf16 once (round to nearest even), as the other kernels do; only the
// order of the fp32 additions differs from them. Registered as torch.ops.powersample_fast.gemv_bf16,
// so torch.jit.trace records it like any aten op.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

constexpr int64_t ROWS = 4;  // weight rows per pass over x

inline __m512i load_bf16(const at::BFloat16* p, __mmask32 mask) {
  return _mm512_maskz_loadu_epi16(mask, p);
}

inline float bf16_to_float(at::BFloat16 v) { return static_cast<float>(v); }

// y[n0:n1] for a [N, K] row-major weight.
void gemv_rows(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* b, at::BFloat16* y,
               int64_t K, int64_t n0, int64_t n1) {
  const int64_t full = K / 32 * 32;
  const __mmask32 tail = K == full ? 0 : static_cast<__mmask32>((1ull << (K - full)) - 1);
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    const at::BFloat16* w0 = w + n * K;
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      for (int r = 0; r < ROWS; ++r) {
        acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512(w0 + r * K + k));
      }
    }
    if (tail) {
      const __m512bh xv = (__m512bh)load_bf16(x + full, tail);
      for (int r = 0; r < ROWS; ++r) {
        acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)load_bf16(w0 + r * K + full, tail));
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      float s = _mm512_reduce_add_ps(acc[r]);
      if (b) s += bf16_to_float(b[n + r]);
      y[n + r] = at::BFloat16(s);  // round to nearest even
    }
  }
  for (; n < n1; ++n) {
    const at::BFloat16* wr = w + n * K;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(wr + k));
    }
    if (tail) acc = _mm512_dpbf16_ps(acc, (__m512bh)load_bf16(x + full, tail), (__m512bh)load_bf16(wr + full, tail));
    float s = _mm512_reduce_add_ps(acc);
    if (b) s += bf16_to_float(b[n]);
    y[n] = at::BFloat16(s);
  }
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv_bf16: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 only");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "gemv_bf16: weight must be a contiguous [N, K] matrix");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.size(-1) == K && x.numel() == K, "gemv_bf16: x must hold one row of ", K, " values");
  const at::Tensor xc = x.contiguous();
  const at::BFloat16* bp = nullptr;
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N, "gemv_bf16: bias must be bf16 [N]");
    bc = bias->contiguous();
    bp = bc.data_ptr<at::BFloat16>();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  // grain: about 64 KB of weights per task, so small layers stay on one thread
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, ROWS * K));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    gemv_rows(xp, wp, bp, yp, K, begin * ROWS, std::min(N, end * ROWS));
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(powersample_fast, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
}
