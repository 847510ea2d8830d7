// Eight-lane float vectors for the CPU kernels: AVX2+FMA+F16C where the build
// enables them (the default on x86-64), portable loops elsewhere. The code
// loads turn packed storage codes into floats before scaling; the portable
// versions call the format header directly, the AVX2 versions are the same
// math in intrinsics (tests cover both through the op results).
#pragma once
#include "kvcomp/format.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KVCOMP_AVX2 1
#include <immintrin.h>
#endif

namespace kvcomp {
namespace simd {

// An NF kind's levels by code (format.h nf_level), for table lookups.
template <Kind K>
struct LevelTable {
  alignas(32) float v[16];
  constexpr LevelTable() : v{} {
    for (int i = 0; i <= max_code(K); ++i) v[i] = nf_level(K, (uint32_t)i);
  }
};
template <Kind K>
inline constexpr LevelTable<K> kLevels{};

#if KVCOMP_AVX2
struct vf8 {
  __m256 v;
};
inline vf8 zero8() { return {_mm256_setzero_ps()}; }
inline vf8 set8(float x) { return {_mm256_set1_ps(x)}; }
inline vf8 load8(const float* p) { return {_mm256_loadu_ps(p)}; }
// A load the compiler keeps in a register instead of folding it into every
// FMA that uses it (folding doubles the load traffic of the QK loop).
inline vf8 load8_reg(const float* p) {
  __m256 v = _mm256_loadu_ps(p);
  asm("" : "+x"(v));
  return {v};
}
inline void store8(float* p, vf8 a) { _mm256_storeu_ps(p, a.v); }
inline vf8 fma8(vf8 a, vf8 b, vf8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline vf8 mul8(vf8 a, vf8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline vf8 add8(vf8 a, vf8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline vf8 max8(vf8 a, vf8 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline vf8 sub8(vf8 a, vf8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline float hmax8(vf8 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// {hsum(a), hsum(b), hsum(c), hsum(d)} stored to out[0..3].
inline void hsum4(vf8 a, vf8 b, vf8 c, vf8 d, float* out) {
  __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a.v, b.v), _mm256_hadd_ps(c.v, d.v));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}
inline float hsum8(vf8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// exp(x) for x <= 0 (softmax arguments), relative error ~2e-7; x < -87 gives 0.
inline vf8 exp8(vf8 a) {
  __m256 x = _mm256_max_ps(a.v, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return {_mm256_and_ps(res, _mm256_cmp_ps(a.v, _mm256_set1_ps(-87.0f), _CMP_GT_OQ))};
}

// Bit 2 of eight 3-bit codes from their byte (channel e at bit e), as 4 or 0.
inline __m256i high_bits8(uint8_t byte) {
  __m256i x = _mm256_srlv_epi32(_mm256_set1_epi32(byte), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(1)), 2);
}
// Unsigned codes as the floats they stand for: the integer itself, or an NF
// kind's level (format.h nf_level) by table lookup.
template <Kind K>
inline vf8 values8(__m256i c) {
  if constexpr (is_nf(K)) {
    __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(kLevels<K>.v), c);
    if constexpr (kind_bits(K) < 4) return {lo};
    __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(kLevels<K>.v + 8), c);
    __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));  // bit 3 as the sign bit
    return {_mm256_blendv_ps(lo, hi, upper)};
  } else {
    return {_mm256_cvtepi32_ps(c)};
  }
}

// NF3 levels of two runs of a 3-bit chunk (format.h packing): `low` holds
// the chunk's 8 low-bit bytes (zero-extended), shifted so that run a's two
// bits are lowest and run b's two bits above them; `high` the two bytes of
// their bit 2 (run a's in the low byte). The level tables repeat every 4
// entries, so a permute needs no mask (it reads index bits 0-2; bit 2 is
// the next crumb's, and the copy makes it irrelevant), and bit 2 of each
// channel, shifted to the sign, picks the upper half of the levels.
template <Kind K>
struct NF3Halves {
  alignas(32) float lo[8], hi[8];
  constexpr NF3Halves() : lo{}, hi{} {
    for (int i = 0; i < 8; ++i) lo[i] = nf_level(K, (uint32_t)(i % 4)), hi[i] = nf_level(K, (uint32_t)(4 + i % 4));
  }
};
template <Kind K>
inline constexpr NF3Halves<K> kNF3Halves{};
template <Kind K>
inline void nf3_pair8(__m256i low, uint32_t high, vf8& a, vf8& b) {
  const __m256 lo = _mm256_load_ps(kNF3Halves<K>.lo), hi = _mm256_load_ps(kNF3Halves<K>.hi);
  const __m256i h = _mm256_set1_epi32((int)high);
  const __m256i sa = _mm256_sllv_epi32(h, _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24));
  const __m256i sb = _mm256_sllv_epi32(h, _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16));
  const __m256i lb = _mm256_srli_epi32(low, 2);
  a = {_mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, low), _mm256_permutevar8x32_ps(hi, low), _mm256_castsi256_ps(sa))};
  b = {_mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, lb), _mm256_permutevar8x32_ps(hi, lb), _mm256_castsi256_ps(sb))};
}

