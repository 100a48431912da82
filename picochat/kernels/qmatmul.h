// picochat's CPU kernel, the arithmetic (ops.cpp wraps it as PyTorch operators): matrix products with
// 4- and 8-bit integer weights, computed the way llama.cpp does.
//
//   y[m, n] = Σ_k x[m, k] · W[n, k]        with   W[n, k] = scale[n, g] · q[n, k] + min[n, g],   g = k / G
//
// The activations x are quantized on the fly to 8-bit integers, one scale per group of G values
// (xs = max|x| / 127, xq = round(x / xs)), so that each group's share of the dot product is a dot
// product of small integers, done 64 at a time in integer registers (AVX-512 VNNI `vpdpbusd`,
// AVX-VNNI, or AVX2 `vpmaddubsw` + `vpmaddwd`):
//
//   y[m, n] ≈ Σ_g xs[g] · ( scale[n, g] · Σ_{k in g} xq[k] · q[n, k]  +  min[n, g] · Σ_{k in g} xq[k] )
//
// Layout (quant.py packs it). K is padded with zeros to a multiple of 64 (a "chunk"), N to a multiple of 4
// (a "tile" of rows). A matrix is uint8 [N/4, tile_bytes]: each tile of 4 rows is one run of bytes,
//   scale  float16 [4][K/G]          (G in 16, 32, 64)
//   min    float16 [4][K/G]          (only if the matrix has mins)
//   codes  [K/64 chunks][4 rows][32 or 64 bytes]
// 4-bit codes (0..15): the 32 bytes of a row's chunk hold weights 64c+j in their low nibbles and 64c+32+j
// in their high nibbles, j = 0..31 (llama.cpp's K-quant order). 8-bit codes (−128..127): 64 bytes in order.
//
// Decoding one token reads every weight once, so the kernel is bound by memory bandwidth: the tile-major
// layout makes each thread's share one sequential stream, which it prefetches ahead of the arithmetic.
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

namespace picochat {

constexpr int CHUNK = 64;             // weights per inner step
constexpr int R = 4;                  // weight rows per tile
constexpr int PREFETCH_BYTES = 2048;  // how far ahead of the arithmetic the weight stream is fetched

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PICOCHAT_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PICOCHAT_AVX2 1
#endif

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

// Does this build add 128 to 8-bit codes (so the min term must subtract 128 · scale · Σ xq)?
constexpr bool flips_q8() {
#if defined(PICOCHAT_AVX512) || (defined(PICOCHAT_AVX2) && defined(__AVXVNNI__))
  return true;
#else
  return false;
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

// ------------------------------------------------------------------------------------------ activations
// One token's activations as 8-bit integers: codes xq[Kp], and per group g the scale xs[g] and
// xz[g] = xs[g] · Σ xq (the activation side of the min term). lane_scale[c*16 + i] is the xs of the group
// that 32-bit lane i of chunk c belongs to (lane i covers weights 4i..4i+3 of the chunk).
struct QuantizedRow {
  std::vector<int8_t> xq;
  std::vector<float> xs, xz, lane_scale;
};

inline void quantize_row(const float* x, int64_t K, int64_t Kp, int64_t G, QuantizedRow& out) {
  const int64_t groups = Kp / G;
  out.xq.resize(Kp); out.xs.resize(groups); out.xz.resize(groups); out.lane_scale.resize(Kp / CHUNK * 16);
  int8_t* xq = out.xq.data();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * G, k1 = std::min(k0 + G, K);
    float amax = 0.f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    int64_t k = k0;
#if defined(__AVX512F__)
    for (; k + 16 <= k1; k += 16) {  // rounds to nearest even, as the scalar tail does
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), _mm512_set1_ps(inv)));
      _mm_storeu_si128((__m128i*)(xq + k), _mm512_cvtepi32_epi8(q));
      sum += _mm512_reduce_add_epi32(q);
    }
#endif
    for (; k < k0 + G; ++k) {
      const int32_t q = k < k1 ? (int32_t)std::nearbyint(x[k] * inv) : 0;  // padding quantizes to 0
      xq[k] = (int8_t)q;
      sum += q;
    }
    out.xs[g] = d;
    out.xz[g] = d * (float)sum;
  }
  const int64_t lanes_per_group = G / 4;
  for (int64_t c = 0; c < Kp / CHUNK; ++c)
    for (int i = 0; i < 16; ++i) out.lane_scale[c * 16 + i] = out.xs[c * (CHUNK / G) + i / lanes_per_group];
}

// ------------------------------------------------------------------------------------------ one tile
// The operands of one tile: its 4 weight rows (scales, mins, codes) and T tokens (codes, lane scales, xz).
template <int T>
struct Tile {
  const uint16_t* s;      // scale[r][g] at s[r * groups + g]
  const uint16_t* m;      // min, likewise; nullptr: no min
  const uint8_t* codes;   // chunk c of row r at codes + (c * R + r) * chunk_bytes
  const int8_t* xq[T];
  const float* ls[T];
  const float* xz[T];
  int64_t chunks, groups, G;
};

