// NF kinds on the CPU: a group's scale (format.h nf_meta) and its codes
// (format.h nf_code) in one pass. The AVX2 version is the same math, bit for
// bit, eight octets at a time: lane o of vector e holds x[8o + e], so each
// lane's FMA chain over e is nf_meta's left-to-right octet sum, and the
// candidate that wins leaves its codes behind (no second scan). The scalar
// scan over 4 scale candidates was 2/3 of a 4k-token prefill's quantizing.
#pragma once
#include "cpu/simd.h"

namespace kvcomp {

#if KVCOMP_AVX2
// Midpoints between neighbouring levels (max_code of them).
template <Kind K>
struct NFMidpoints {
  float v[16];
  constexpr NFMidpoints() : v{} {
    for (int i = 0; i < max_code(K); ++i) v[i] = nf_midpoint(K, i);
  }
};
template <Kind K>
inline constexpr NFMidpoints<K> kNFMidpoints{};

// Codes of y (the midpoints at or below each lane: they ascend, so the count
// is nf_code's scan) and their levels (simd.h's table lookup).
template <Kind K>
inline __m256i nf_codes8(__m256 y, __m256& level) {
  __m256i c = _mm256_setzero_si256();
  for (int i = 0; i < max_code(K); ++i)  // a mask is -1 where true
    c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(y, _mm256_set1_ps(kNFMidpoints<K>.v[i]), _CMP_GE_OQ)));
  level = simd::values8<K>(c).v;
  return c;
}

template <Kind K>
QMeta nf_encode_group(const float* x, int n, uint8_t* codes) {
  constexpr int kBatches = kMaxHeadDim / 64;  // of 8 octets
  const int octets = n / 8, batches = (octets + 7) / 8;
  alignas(32) float xt[kBatches][8][8];  // [batch][e][lane = octet]; lanes past the group hold 0
  alignas(32) int32_t ct[2][kBatches][8][8];  // codes of the best and of the current candidate
  alignas(32) float s[kBatches * 8];
  for (int b = 0; b < batches; ++b)
    for (int e = 0; e < 8; ++e)
      for (int l = 0; l < 8; ++l) xt[b][e][l] = 8 * b + l < octets ? x[8 * (8 * b + l) + e] : 0.0f;
  for (int b = 0; b < batches; ++b) {
    __m256 a = _mm256_setzero_ps();
    for (int e = 0; e < 8; ++e) {
      const __m256 v = _mm256_load_ps(xt[b][e]);
      a = _mm256_fmadd_ps(v, v, a);
    }
    _mm256_store_ps(s + 8 * b, a);
  }
  const float rms = sqrtf(octet_tree(s, octets) / (float)n);
  QMeta best{0, 0};
  float best_err = INFINITY;
  int best_slot = 0;
  for (int i = 0; i < kNFScales; ++i) {
    const uint16_t h = half_up(min_f(rms * nf_scale_factor(i), kHalfMax));
    const float sc = half_to_float(h);
    if (sc == 0.0f) {  // an all-zero group: scale 0, and nf_code's code of 0
      memset(codes, (int)nf_code(K, 0.0f), n);
      return QMeta{0, 0};
    }
    const int slot = 1 - best_slot;
    const __m256 vs = _mm256_set1_ps(sc), neg = _mm256_set1_ps(-sc);
    for (int b = 0; b < batches; ++b) {
      __m256 a = _mm256_setzero_ps();
      for (int e = 0; e < 8; ++e) {
        const __m256 v = _mm256_load_ps(xt[b][e]);
        __m256 level;
        _mm256_store_si256((__m256i*)ct[slot][b][e], nf_codes8<K>(_mm256_div_ps(v, vs), level));
        const __m256 d = _mm256_fmadd_ps(neg, level, v);
        a = _mm256_fmadd_ps(d, d, a);
      }
      _mm256_store_ps(s + 8 * b, a);
    }
    const float err = octet_tree(s, octets);
    if (err < best_err) best_err = err, best = QMeta{h, 0}, best_slot = slot;
  }
  for (int o = 0; o < octets; ++o)
    for (int e = 0; e < 8; ++e) codes[8 * o + e] = (uint8_t)ct[best_slot][o / 8][e][o % 8];
  return best;
}
#else
template <Kind K>
QMeta nf_encode_group(const float* x, int n, uint8_t* codes) {
  const QMeta m = nf_meta(K, x, n);
  const QParams p = params_of(K, m);
  for (int c = 0; c < n; ++c) codes[c] = (uint8_t)encode(K, x[c], p);
  return m;
}
#endif

}  // namespace kvcomp
