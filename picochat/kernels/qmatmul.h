// picochat's CPU kernel, the arithmetic (ops.cpp wraps it as PyTorch operators): matrix products with
// 4- and 8-bit integer weights, computed the way llama.cpp does.
//
//   y[m, n] = Σ_k x[m, k] · W[n, k]        with   W[n, k] = scale[n, g] · q[n, k] + min[n, g],   g = k / G
//
// The activations x are quantized on the fly to two 8-bit integers each, one scale per group of G values:
// x ≈ xs · (xq + xr / 254), xs = max|x| / 127, xq = round(x / xs), xr = round(254 · (x / xs − xq)). Each
// group's share of the dot product is then two dot products of small integers, done in integer registers:
//
//   y[m, n] ≈ Σ_g scale[n, g] · xs[m, g] / 254 · Σ_{k in g} (254 · xq[m, k] + xr[m, k]) · q[n, k]
//             + min[n, g] · Σ_{k in g} x[m, k]
//
// llama.cpp keeps only xq: that is half the integer work, and logits a few percent from float32's (enough
// to flip near-tied tokens). With xr the activations carry ~15 bits, and the products equal
// dequantize-then-multiply to float rounding, at no cost when decoding (bound by memory, not arithmetic).
//
// Layout (quant.py packs it). K is padded with zeros to a multiple of 64, N to a multiple of 16. A matrix
// is uint8 [N/16 blocks][block_bytes]; a block holds 16 rows, group after group, each group as
//   scale  float16 [16]          (one per row)
//   min    float16 [16]          (only if the matrix has mins)
//   codes  G/4 "B rows" of 64 bytes: B row j holds, for each row n, its codes of inputs g·G+4j .. g·G+4j+3
//          (bytes 4n .. 4n+3). 8-bit codes (−128..127) as they are; 4-bit codes (0..15) pair B rows 2t and
//          2t+1 in one 64 bytes (low and high nibbles).
// A B row is what an integer dot-product instruction wants: `vpdpbusd` of a B row with 4 activation bytes
// broadcast to every lane adds one input quadruple to 16 rows at once (no horizontal sums); the group's
// scales are then applied to 16 rows with one vector multiply-add. (G/4 B rows are also the B operand of an
// AMX tile multiply; an AMX path was measured, and with a scale per group of 32 it gained little.)
//
// Decoding one token reads every weight once, so it is bound by memory bandwidth: each thread takes a run
// of blocks, one sequential stream, prefetched ahead of the arithmetic.
//
// This file is built once per machine with -march=native (kernels/__init__.py), so the instruction set
// is chosen at compile time from what the CPU has: AVX-512 VNNI, else AVX-VNNI, else AVX2, else plain C++.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PICOCHAT_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PICOCHAT_AVX2 1
#endif