#if defined(PICOCHAT_AVX512) || defined(PICOCHAT_AVX2)
// The scales of the gpc = 64 / G groups of one chunk (1, 2 or 4 halves), as floats (exact-size loads).
inline __m128 chunk_scales(const uint16_t* p, int gpc) {
  __m128i v;
  if (gpc == 4) {
    v = _mm_loadl_epi64((const __m128i*)p);
  } else if (gpc == 2) {
    uint32_t u;
    std::memcpy(&u, p, 4);
    v = _mm_cvtsi32_si128((int)u);
  } else {
    v = _mm_cvtsi32_si128((int)*p);
  }
  return _mm_cvtph_ps(v);
}
#endif

#if defined(PICOCHAT_AVX512)
inline __m512i load_codes4(const uint8_t* p) {  // 32 bytes -> 64 codes 0..15 (low nibbles, then high)
  const __m256i b = _mm256_loadu_si256((const __m256i*)p);
  const __m256i m = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// out[r][t] = Σ over chunks of the scaled integer dot products + Σ_g adj[r][g] · xz[t][g], where
// adj = min (minus 128 · scale for flipped 8-bit codes).
template <int BITS, int T>
inline void tile_dot(const Tile<T>& a, float out[R][T]) {
  constexpr int CB = BITS == 4 ? 32 : 64;  // bytes of one row's chunk
  const int gpc = (int)(CHUNK / a.G);
  __m512i idx;  // 32-bit lane i -> its group within the chunk
  if (a.G == 16) idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  else if (a.G == 32) idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  else idx = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < a.chunks; ++c) {
    const uint8_t* chunk = a.codes + c * R * CB;
    _mm_prefetch((const char*)chunk + PREFETCH_BYTES, _MM_HINT_T0);
    if (CB * R > 64) _mm_prefetch((const char*)chunk + PREFETCH_BYTES + 64, _MM_HINT_T0);
    if (CB * R > 128) {
      _mm_prefetch((const char*)chunk + PREFETCH_BYTES + 128, _MM_HINT_T0);
      _mm_prefetch((const char*)chunk + PREFETCH_BYTES + 192, _MM_HINT_T0);
    }
    __m512i xv[T];
    __m512 xsv[T];
    for (int t = 0; t < T; ++t) {
      xv[t] = _mm512_loadu_si512((const void*)(a.xq[t] + c * CHUNK));
      xsv[t] = _mm512_loadu_ps(a.ls[t] + c * 16);
    }
    for (int r = 0; r < R; ++r) {
      // 8-bit codes are signed; vpdpbusd wants unsigned × signed, so flip them to q + 128 (the min term
      // subtracts the 128 · Σ xq this adds)
      const __m512i w = BITS == 4 ? load_codes4(chunk + r * CB)
                                  : _mm512_xor_si512(_mm512_loadu_si512((const void*)(chunk + r * CB)), flip);
      const __m512 s = _mm512_permutexvar_ps(
          idx, _mm512_castps128_ps512(chunk_scales(a.s + r * a.groups + c * gpc, gpc)));
      for (int t = 0; t < T; ++t) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv[t]);
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, xsv[t]), acc[r][t]);
      }
    }
  }
  for (int64_t g = 0; g < a.groups; g += 16) {  // the min term, 16 groups at a time
    const __mmask16 gm = (__mmask16)(a.groups - g >= 16 ? 0xFFFF : (1u << (a.groups - g)) - 1);
    __m512 zv[T];
    for (int t = 0; t < T; ++t) zv[t] = _mm512_maskz_loadu_ps(gm, a.xz[t] + g);
    for (int r = 0; r < R; ++r) {
      __m512 adj = a.m ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, a.m + r * a.groups + g)) : _mm512_setzero_ps();
      if (BITS == 8)
        adj = _mm512_fnmadd_ps(_mm512_set1_ps(128.f),
                               _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, a.s + r * a.groups + g)), adj);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(adj, zv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
}

#elif defined(PICOCHAT_AVX2)
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 unsigned codes · 32 signed activations, summed in 8 lanes of 4 products
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline __m256 load8_halves(const uint16_t* p, int n) {  // n <= 8 halves as floats, the rest 0
  if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(tmp, p, n * 2);
  return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)tmp));
}