// Codes of 8 consecutive channels (sub-run `sub` of the row, see format.h
// packing) as floats, before the scale. fp8 e4m3 comes out 2^-8 too small:
// kCodeScale below folds the 256 back into the scale.
template <Kind K>
inline vf8 codes8(const uint8_t* row, int sub) {
  if constexpr (K == Kind::FP32) {
    return {_mm256_loadu_ps((const float*)row + 8 * sub)};
  } else if constexpr (K == Kind::FP16) {
    return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row + 16 * sub)))};
  } else if constexpr (K == Kind::BF16) {
    __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(row + 16 * sub)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(x, 16))};
  } else if constexpr (K == Kind::FP8_E4M3 || K == Kind::FP8_E5M2) {
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(row + 8 * sub)));
    __m128i h;
    if constexpr (K == Kind::FP8_E5M2) {
      h = _mm_slli_epi16(b, 8);
    } else {
      h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                       _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
    }
    return {_mm256_cvtph_ps(h)};
  } else if constexpr (K == Kind::INT8) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + 8 * sub))))};
  } else if constexpr (K == Kind::INT8C) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + 8 * sub))))};
  } else {
    // Sub-byte: chunk = sub / 4; int4 runs: bytes (sub%2)*8.., shift 4*((sub/2)%2);
    // 2- and 3-bit runs: bytes 0..7 of the chunk, shift 2*(sub%4), and for
    // 3 bits bit 2 in byte 8 + sub%4.
    constexpr int b = kind_bits(K);
    const uint8_t* chunk = row + (sub / 4) * (4 * b);
    int j = sub % 4;
    const uint8_t* src = b == 4 ? chunk + (j % 2) * 8 : chunk;
    int shift = b == 4 ? 4 * (j / 2) : 2 * j;
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)src));
    x = _mm256_and_si256(_mm256_srl_epi32(x, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(b == 3 ? 3 : max_code(K)));
    if constexpr (b == 3) x = _mm256_or_si256(x, high_bits8(chunk[8 + j]));
    return values8<K>(x);
  }
}
template <Kind K>
constexpr float kCodeScale = K == Kind::FP8_E4M3 ? 256.0f : 1.0f;

// Eight bytes zero-extended to 32-bit lanes, and a bit field of them as
// floats: (x >> SHIFT) & MASK (MASK 0: no mask). Lets one load of packed
// sub-byte codes feed several channel runs.
struct vi8 {
  __m256i v;
};
inline vi8 bytes8(const uint8_t* p) { return {_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))}; }
template <int SHIFT, int MASK>
inline vi8 ifield8(vi8 x) {
  __m256i y = SHIFT ? _mm256_srli_epi32(x.v, SHIFT) : x.v;
  if (MASK) y = _mm256_and_si256(y, _mm256_set1_epi32(MASK));
  return {y};
}
inline vi8 or8(vi8 a, vi8 b) { return {_mm256_or_si256(a.v, b.v)}; }
inline vi8 high8(uint8_t byte) { return {high_bits8(byte)}; }
template <Kind K>
inline vf8 value8(vi8 c) { return values8<K>(c.v); }