namespace picochat {

constexpr int CHUNK = 64;             // K is padded to a multiple of this
constexpr int R = 16;                 // rows per block
constexpr int PREFETCH_BYTES = 2048;  // how far ahead of the arithmetic the weight stream is fetched

inline const char* isa_name() {
#if defined(PICOCHAT_AVX512)
  return "avx512-vnni";
#elif defined(PICOCHAT_AVX2) && defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(PICOCHAT_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

inline float half_to_float(uint16_t h) {  // IEEE binary16 -> binary32, for any CPU
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = man;
      do { ++e; m <<= 1; } while (!(m & 0x400));
      bits = sign | (uint32_t)(112 - e) << 23 | (m & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | man << 13;
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline int32_t load4(const int8_t* p) {  // four activation bytes, to broadcast
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ------------------------------------------------------------------------------------------ the weights
struct Weights {
  const uint8_t* data;   // [blocks][block_bytes]
  bool has_min;
  int BITS;
  int64_t N, K, Kp, G, groups, blocks, group_bytes, block_bytes, codes_offset;
};

inline Weights layout(const uint8_t* data, int64_t bits, int64_t group, int64_t in_features, int64_t out_features,
                      bool has_min) {
  Weights W;
  W.data = data;
  W.has_min = has_min;
  W.BITS = (int)bits;
  W.N = out_features;
  W.K = in_features;
  W.Kp = (W.K + CHUNK - 1) / CHUNK * CHUNK;
  W.G = group;
  W.groups = W.Kp / group;
  W.blocks = (W.N + R - 1) / R;
  W.codes_offset = 32 * (has_min ? 2 : 1);
  W.group_bytes = W.codes_offset + group / 4 * 64 * bits / 8;
  W.block_bytes = W.groups * W.group_bytes;
  return W;
}

// ------------------------------------------------------------------------------------------ activations
// All tokens' activations as two planes of 8-bit integers xq, xr [M][Kp], and per token and group: the
// scale xs = max|x| / 127, the exact sum of x (for the min term) and xs · Σ (xq + xr / 254) (what flipped
// 8-bit codes add, to take off again).
struct Activations {
  std::vector<int8_t> xq, xr;
  std::vector<float> xs, xsum, xqsum;
  int64_t M, Kp, groups;
};

constexpr float RESIDUAL = 254.f;  // xr's scale: xs / 254

inline void quantize_row(const float* x, int64_t K, int64_t Kp, int64_t G, int8_t* xq, int8_t* xr, float* xs,
                         float* xsum, float* xqsum, bool resid = true) {
  for (int64_t g = 0; g < Kp / G; ++g) {
    const int64_t k0 = g * G, k1 = std::min(k0 + G, K);
    float amax = 0.f, total = 0.f;
    for (int64_t k = k0; k < k1; ++k) {
      amax = std::max(amax, std::fabs(x[k]));
      total += x[k];
    }
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int32_t sum_q = 0, sum_r = 0;
    int64_t k = k0;
#if defined(__AVX512F__)
    for (; k + 16 <= k1; k += 16) {  // rounds to nearest even, as the scalar tail does
      const __m512 f = _mm512_mul_ps(_mm512_loadu_ps(x + k), _mm512_set1_ps(inv));
      const __m512i q = _mm512_cvtps_epi32(f);
      const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(f, _mm512_cvtepi32_ps(q)),
                                                         _mm512_set1_ps(RESIDUAL)));
      _mm_storeu_si128((__m128i*)(xq + k), _mm512_cvtepi32_epi8(q));
      _mm_storeu_si128((__m128i*)(xr + k), _mm512_cvtepi32_epi8(r));
      sum_q += _mm512_reduce_add_epi32(q);
      sum_r += _mm512_reduce_add_epi32(r);
    }
#endif
    for (; k < k0 + G; ++k) {
      int32_t q = 0, r = 0;
      if (k < k1) {  // padding quantizes to 0
        const float f = x[k] * inv;
        q = (int32_t)std::nearbyint(f);
        r = (int32_t)std::nearbyint((f - (float)q) * RESIDUAL);
      }
      xq[k] = (int8_t)q;
      xr[k] = (int8_t)r;
      sum_q += q;
      sum_r += r;
    }
    xs[g] = d;
    xsum[g] = total;
    xqsum[g] = d * ((float)sum_q + (resid ? (float)sum_r / RESIDUAL : 0.f));
  }
}

// ------------------------------------------------------------------------------------------ one block, vectors
// out[t][r] (r < 16) = row r of the block times token m0 + t, for T tokens.
#if defined(PICOCHAT_AVX512)
inline __m512i combine(__m512i d, __m512i r) {  // 254 · d + r
  return _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(d, 8), _mm512_slli_epi32(d, 1)), r);
}

template <int BITS, int T, bool RESID>
inline void block_dot(const Weights& W, const uint8_t* block, const Activations& a, int64_t m0, float out[T][R]) {
  const __m512i nib = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < W.groups; ++g) {
    const uint8_t* p = block + g * W.group_bytes;
    for (int off = 0; off < 320; off += 64) _mm_prefetch((const char*)p + PREFETCH_BYTES + off, _MM_HINT_T0);
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    const __m512 sr = _mm512_mul_ps(s, _mm512_set1_ps(1.f / RESIDUAL));
    const __m512 mn = W.has_min ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 32))) : _mm512_setzero_ps();
    const uint8_t* c = p + W.codes_offset;
    __m512i d[T], e[T];  // Σ xq·q and Σ xr·q
    for (int t = 0; t < T; ++t) d[t] = e[t] = _mm512_setzero_si512();
    const int64_t x0 = m0 * a.Kp + g * W.G;
    if (BITS == 4) {
      for (int64_t pair = 0; pair < W.G / 8; ++pair) {
        const __m512i b = _mm512_loadu_si512((const void*)(c + pair * 64));
        const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
        for (int t = 0; t < T; ++t) {
          const int64_t x = x0 + t * a.Kp + pair * 8;
          d[t] = _mm512_dpbusd_epi32(d[t], lo, _mm512_set1_epi32(load4(a.xq.data() + x)));
          d[t] = _mm512_dpbusd_epi32(d[t], hi, _mm512_set1_epi32(load4(a.xq.data() + x + 4)));
          if (RESID) {
            e[t] = _mm512_dpbusd_epi32(e[t], lo, _mm512_set1_epi32(load4(a.xr.data() + x)));
            e[t] = _mm512_dpbusd_epi32(e[t], hi, _mm512_set1_epi32(load4(a.xr.data() + x + 4)));
          }
        }
      }
    } else {  // vpdpbusd wants unsigned × signed: flip the codes to q + 128 (taken off below)
      for (int64_t j = 0; j < W.G / 4; ++j) {
        const __m512i b = _mm512_xor_si512(_mm512_loadu_si512((const void*)(c + j * 64)), flip);
        for (int t = 0; t < T; ++t) {
          const int64_t x = x0 + t * a.Kp + j * 4;
          d[t] = _mm512_dpbusd_epi32(d[t], b, _mm512_set1_epi32(load4(a.xq.data() + x)));
          if (RESID) e[t] = _mm512_dpbusd_epi32(e[t], b, _mm512_set1_epi32(load4(a.xr.data() + x)));
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const int64_t i = (m0 + t) * a.groups + g;
      const __m512 dot = _mm512_cvtepi32_ps(RESID ? combine(d[t], e[t]) : d[t]);
      acc[t] = _mm512_fmadd_ps(dot, _mm512_mul_ps(RESID ? sr : s, _mm512_set1_ps(a.xs[i])), acc[t]);
      acc[t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.xsum[i]), acc[t]);
      if (BITS == 8) acc[t] = _mm512_fnmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(128.f)), _mm512_set1_ps(a.xqsum[i]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out[t], acc[t]);
}

