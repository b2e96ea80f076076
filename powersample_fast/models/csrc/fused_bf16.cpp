// Fused bf16 element-wise ops of a decoder layer on CPU: each replaces a chain of 4-10 small aten ops
// (a 1-row decode step of a small model pays ~2-5 us of dispatch and allocation per op, ~1500 ops a
// step). Each computes what the eager chain computes, rounding to bf16 where the chain does:
//   rope_bf16:     x*cos + swap_halves(x)*sin_signed, three roundings as three bf16 ops: bit-identical
//                  (a bf16 x bf16 product is exact in fp32, each op rounds once, nearest even);
//   silu_mul_bf16: bf16(bf16(silu(g)) * u) for [g; u] halves: silu in fp32 as x / (1 + exp(-x)),
//                  exp by a Cephes-style polynomial (~1 fp32 ulp; torch's Sleef exp may differ in
//                  the last fp32 bit); bf16 rounding by vcvtneps2bf16 (nearest even; subnormal fp32
//                  values, below 1.2e-38, flush to zero);
//   rms_norm_bf16: w * bf16(x * rsqrt(mean(x^2) + eps)) in fp32: the sum of squares is added in
//                  another order than torch's reduction (a few fp32 ulps in the scale);
//   attn_decode_bf16: SDPA with an additive mask for a few query rows per kv head (a decode step):
//                  scores, softmax and the weighted sum of V in fp32, one rounding to bf16 at the end:
//                  the exact value rounded once, where torch's SDPA CPU kernel also rounds its
//                  probabilities to bf16 before the weighted sum (so the two differ by a few ulps).
// Registered as torch ops (torch.ops.powersample_fast.*), so a traced step records them.
#include <immintrin.h>

#include <cmath>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

using bf16 = at::BFloat16;

inline float f(bf16 v) { return static_cast<float>(v); }

void check_bf16_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, name, ": bf16 CPU tensors only");
}

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_bf16_cpu(x, "rms_norm_bf16");
  check_bf16_cpu(w, "rms_norm_bf16");
  const int64_t D = x.size(-1);
  TORCH_CHECK(w.numel() == D, "rms_norm_bf16: weight must hold ", D, " values");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const bf16* xp = xc.data_ptr<bf16>();
  const bf16* wp = wc.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, D ? x.numel() / D : 0, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* xr = xp + r * D;
      bf16* yr = yp + r * D;
      float ss = 0.f;
      for (int64_t i = 0; i < D; ++i) ss += f(xr[i]) * f(xr[i]);
      const float scale = 1.f / std::sqrt(ss / static_cast<float>(D) + e);
      for (int64_t i = 0; i < D; ++i) yr[i] = bf16(f(wp[i]) * f(bf16(f(xr[i]) * scale)));
    }
  });
  return y;
}

inline __m512 load16(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

// exp(x) for x in fp32: 2^n e^r, n = round(x log2 e), r = x - n ln 2 (two-part ln 2), e^r by Cephes'
// expf polynomial; x clamped to [-103, 88.38] (exp underflows to 0 / stays finite).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

at::Tensor silu_mul_bf16(const at::Tensor& gu) {
  check_bf16_cpu(gu, "silu_mul_bf16");
  const int64_t I2 = gu.size(-1);
  TORCH_CHECK(I2 % 2 == 0, "silu_mul_bf16: the last dim holds [gate; up] halves");
  const int64_t I = I2 / 2;
  const at::Tensor c = gu.contiguous();
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, gu.options());
  const bf16* p = c.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, I2 ? c.numel() / I2 : 0, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* g = p + r * I2;
      const bf16* u = g + I;
      bf16* yr = yp + r * I;
      for (int64_t i = 0; i < I; i += 16) {
        const __mmask16 m = I - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (I - i)) - 1);
        const __m512 x = load16(g + i, m);
        const __m512 s = round_bf16(_mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
        _mm256_mask_storeu_epi16(yr + i, m, to_bf16(_mm512_mul_ps(s, load16(u + i, m))));
      }
    }
  });
  return y;
}

// qkv [B, T, W] (W >= n_heads * D): the first n_heads heads of D values, RoPE'd on their first R
// values with cos / sin_signed [B, 1, T, R]; returns [B, n_heads, T, D] (contiguous).
at::Tensor rope_bf16(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads,
                     int64_t D, int64_t R) {
  check_bf16_cpu(qkv, "rope_bf16");
  check_bf16_cpu(cos, "rope_bf16");
  check_bf16_cpu(sin, "rope_bf16");
  TORCH_CHECK(qkv.dim() == 3 && qkv.stride(2) == 1, "rope_bf16: qkv must be [B, T, W] with unit last stride");
  const int64_t B = qkv.size(0), T = qkv.size(1);
  TORCH_CHECK(n_heads * D <= qkv.size(2) && R % 2 == 0 && R <= D, "rope_bf16: bad head sizes");
  TORCH_CHECK(cos.numel() == B * T * R && sin.numel() == B * T * R, "rope_bf16: cos/sin must be [B, 1, T, R]");
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor y = at::empty({B, n_heads, T, D}, qkv.options());
  const bf16* xp = qkv.data_ptr<bf16>();
  const bf16* cp = cc.data_ptr<bf16>();
  const bf16* sp = sc.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  const int64_t sb = qkv.stride(0), st = qkv.stride(1), half = R / 2;
  at::parallel_for(0, B * n_heads * T, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i % T, h = (i / T) % n_heads, b = i / (T * n_heads);
      const bf16* x = xp + b * sb + t * st + h * D;
      const bf16* c = cp + (b * T + t) * R;
      const bf16* s = sp + (b * T + t) * R;
      bf16* o = yp + i * D;
      for (int64_t d = 0; d < R; ++d) {
        const bf16 other = x[d < half ? d + half : d - half];
        o[d] = bf16(f(bf16(f(x[d]) * f(c[d]))) + f(bf16(f(other) * f(s[d]))));
      }
      for (int64_t d = R; d < D; ++d) o[d] = x[d];
    }
  });
  return y;
}

