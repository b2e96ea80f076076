// fp32 CPU kernels (AVX2 + FMA; built with -ffp-contract=off so a * b + c is never fused unless an
// intrinsic says so): the fp32 counterparts of fused_bf16.cpp, for CPUs whose default dtype is fp32
// (no native bf16). (No fp32 gemv: a one-row fp32 engine's linears run torch's F.linear, MKL's sgemv,
// which read the weights at ~23 GB/s here against ~18 GB/s for an AVX2 loop of ours.) Each computes
// what the aten chain it replaces computes:
//   rope_f32:         x*cos + swap_halves(x)*sin_signed as two products and a sum: bit-identical;
//   silu_mul_f32:     silu(g) * u, silu as x / (1 + exp(-x)) with a polynomial exp (~1 ulp);
//   rms_norm_f32:     w * (x * rsqrt(mean(x^2) + eps)) (another summation order for the mean);
//   attn_decode_f32:  SDPA with an additive mask for a few query rows per kv head, fp32 throughout.
#include <immintrin.h>

#include <cmath>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

void check_f32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": fp32 CPU tensors only");
}

inline __m256i tail_mask(int64_t n) {  // lanes 0..n-1 on (n < 8)
  alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n));
}

inline float hsum(__m256 v) {  // a fixed order: (lo + hi) halves, then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 exp256(__m256 x) {  // as exp512 in fused_bf16.cpp
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n by the exponent bits (n in [-127, 128]: x is clamped so 2^n stays a normal number or 0)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

at::Tensor rms_norm_f32(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_f32_cpu(x, "rms_norm_f32");
  check_f32_cpu(w, "rms_norm_f32");
  const int64_t D = x.size(-1);
  TORCH_CHECK(w.numel() == D, "rms_norm_f32: weight must hold ", D, " values");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, D ? x.numel() / D : 0, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      float ss = 0.f;
      for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
      const float scale = 1.f / std::sqrt(ss / static_cast<float>(D) + e);
      for (int64_t i = 0; i < D; ++i) yr[i] = wp[i] * (xr[i] * scale);
    }
  });
  return y;
}

at::Tensor silu_mul_f32(const at::Tensor& gu) {
  check_f32_cpu(gu, "silu_mul_f32");
  const int64_t I2 = gu.size(-1);
  TORCH_CHECK(I2 % 2 == 0, "silu_mul_f32: the last dim holds [gate; up] halves");
  const int64_t I = I2 / 2;
  const at::Tensor c = gu.contiguous();
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, gu.options());
  const float* p = c.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.f);
  at::parallel_for(0, I2 ? c.numel() / I2 : 0, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = p + r * I2;
      const float* u = g + I;
      float* yr = yp + r * I;
      for (int64_t i = 0; i < I; i += 8) {
        const __m256i m = I - i >= 8 ? _mm256_set1_epi32(-1) : tail_mask(I - i);
        const __m256 x = _mm256_maskload_ps(g + i, m);
        const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        _mm256_maskstore_ps(yr + i, m, _mm256_mul_ps(s, _mm256_maskload_ps(u + i, m)));
      }
    }
  });
  return y;
}

at::Tensor rope_f32(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads, int64_t D,
                    int64_t R) {
  check_f32_cpu(qkv, "rope_f32");
  check_f32_cpu(cos, "rope_f32");
  check_f32_cpu(sin, "rope_f32");
  TORCH_CHECK(qkv.dim() == 3 && qkv.stride(2) == 1, "rope_f32: qkv must be [B, T, W] with unit last stride");
  const int64_t B = qkv.size(0), T = qkv.size(1);
  TORCH_CHECK(n_heads * D <= qkv.size(2) && R % 2 == 0 && R <= D, "rope_f32: bad head sizes");
  TORCH_CHECK(cos.numel() == B * T * R && sin.numel() == B * T * R, "rope_f32: cos/sin must be [B, 1, T, R]");
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor y = at::empty({B, n_heads, T, D}, qkv.options());
  const float *xp = qkv.data_ptr<float>(), *cp = cc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t sb = qkv.stride(0), st = qkv.stride(1), half = R / 2;
  at::parallel_for(0, B * n_heads * T, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i % T, h = (i / T) % n_heads, b = i / (T * n_heads);
      const float* x = xp + b * sb + t * st + h * D;
      const float* c = cp + (b * T + t) * R;
      const float* s = sp + (b * T + t) * R;
      float* o = yp + i * D;
      for (int64_t d = 0; d < R; ++d) {
        const float a = x[d] * c[d];
        const float bb = x[d < half ? d + half : d - half] * s[d];
        o[d] = a + bb;
      }
      for (int64_t d = R; d < D; ++d) o[d] = x[d];
    }
  });
  return y;
}