// 16-bit metadata (IEEE half) as floats: one, and eight in a row.
inline float half1(const uint8_t* p) { return _cvtsh_ss((unsigned short)(p[0] | p[1] << 8)); }
inline vf8 halves8(const uint8_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))}; }

#else  // portable

struct vf8 {
  float v[8];
};
inline vf8 set8(float x) { vf8 r; for (int i = 0; i < 8; ++i) r.v[i] = x; return r; }
inline vf8 zero8() { return set8(0.0f); }
inline vf8 load8(const float* p) { vf8 r; for (int i = 0; i < 8; ++i) r.v[i] = p[i]; return r; }
inline vf8 load8_reg(const float* p) { return load8(p); }
inline void store8(float* p, vf8 a) { for (int i = 0; i < 8; ++i) p[i] = a.v[i]; }
inline vf8 fma8(vf8 a, vf8 b, vf8 c) { vf8 r; for (int i = 0; i < 8; ++i) r.v[i] = fmaf(a.v[i], b.v[i], c.v[i]); return r; }
inline vf8 mul8(vf8 a, vf8 b) { vf8 r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i]; return r; }
inline vf8 add8(vf8 a, vf8 b) { vf8 r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
inline vf8 max8(vf8 a, vf8 b) { vf8 r; for (int i = 0; i < 8; ++i) r.v[i] = fmaxf(a.v[i], b.v[i]); return r; }
inline vf8 sub8(vf8 a, vf8 b) { vf8 r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] - b.v[i]; return r; }
inline float hmax8(vf8 a) { float m = a.v[0]; for (int i = 1; i < 8; ++i) m = fmaxf(m, a.v[i]); return m; }
inline float hsum8(vf8 a) { float s = 0; for (int i = 0; i < 8; ++i) s += a.v[i]; return s; }
inline void hsum4(vf8 a, vf8 b, vf8 c, vf8 d, float* out) {
  out[0] = hsum8(a), out[1] = hsum8(b), out[2] = hsum8(c), out[3] = hsum8(d);
}
inline vf8 exp8(vf8 a) { vf8 r; for (int i = 0; i < 8; ++i) r.v[i] = expf(a.v[i]); return r; }
template <Kind K>
inline vf8 codes8(const uint8_t* row, int sub) {
  vf8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = code_value(K, load_code(K, row, 8 * sub + i));
  return r;
}
template <Kind K>
constexpr float kCodeScale = 1.0f;
struct vi8 {
  int32_t v[8];
};
inline vi8 bytes8(const uint8_t* p) { vi8 r; for (int i = 0; i < 8; ++i) r.v[i] = p[i]; return r; }
template <int SHIFT, int MASK>
inline vi8 ifield8(vi8 x) {
  vi8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = MASK ? (x.v[i] >> SHIFT) & MASK : x.v[i] >> SHIFT;
  return r;
}
inline vi8 or8(vi8 a, vi8 b) { vi8 r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] | b.v[i]; return r; }
inline vi8 high8(uint8_t byte) { vi8 r; for (int i = 0; i < 8; ++i) r.v[i] = (byte >> i & 1) << 2; return r; }
template <Kind K>
inline vf8 value8(vi8 c) {
  vf8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = code_value(K, (uint32_t)c.v[i]);
  return r;
}
inline float half1(const uint8_t* p) { return half_to_float(load_half(p)); }
inline vf8 halves8(const uint8_t* p) { vf8 r; for (int i = 0; i < 8; ++i) r.v[i] = half1(p + 2 * i); return r; }
#endif

}  // namespace simd
}  // namespace kvcomp
