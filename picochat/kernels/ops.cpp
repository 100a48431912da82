// picochat's CPU kernels as PyTorch operators:
//   picochat::qlinear, picochat::dequantize   matrix products with 4/8-bit integer weights (the arithmetic,
//                                             and what it computes, is in qmatmul.h)
//   picochat::rms_norm, picochat::rope,       steps of the decoder (model.py's RMSNorm, apply_rope, and its
//   picochat::decode_attention                attention for the new tokens of each row), each one pass over memory
//                                             instead of several PyTorch operations: generating a token calls
//                                             each of them 30-60 times
//   picochat::isa                             which instruction set this build uses
// model.py holds the reference definitions; tests check these against them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "qmatmul.h"

namespace {
using namespace picochat;

struct AtenParallelFor {  // the kernel's loops split over PyTorch's intra-op threads (torch.set_num_threads)
  template <typename F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const { at::parallel_for(begin, end, grain, fn); }
};

Weights check_weights(const char* op, const at::Tensor& packed, int64_t bits, int64_t group, int64_t in_features,
                      int64_t out_features, bool has_min) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group == 16 || group == 32 || group == 64, op, ": group must be 16, 32 or 64, got ", group);
  TORCH_CHECK(in_features > 0 && out_features > 0, op, ": the matrix must have positive sizes");
  const Weights W = layout((const uint8_t*)packed.data_ptr(), bits, group, in_features, out_features, has_min);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
              packed.size(0) == W.blocks && packed.size(1) == W.block_bytes,
              op, ": packed weight must be uint8 [", W.blocks, ", ", W.block_bytes, "] for a ", out_features, "×",
              in_features, " matrix, got ", packed.sizes());
  return W;
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, int64_t bits, int64_t group, int64_t in_features,
                   int64_t out_features, bool has_min, int64_t act_bits) {
  TORCH_CHECK(act_bits == 8 || act_bits == 15, "picochat::qlinear: act_bits must be 8 or 15, got ", act_bits);
  const Weights W = check_weights("picochat::qlinear", packed, bits, group, in_features, out_features, has_min);
  TORCH_CHECK(x.size(-1) == in_features, "picochat::qlinear: x has ", x.size(-1), " features, the weight ", in_features);
  const at::Tensor x2 = x.reshape({-1, W.K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, W.N}, x2.options());
  if (M > 0) {
    const float* xp = x2.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    if (bits == 4 && act_bits == 15) qmatmul<4, true>(xp, M, W, yp, AtenParallelFor{});
    else if (bits == 4) qmatmul<4, false>(xp, M, W, yp, AtenParallelFor{});
    else if (act_bits == 15) qmatmul<8, true>(xp, M, W, yp, AtenParallelFor{});
    else qmatmul<8, false>(xp, M, W, yp, AtenParallelFor{});
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = W.N;
  return y.view(out_shape).to(x.scalar_type());
}

// W (or the given rows of it) in floating point, float32 or bfloat16: for products of many rows, where a
// dense matrix product (e.g. oneDNN's AMX bfloat16 kernels) beats the integer kernel, the weights are
// expanded just for that call; and for embedding lookups (a few rows).
at::Tensor dequantize(const at::Tensor& packed, int64_t bits, int64_t group, int64_t in_features, int64_t out_features,
                      bool has_min, at::ScalarType dtype, const std::optional<at::Tensor>& rows) {
  const Weights W = check_weights("picochat::dequantize", packed, bits, group, in_features, out_features, has_min);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "picochat::dequantize: dtype must be float32 or bfloat16");
  at::Tensor index;
  if (rows.has_value()) {
    index = rows->to(at::kLong).contiguous();
    TORCH_CHECK(index.dim() == 1, "picochat::dequantize: rows must be 1-D");
    if (index.numel()) {
      TORCH_CHECK(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < W.N,
                  "picochat::dequantize: a row is out of range [0, ", W.N, ")");
    }
  }
  const int64_t n_out = rows.has_value() ? index.numel() : W.N;
  const int64_t* idx = rows.has_value() ? index.data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({n_out, W.K}, packed.options().dtype(dtype));
  at::parallel_for(0, n_out, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(W.Kp);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = idx ? idx[i] : i;
      dequantize_row(W, n, row.data());
      if (dtype == at::kFloat) {
        std::memcpy(out.data_ptr<float>() + i * W.K, row.data(), W.K * sizeof(float));
      } else {
        at::BFloat16* o = out.data_ptr<at::BFloat16>() + i * W.K;
        for (int64_t k = 0; k < W.K; ++k) o[k] = at::BFloat16(row[k]);
      }
    }
  });
  return out;
}

// y = x / sqrt(mean(x²) + eps) · w over the last dimension (float32)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "picochat::rms_norm: float32 only");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "picochat::rms_norm: weight has ", weight.numel(), " values, x rows ", D);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t rows = xc.numel() / D;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      float ss = 0.f;
      for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
      const float inv = 1.f / std::sqrt(ss / (float)D + (float)eps);
      for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * wp[i];
    }
  });
  return y;
}

// Rotary positions, the "rotate half" layout: y = x · cos + rotate_half(x) · sin, rotate_half(x) = (−x₂, x₁)
// for the two halves of each head's vector. x (B, H, T, D), any strides; cos, sin broadcast as (B or 1, 1, T, D).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "picochat::rope: x must be float32 (B, H, T, D)");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  const at::Tensor c = cos.expand({B, 1, T, D}).contiguous(), s = sin.expand({B, 1, T, D}).contiguous();
  TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat, "picochat::rope: float32 tables");
  at::Tensor y = at::empty({B, H, T, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto st = x.strides();
  at::parallel_for(0, B * H * T, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * T), h = (i / T) % H, t = i % T;
      const float* xr = xp + b * st[0] + h * st[1] + t * st[2];
      const float* cr = cp + (b * T + t) * D;
      const float* sr = sp + (b * T + t) * D;
      float* yr = yp + i * D;
      for (int64_t j = 0; j < half; ++j) yr[j] = xr[j * st[3]] * cr[j] - xr[(j + half) * st[3]] * sr[j];
      for (int64_t j = half; j < D; ++j) yr[j] = xr[j * st[3]] * cr[j] + xr[(j - half) * st[3]] * sr[j];
    }
  });
  return y;
}