template <int BITS, int T>
inline void tile_dot(const Tile<T>& a, float out[R][T]) {
  constexpr int CB = BITS == 4 ? 32 : 64;
  const int gpc = (int)(CHUNK / a.G);
  __m256i idx0, idx1;  // lane -> group within the chunk, for the chunk's two halves of 32 weights
  if (a.G == 16) { idx0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1); idx1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3); }
  else if (a.G == 32) { idx0 = _mm256_setzero_si256(); idx1 = _mm256_set1_epi32(1); }
  else { idx0 = idx1 = _mm256_setzero_si256(); }
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t c = 0; c < a.chunks; ++c) {
    const uint8_t* chunk = a.codes + c * R * CB;
    for (int off = 0; off < R * CB; off += 64) _mm_prefetch((const char*)chunk + PREFETCH_BYTES + off, _MM_HINT_T0);
    __m256i x0[T], x1[T];
    __m256 xs0[T], xs1[T];
    for (int t = 0; t < T; ++t) {
      x0[t] = _mm256_loadu_si256((const __m256i*)(a.xq[t] + c * CHUNK));
      x1[t] = _mm256_loadu_si256((const __m256i*)(a.xq[t] + c * CHUNK + 32));
      xs0[t] = _mm256_loadu_ps(a.ls[t] + c * 16);
      xs1[t] = _mm256_loadu_ps(a.ls[t] + c * 16 + 8);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sc = _mm256_castps128_ps256(chunk_scales(a.s + r * a.groups + c * gpc, gpc));
      const __m256 s0 = _mm256_permutevar8x32_ps(sc, idx0), s1 = _mm256_permutevar8x32_ps(sc, idx1);
      __m256i u0, u1, w0, w1;
      if (BITS == 4) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(chunk + r * CB));
        u0 = _mm256_and_si256(b, nib);
        u1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
      } else {
        w0 = _mm256_loadu_si256((const __m256i*)(chunk + r * CB));
        w1 = _mm256_loadu_si256((const __m256i*)(chunk + r * CB + 32));
#if defined(__AVXVNNI__)
        const __m256i flip = _mm256_set1_epi8((char)0x80);  // q + 128, corrected by the min term
        u0 = _mm256_xor_si256(w0, flip);
        u1 = _mm256_xor_si256(w1, flip);
#else
        u0 = _mm256_sign_epi8(w0, w0);  // |q|; the sign moves onto x
        u1 = _mm256_sign_epi8(w1, w1);
#endif
      }
      for (int t = 0; t < T; ++t) {
        __m256i a0 = x0[t], a1 = x1[t];
#if !defined(__AVXVNNI__)
        if (BITS == 8) { a0 = _mm256_sign_epi8(a0, w0); a1 = _mm256_sign_epi8(a1, w1); }
#endif
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u0, a0)), _mm256_mul_ps(s0, xs0[t]), acc[r][t]);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u1, a1)), _mm256_mul_ps(s1, xs1[t]), acc[r][t]);
      }
    }
  }
  constexpr bool flip = BITS == 8 && flips_q8();
  for (int64_t g = 0; g < a.groups; g += 8) {  // the min term, 8 groups at a time
    const int n = (int)std::min<int64_t>(8, a.groups - g);
    const __m256i gm = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 zv[T];
    for (int t = 0; t < T; ++t) zv[t] = _mm256_maskload_ps(a.xz[t] + g, gm);
    for (int r = 0; r < R; ++r) {
      __m256 adj = a.m ? load8_halves(a.m + r * a.groups + g, n) : _mm256_setzero_ps();
      if (flip) adj = _mm256_fnmadd_ps(_mm256_set1_ps(128.f), load8_halves(a.s + r * a.groups + g, n), adj);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(adj, zv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r][t] = hsum256(acc[r][t]);
}

#else  // plain C++: any CPU
template <int BITS, int T>
inline void tile_dot(const Tile<T>& a, float out[R][T]) {
  constexpr int CB = BITS == 4 ? 32 : 64;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float acc = 0.f;
      for (int64_t c = 0; c < a.chunks; ++c) {
        const uint8_t* w = a.codes + (c * R + r) * CB;
        for (int64_t g0 = 0; g0 < CHUNK; g0 += a.G) {
          int32_t d = 0;
          for (int64_t j = g0; j < g0 + a.G; ++j) {
            const int32_t q = BITS == 4 ? (j < 32 ? (w[j] & 0x0F) : (w[j - 32] >> 4)) : (int32_t)(int8_t)w[j];
            d += q * a.xq[t][c * CHUNK + j];
          }
          acc += (float)d * half_to_float(a.s[r * a.groups + (c * CHUNK + g0) / a.G]) * a.ls[t][c * 16 + g0 / 4];
        }
      }
      if (a.m)
        for (int64_t g = 0; g < a.groups; ++g) acc += half_to_float(a.m[r * a.groups + g]) * a.xz[t][g];
      out[r][t] = acc;
    }
}
#endif

