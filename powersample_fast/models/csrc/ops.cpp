// The schemas of the CPU kernels' torch ops (torch.ops.powersample_fast.*); each source registers the
// CPU implementations it holds (gemv_bf16.cpp and fused_bf16.cpp where the CPU has AVX512-BF16,
// fused_f32.cpp where it has AVX2 + FMA). models/cpu_kernels.py builds the library from them.
#include <torch/library.h>

TORCH_LIBRARY(powersample_fast, m) {
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul_bf16(Tensor gu) -> Tensor");
  m.def("attn_decode_bf16(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("rope_bf16(Tensor qkv, Tensor cos, Tensor sin, int n_heads, int head_dim, int rotary_dim) -> Tensor");
  m.def("rms_norm_f32(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul_f32(Tensor gu) -> Tensor");
  m.def("attn_decode_f32(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("rope_f32(Tensor qkv, Tensor cos, Tensor sin, int n_heads, int head_dim, int rotary_dim) -> Tensor");
}