// q [B, Hk, M, D], k / v [B, Hk, L, D], mask [B, 1, M, L] (additive, bf16; -inf hides a key), all with
// unit last stride, D a multiple of 16 up to 256 -> softmax(q k^T / sqrt(D) + mask) v as [B, Hk, M, D].
at::Tensor attn_decode_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  for (const at::Tensor* t : {&q, &k, &v, &mask}) check_bf16_cpu(*t, "attn_decode_bf16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "attn_decode_bf16: 4-d tensors");
  const int64_t B = q.size(0), Hk = q.size(1), M = q.size(2), D = q.size(3), L = k.size(2);
  TORCH_CHECK(D % 16 == 0 && D <= 256 && k.size(3) == D && v.sizes() == k.sizes() && k.size(0) == B && k.size(1) == Hk,
              "attn_decode_bf16: shapes");
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == M && mask.size(3) == L, "attn_decode_bf16: mask shape");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(3) == 1,
              "attn_decode_bf16: unit last strides");
  at::Tensor out = at::empty({B, Hk, M, D}, q.options());
  const bf16 *qp = q.data_ptr<bf16>(), *kp = k.data_ptr<bf16>(), *vp = v.data_ptr<bf16>(), *mp = mask.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t nv = D / 16;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * L * D));
  at::parallel_for(0, B * Hk, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(L + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hk, h = i % Hk;
      const bf16* kb = kp + b * k.stride(0) + h * k.stride(1);
      const bf16* vb = vp + b * v.stride(0) + h * v.stride(1);
      for (int64_t m = 0; m < M; ++m) {
        const bf16* qr = qp + b * q.stride(0) + h * q.stride(1) + m * q.stride(2);
        const bf16* mr = mp + b * mask.stride(0) + m * mask.stride(2);
        __m512 qv[16];
        for (int64_t c = 0; c < nv; ++c) qv[c] = load16(qr + 16 * c, 0xFFFF);
        float mx = -INFINITY;
        for (int64_t j = 0; j < L; ++j) {
          const bf16* kr = kb + j * k.stride(2);
          __m512 acc = _mm512_setzero_ps();
          for (int64_t c = 0; c < nv; ++c) {
            acc = _mm512_fmadd_ps(qv[c], load16(kr + 16 * c, 0xFFFF), acc);
          }
          const float sj = _mm512_reduce_add_ps(acc) * scale + f(mr[j * mask.stride(3)]);
          s[j] = sj;
          mx = sj > mx ? sj : mx;
        }
        float sum = 0.f;
        for (int64_t j = 0; j < L; j += 16) {
          const __mmask16 mk = L - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (L - j)) - 1);
          const __m512 x = _mm512_maskz_loadu_ps(mk, s.data() + j);
          const __mmask16 seen = _mm512_mask_cmp_ps_mask(mk, x, _mm512_set1_ps(-INFINITY), _CMP_GT_OQ);
          const __m512 p = _mm512_maskz_mov_ps(seen, exp512(_mm512_sub_ps(x, _mm512_set1_ps(mx))));
          _mm512_mask_storeu_ps(s.data() + j, mk, p);
          sum += _mm512_reduce_add_ps(p);
        }
        __m512 o[16];
        for (int64_t c = 0; c < nv; ++c) o[c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < L; ++j) {
          if (s[j] == 0.f) continue;
          const __m512 pj = _mm512_set1_ps(s[j]);
          const bf16* vr = vb + j * v.stride(2);
          for (int64_t c = 0; c < nv; ++c) o[c] = _mm512_fmadd_ps(pj, load16(vr + 16 * c, 0xFFFF), o[c]);
        }
        const __m512 inv = _mm512_set1_ps(1.f / sum);
        bf16* orow = op + ((b * Hk + h) * M + m) * D;
        for (int64_t c = 0; c < nv; ++c) _mm256_storeu_si256((__m256i*)(orow + 16 * c), to_bf16(_mm512_mul_ps(o[c], inv)));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(powersample_fast, CPU, m) {
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("silu_mul_bf16", &silu_mul_bf16);
  m.impl("rope_bf16", &rope_bf16);
  m.impl("attn_decode_bf16", &attn_decode_bf16);
}