#elif defined(PICOCHAT_AVX2)
// 32 unsigned codes · 32 signed activations, summed in 8 lanes of 4 products
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

template <int BITS, int T, bool RESID>
inline void block_dot(const Weights& W, const uint8_t* block, const Activations& a, int64_t m0, float out[T][R]) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256 acc[T][2];  // rows 0-7, 8-15
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < W.groups; ++g) {
    const uint8_t* p = block + g * W.group_bytes;
    for (int off = 0; off < 320; off += 64) _mm_prefetch((const char*)p + PREFETCH_BYTES + off, _MM_HINT_T0);
    __m256 s[2], mn[2];
    for (int h = 0; h < 2; ++h) {
      s[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 16 * h)));
      mn[h] = W.has_min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 32 + 16 * h))) : _mm256_setzero_ps();
    }
    const uint8_t* c = p + W.codes_offset;
    __m256i d[T][2], e[T][2];  // Σ xq·q and Σ xr·q
    for (int t = 0; t < T; ++t) d[t][0] = d[t][1] = e[t][0] = e[t][1] = _mm256_setzero_si256();
    const int64_t x0 = m0 * a.Kp + g * W.G;
    if (BITS == 4) {
      for (int64_t pair = 0; pair < W.G / 8; ++pair) {
        for (int h = 0; h < 2; ++h) {
          const __m256i b = _mm256_loadu_si256((const __m256i*)(c + pair * 64 + 32 * h));
          const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
          for (int t = 0; t < T; ++t) {
            const int64_t x = x0 + t * a.Kp + pair * 8;
            d[t][h] = _mm256_add_epi32(d[t][h], dot_u8s8(lo, _mm256_set1_epi32(load4(a.xq.data() + x))));
            d[t][h] = _mm256_add_epi32(d[t][h], dot_u8s8(hi, _mm256_set1_epi32(load4(a.xq.data() + x + 4))));
            if (RESID) {
              e[t][h] = _mm256_add_epi32(e[t][h], dot_u8s8(lo, _mm256_set1_epi32(load4(a.xr.data() + x))));
              e[t][h] = _mm256_add_epi32(e[t][h], dot_u8s8(hi, _mm256_set1_epi32(load4(a.xr.data() + x + 4))));
            }
          }
        }
      }
    } else {
      for (int64_t j = 0; j < W.G / 4; ++j) {
        for (int h = 0; h < 2; ++h) {
          const __m256i w = _mm256_loadu_si256((const __m256i*)(c + j * 64 + 32 * h));
#if defined(__AVXVNNI__)
          const __m256i u = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));  // q + 128, taken off below
#else
          const __m256i u = _mm256_sign_epi8(w, w);  // |q|; the sign moves onto x
#endif
          for (int t = 0; t < T; ++t) {
            const int64_t x = x0 + t * a.Kp + j * 4;
            __m256i xq = _mm256_set1_epi32(load4(a.xq.data() + x)), xr = _mm256_set1_epi32(load4(a.xr.data() + x));
#if !defined(__AVXVNNI__)
            xq = _mm256_sign_epi8(xq, w);
            xr = _mm256_sign_epi8(xr, w);
#endif
            d[t][h] = _mm256_add_epi32(d[t][h], dot_u8s8(u, xq));
            if (RESID) e[t][h] = _mm256_add_epi32(e[t][h], dot_u8s8(u, xr));
          }
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const int64_t i = (m0 + t) * a.groups + g;
      const __m256 xs = _mm256_set1_ps(RESID ? a.xs[i] / RESIDUAL : a.xs[i]), xsum = _mm256_set1_ps(a.xsum[i]);
      for (int h = 0; h < 2; ++h) {
        const __m256i both = RESID ? _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(d[t][h], 8),
                                                                       _mm256_slli_epi32(d[t][h], 1)), e[t][h])
                                   : d[t][h];
        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(both), _mm256_mul_ps(s[h], xs), acc[t][h]);
        acc[t][h] = _mm256_fmadd_ps(mn[h], xsum, acc[t][h]);