at::Tensor attn_decode_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  for (const at::Tensor* t : {&q, &k, &v, &mask}) check_f32_cpu(*t, "attn_decode_f32");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "attn_decode_f32: 4-d tensors");
  const int64_t B = q.size(0), Hk = q.size(1), M = q.size(2), D = q.size(3), L = k.size(2);
  TORCH_CHECK(D % 8 == 0 && D <= 256 && k.size(3) == D && v.sizes() == k.sizes() && k.size(0) == B && k.size(1) == Hk,
              "attn_decode_f32: shapes");
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == M && mask.size(3) == L, "attn_decode_f32: mask shape");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(3) == 1,
              "attn_decode_f32: unit last strides");
  at::Tensor out = at::empty({B, Hk, M, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(), *mp = mask.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t nv = D / 8;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * L * D));
  at::parallel_for(0, B * Hk, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hk, h = i % Hk;
      const float* kb = kp + b * k.stride(0) + h * k.stride(1);
      const float* vb = vp + b * v.stride(0) + h * v.stride(1);
      for (int64_t m = 0; m < M; ++m) {
        const float* qr = qp + b * q.stride(0) + h * q.stride(1) + m * q.stride(2);
        const float* mr = mp + b * mask.stride(0) + m * mask.stride(2);
        float mx = -INFINITY;
        for (int64_t j = 0; j < L; ++j) {
          const float* kr = kb + j * k.stride(2);
          __m256 acc = _mm256_setzero_ps();
          for (int64_t c = 0; c < nv; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * c), _mm256_loadu_ps(kr + 8 * c), acc);
          const float sj = hsum(acc) * scale + mr[j];
          s[j] = sj;
          mx = sj > mx ? sj : mx;
        }
        float sum = 0.f;
        for (int64_t j = 0; j < L; j += 8) {
          const __m256i mk = L - j >= 8 ? _mm256_set1_epi32(-1) : tail_mask(L - j);
          const __m256 x = _mm256_maskload_ps(s.data() + j, mk);
          const __m256 seen = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_GT_OQ), _mm256_castsi256_ps(mk));
          const __m256 p = _mm256_and_ps(exp256(_mm256_sub_ps(x, _mm256_set1_ps(mx))), seen);
          _mm256_maskstore_ps(s.data() + j, mk, p);
          sum += hsum(p);
        }
        __m256 o[32];
        for (int64_t c = 0; c < nv; ++c) o[c] = _mm256_setzero_ps();
        for (int64_t j = 0; j < L; ++j) {
          if (s[j] == 0.f) continue;
          const __m256 pj = _mm256_set1_ps(s[j]);
          const float* vr = vb + j * v.stride(2);
          for (int64_t c = 0; c < nv; ++c) o[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * c), o[c]);
        }
        const __m256 inv = _mm256_set1_ps(1.f / sum);
        float* orow = op + ((b * Hk + h) * M + m) * D;
        for (int64_t c = 0; c < nv; ++c) _mm256_storeu_ps(orow + 8 * c, _mm256_mul_ps(o[c], inv));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(powersample_fast, CPU, m) {
  m.impl("rms_norm_f32", &rms_norm_f32);
  m.impl("silu_mul_f32", &silu_mul_f32);
  m.impl("rope_f32", &rope_f32);
  m.impl("attn_decode_f32", &attn_decode_f32);
}