// ------------------------------------------------------------------------------------------ the operator
struct Weights {
  const uint8_t* data;   // [tiles][tile_bytes]
  bool has_min;
  int64_t N, K, Kp, G, chunks, groups, tiles, tile_bytes, min_offset, codes_offset;
};

inline Weights layout(const uint8_t* data, int64_t bits, int64_t group, int64_t in_features, int64_t out_features,
                      bool has_min) {
  Weights W;
  W.data = data;
  W.has_min = has_min;
  W.N = out_features;
  W.K = in_features;
  W.Kp = (W.K + CHUNK - 1) / CHUNK * CHUNK;
  W.G = group;
  W.chunks = W.Kp / CHUNK;
  W.groups = W.Kp / group;
  W.tiles = (W.N + R - 1) / R;
  W.min_offset = R * W.groups * 2;
  W.codes_offset = W.min_offset * (has_min ? 2 : 1);
  W.tile_bytes = W.codes_offset + W.chunks * R * (bits == 4 ? 32 : 64);
  return W;
}

template <int BITS, int T>
void run_tile(const Weights& W, int64_t tile, const QuantizedRow* rows, int64_t m, float* y) {
  const uint8_t* base = W.data + tile * W.tile_bytes;
  Tile<T> a;
  a.s = (const uint16_t*)base;
  a.m = W.has_min ? (const uint16_t*)(base + W.min_offset) : nullptr;
  a.codes = base + W.codes_offset;
  for (int t = 0; t < T; ++t) {
    a.xq[t] = rows[m + t].xq.data(); a.ls[t] = rows[m + t].lane_scale.data(); a.xz[t] = rows[m + t].xz.data();
  }
  a.chunks = W.chunks; a.groups = W.groups; a.G = W.G;
  float out[R][T];
  tile_dot<BITS, T>(a, out);
  const int64_t n = tile * R, valid = std::min<int64_t>(R, W.N - n);  // the last tile's padding rows are dropped
  for (int r = 0; r < valid; ++r)
    for (int t = 0; t < T; ++t) y[(m + t) * W.N + n + r] = out[r][t];
}

// y[M, N] = x[M, K] · Wᵀ; parallel_for(begin, end, grain, fn) splits loops over threads.
template <int BITS, typename ParallelFor>
void qmatmul(const float* x, int64_t M, const Weights& W, float* y, const ParallelFor& parallel_for) {
  std::vector<QuantizedRow> rows(M);
  parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(x + m * W.K, W.K, W.Kp, W.G, rows[m]);
  });
  // each task takes a run of whole tiles: one sequential stream of weights
  parallel_for(0, W.tiles, 8, [&](int64_t b0, int64_t b1) {
#if defined(PICOCHAT_AVX512) || defined(PICOCHAT_AVX2)
    const char* start = (const char*)(W.data + b0 * W.tile_bytes);
    for (int64_t off = 0; off < PREFETCH_BYTES; off += 64) _mm_prefetch(start + off, _MM_HINT_T0);
#endif
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) run_tile<BITS, 4>(W, b, rows.data(), m, y);
      switch (M - m) {
        case 3: run_tile<BITS, 3>(W, b, rows.data(), m, y); break;
        case 2: run_tile<BITS, 2>(W, b, rows.data(), m, y); break;
        case 1: run_tile<BITS, 1>(W, b, rows.data(), m, y); break;
        default: break;
      }
    }
  });
}

// One row of W in float32 (for dequantize): scale · q + min.
template <int BITS>
void dequantize_row(const Weights& W, int64_t n, float* out) {
  constexpr int CB = BITS == 4 ? 32 : 64;
  const uint8_t* base = W.data + (n / R) * W.tile_bytes;
  const int r = (int)(n % R);
  const uint16_t* s = (const uint16_t*)base + r * W.groups;
  const uint16_t* m = W.has_min ? (const uint16_t*)(base + W.min_offset) + r * W.groups : nullptr;
  float codes[CHUNK];
  for (int64_t c = 0; c < W.chunks; ++c) {
    const uint8_t* w = base + W.codes_offset + (c * R + r) * CB;
    if (BITS == 4) {
      for (int j = 0; j < 32; ++j) codes[j] = (float)(w[j] & 0x0F);
      for (int j = 0; j < 32; ++j) codes[32 + j] = (float)(w[j] >> 4);
    } else {
      for (int j = 0; j < CHUNK; ++j) codes[j] = (float)(int8_t)w[j];
    }
    for (int64_t j0 = 0; j0 < CHUNK; j0 += W.G) {
      const int64_t g = (c * CHUNK + j0) / W.G;
      const float sc = half_to_float(s[g]), mn = m ? half_to_float(m[g]) : 0.f;
      float* o = out + c * CHUNK + j0;
      for (int64_t j = 0; j < W.G; ++j) o[j] = sc * codes[j0 + j] + mn;
    }
  }
}

}  // namespace picochat