#if defined(__AVXVNNI__)
        if (BITS == 8)
          acc[t][h] = _mm256_fnmadd_ps(_mm256_mul_ps(s[h], _mm256_set1_ps(128.f)), _mm256_set1_ps(a.xqsum[i]), acc[t][h]);
#endif
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    _mm256_storeu_ps(out[t], acc[t][0]);
    _mm256_storeu_ps(out[t] + 8, acc[t][1]);
  }
}

#else  // plain C++: any CPU
template <int BITS, int T, bool RESID>
inline void block_dot(const Weights& W, const uint8_t* block, const Activations& a, int64_t m0, float out[T][R]) {
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) out[t][r] = 0.f;
  for (int64_t g = 0; g < W.groups; ++g) {
    const uint8_t* p = block + g * W.group_bytes;
    const uint16_t* s = (const uint16_t*)p;
    const uint16_t* mn = W.has_min ? (const uint16_t*)(p + 32) : nullptr;
    const uint8_t* c = p + W.codes_offset;
    for (int t = 0; t < T; ++t) {
      const int8_t* xq = a.xq.data() + (m0 + t) * a.Kp + g * W.G;
      const int8_t* xr = a.xr.data() + (m0 + t) * a.Kp + g * W.G;
      const int64_t i = (m0 + t) * a.groups + g;
      for (int r = 0; r < R; ++r) {
        int32_t d = 0;
        for (int64_t k = 0; k < W.G; ++k) {
          const int64_t j = k / 4, q4 = k % 4;
          const int32_t q = BITS == 4 ? (j % 2 == 0 ? c[j / 2 * 64 + r * 4 + q4] & 0x0F : c[j / 2 * 64 + r * 4 + q4] >> 4)
                                      : (int32_t)(int8_t)c[j * 64 + r * 4 + q4];
          d += q * (RESID ? 254 * xq[k] + xr[k] : xq[k]);
        }
        out[t][r] += (float)d * (half_to_float(s[r]) * (RESID ? a.xs[i] / RESIDUAL : a.xs[i])) +
                     (mn ? half_to_float(mn[r]) * a.xsum[i] : 0.f);
      }
    }
  }
}
#endif