// exp(x) for x <= 0 (softmax weights), 16 / 8 lanes at a time: 2^n · p(r), x = n·ln2 + r (Cephes' polynomial)
#if defined(PICOCHAT_AVX512)
inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

void exp_shifted(float* p, int64_t n, float m) {  // p[j] = exp(p[j] - m), p[j] <= m
  int64_t j = 0;
#if defined(PICOCHAT_AVX512)
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(p + j, exp_neg(_mm512_sub_ps(_mm512_loadu_ps(p + j), _mm512_set1_ps(m))));
#endif
  for (; j < n; ++j) p[j] = std::exp(p[j] - m);
}

inline float dot(const float* a, const float* b, int64_t D) {  // 16 independent partial sums: vectorizes
  float part[16] = {0.f};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[d + l] * b[d + l];
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += part[l];
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// One new token per row: write its key and value at position pos[b] of the cache, then
// Attention(Q, K, V) = softmax(Q·Kᵀ / √d) · V over keys 0..pos[b] of that row (each row its own length).
// q (B, H, 1, D); k, v (B, KV, 1, D); caches (B, KV, L, D) with any row stride; H a multiple of KV.
// Attention for T new tokens per row (decoding: T = 1; checking drafted tokens: a few), appending their keys
// and values at positions pos[b] .. pos[b] + T − 1. Query t of row b sees keys 0 .. pos[b] + t, and is
// computed exactly as it would be alone (the same loops): a pass over drafted tokens gives decoding's numbers.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache,
                            at::Tensor v_cache, const at::Tensor& pos) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat, "picochat::decode_attention: q (B, H, T, D) float32");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k_cache.size(1), L = k_cache.size(2);
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.size(0) == B &&
              k_cache.size(3) == D && k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && H % KV == 0,
              "picochat::decode_attention: caches (B, KV, L, D) float32, contiguous rows");
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.size(1) == KV && k.size(2) == T &&
              k.size(3) == D && v.size(2) == T && k.stride(3) == 1 && v.stride(3) == 1,
              "picochat::decode_attention: k, v (B, KV, T, D) float32");
  const at::Tensor positions = pos.to(at::kLong).contiguous();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] + T <= L, "picochat::decode_attention: the KV cache is full");
  float* kcp = k_cache.data_ptr<float>();
  float* vcp = v_cache.data_ptr<float>();
  const int64_t ksb = k_cache.stride(0), ksh = k_cache.stride(1), ksl = k_cache.stride(2);
  const int64_t vsb = v_cache.stride(0), vsh = v_cache.stride(1), vsl = v_cache.stride(2);
  for (int64_t b = 0; b < B; ++b)  // append this step's keys and values
    for (int64_t g = 0; g < KV; ++g)
      for (int64_t t = 0; t < T; ++t) {
        std::memcpy(kcp + b * ksb + g * ksh + (pp[b] + t) * ksl,
                    k.data_ptr<float>() + b * k.stride(0) + g * k.stride(1) + t * k.stride(2), D * sizeof(float));
        std::memcpy(vcp + b * vsb + g * vsh + (pp[b] + t) * vsl,
                    v.data_ptr<float>() + b * v.stride(0) + g * v.stride(1) + t * v.stride(2), D * sizeof(float));
      }
  const at::Tensor qc = q.contiguous();
  at::Tensor y = at::empty({B, H, T, D}, q.options());
  const float* qp = qc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float scale = 1.f / std::sqrt((float)D);
  at::parallel_for(0, B * H * T, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> acc(D);
    std::vector<float> p(*std::max_element(pp, pp + B) + T);
    for (int64_t i = i0; i < i1; ++i) {  // i = (b · H + h) · T + t
      const int64_t b = i / (H * T), h = (i / T) % H, t = i % T, g = h / (H / KV), n = pp[b] + t + 1;
      const float* qr = qp + i * D;
      const float* kr = kcp + b * ksb + g * ksh;
      const float* vr = vcp + b * vsb + g * vsh;
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = dot(qr, kr + j * ksl, D) * scale;
        m = std::max(m, p[j]);
      }
      exp_shifted(p.data(), n, m);
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) total += p[j];
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float w = p[j], *vj = vr + j * vsl;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * vj[d];
      }
      for (int64_t d = 0; d < D; ++d) yp[i * D + d] = acc[d] / total;
    }
  });
  return y;
}

std::string isa() { return isa_name(); }

}  // namespace

TORCH_LIBRARY(picochat, m) {
  m.def("qlinear(Tensor x, Tensor packed, int bits, int group, int in_features, int out_features, bool has_min, "
        "int act_bits=15) -> Tensor");
  m.def("dequantize(Tensor packed, int bits, int group, int in_features, int out_features, bool has_min, "
        "ScalarType dtype, Tensor? rows=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos) -> Tensor");
  m.def("isa() -> str", &isa);  // which instruction set this build uses
}

TORCH_LIBRARY_IMPL(picochat, CPU, m) {
  m.impl("qlinear", qlinear);
  m.impl("dequantize", dequantize);
  m.impl("rms_norm", rms_norm);
  m.impl("rope", rope);
  m.impl("decode_attention", decode_attention);
}