// ------------------------------------------------------------------------------------------ the product
template <int BITS, int T, bool RESID>
inline void run_block(const Weights& W, int64_t b, const Activations& a, int64_t m0, float* y) {
  float out[T][R];
  block_dot<BITS, T, RESID>(W, W.data + b * W.block_bytes, a, m0, out);
  const int64_t n0 = b * R, valid = std::min<int64_t>(R, W.N - n0);  // the last block's padding rows dropped
  for (int t = 0; t < T; ++t) std::memcpy(y + (m0 + t) * W.N + n0, out[t], valid * sizeof(float));
}

// y[M, N] = x[M, K] · Wᵀ; parallel_for(begin, end, grain, fn) splits loops over threads. RESID: the
// activations as two 8-bit planes (~15 bits); false: one plane, as llama.cpp (half the integer work).
template <int BITS, bool RESID, typename ParallelFor>
void qmatmul(const float* x, int64_t M, const Weights& W, float* y, const ParallelFor& parallel_for) {
  Activations a;
  a.M = M;
  a.Kp = W.Kp;
  a.groups = W.groups;
  a.xq.resize(M * W.Kp);
  a.xr.resize(M * W.Kp);
  a.xs.resize(M * W.groups);
  a.xsum.resize(M * W.groups);
  a.xqsum.resize(M * W.groups);
  parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t o = m * W.groups;
      quantize_row(x + m * W.K, W.K, W.Kp, W.G, a.xq.data() + m * W.Kp, a.xr.data() + m * W.Kp, a.xs.data() + o,
                   a.xsum.data() + o, a.xqsum.data() + o, RESID);
    }
  });
  // each task takes a run of whole blocks: one sequential stream of weights
  parallel_for(0, W.blocks, 4, [&](int64_t b0, int64_t b1) {
#if defined(PICOCHAT_AVX512) || defined(PICOCHAT_AVX2)
    const char* start = (const char*)(W.data + b0 * W.block_bytes);
    for (int64_t off = 0; off < PREFETCH_BYTES; off += 64) _mm_prefetch(start + off, _MM_HINT_T0);
#endif
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) run_block<BITS, 4, RESID>(W, b, a, m, y);
      switch (M - m) {
        case 3: run_block<BITS, 3, RESID>(W, b, a, m, y); break;
        case 2: run_block<BITS, 2, RESID>(W, b, a, m, y); break;
        case 1: run_block<BITS, 1, RESID>(W, b, a, m, y); break;
        default: break;
      }
    }
  });
}

// One row of W in float32 (for dequantize): scale · q + min.
inline void dequantize_row(const Weights& W, int64_t n, float* out) {
  const uint8_t* block = W.data + (n / R) * W.block_bytes;
  const int64_t r = n % R;
  for (int64_t g = 0; g < W.groups; ++g) {
    const uint8_t* p = block + g * W.group_bytes;
    const float s = half_to_float(((const uint16_t*)p)[r]);
    const float mn = W.has_min ? half_to_float(((const uint16_t*)(p + 32))[r]) : 0.f;
    const uint8_t* c = p + W.codes_offset;
    float* o = out + g * W.G;
    for (int64_t k = 0; k < W.G; ++k) {
      const int64_t j = k / 4, i = k % 4;
      const float q = W.BITS == 4 ? (float)(j % 2 == 0 ? c[j / 2 * 64 + r * 4 + i] & 0x0F : c[j / 2 * 64 + r * 4 + i] >> 4)
                                  : (float)(int8_t)c[j * 64 + r * 4 + i];
      o[k] = s * q + mn;
    }
  }
}

}  // namespace picochat
