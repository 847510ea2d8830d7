// The single source of truth for every KV storage format: element encodings,
// scale computation, rounding, bit packing, the Hadamard rotation and the
// tile byte layout. Used by the CPU kernels and the CUDA kernels alike (no
// torch, no STL). docs/format.md describes the same layout in prose; keep
// them in step.
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#define KVC_HD __host__ __device__ __forceinline__
#define KVC_HD_INLINE KVC_HD
#define KVC_UNROLL _Pragma("unroll")
#else
#define KVC_HD inline
// Inlined into kernels templated on the kind, so that the kind's constants fold.
#define KVC_HD_INLINE inline __attribute__((always_inline))
#define KVC_UNROLL _Pragma("GCC unroll 16")
#endif

namespace kvcomp {

constexpr int kLayoutVersion = 2;
constexpr int kChunk = 32;   // sub-byte codes are packed in chunks of 32 channels
constexpr int kAlign = 16;   // every region of a tile starts on 16 bytes
constexpr int kMaxHeadDim = 512;
constexpr float kHalfMax = 65504.0f;  // largest finite fp16: scales, zeros, quantized values

enum class Kind : uint8_t {
  FP16, BF16, FP8_E4M3, FP8_E5M2, INT8, INT4, INT2, INT8C, INT4C, INT2C, FP32,
  INT3,                // asymmetric, like int4/int2
  INT4S, INT3S, INT2S, // ":s": symmetric uniform levels (code - 2^(b-1)) * scale (llama.cpp q4_0)
  NF4, NF3, NF2,       // Lloyd-Max levels of a standard normal, times a per-group scale
};

// One side (K or V) of a format spec.
struct ElemFormat {
  Kind kind;
  int group;     // channels per scale (and zero) of per-token quantized kinds; 0: the whole row
  bool rotated;  // ":h": a randomized Hadamard transform of each token before quantization
};

KVC_HD constexpr int kind_bits(Kind k) {
  switch (k) {
    case Kind::FP32: return 32;
    case Kind::FP16: case Kind::BF16: return 16;
    case Kind::INT4: case Kind::INT4C: case Kind::INT4S: case Kind::NF4: return 4;
    case Kind::INT3: case Kind::INT3S: case Kind::NF3: return 3;
    case Kind::INT2: case Kind::INT2C: case Kind::INT2S: case Kind::NF2: return 2;
    default: return 8;
  }
}
// Stored as is: the hot tier's formats (fp32 keeps fp32 models lossless).
KVC_HD constexpr bool is_raw(Kind k) {
  return k == Kind::FP16 || k == Kind::BF16 || k == Kind::FP32;
}
KVC_HD constexpr bool is_fp8(Kind k) { return k == Kind::FP8_E4M3 || k == Kind::FP8_E5M2; }
KVC_HD constexpr bool is_per_channel(Kind k) {
  return k == Kind::INT8C || k == Kind::INT4C || k == Kind::INT2C;
}
KVC_HD constexpr bool is_nf(Kind k) { return k == Kind::NF4 || k == Kind::NF3 || k == Kind::NF2; }
KVC_HD constexpr bool is_int_sym(Kind k) {
  return k == Kind::INT4S || k == Kind::INT3S || k == Kind::INT2S;
}
// Asymmetric per-token kinds: a scale and a zero per group.
KVC_HD constexpr bool is_asym_token(Kind k) {
  return k == Kind::INT4 || k == Kind::INT3 || k == Kind::INT2;
}
// Quantized per token: one scale (and zero) per group of a token's channels.
KVC_HD constexpr bool is_token_quant(Kind k) { return !is_raw(k) && !is_per_channel(k); }
// fp8 and int8: a symmetric scale from the absolute maximum.
KVC_HD constexpr bool is_absmax(Kind k) { return is_fp8(k) || k == Kind::INT8; }
// Codes are unsigned integers decoded as fma(code, scale, zero).
KVC_HD constexpr bool is_affine(Kind k) {
  return is_asym_token(k) || is_int_sym(k) || is_per_channel(k);
}
KVC_HD constexpr bool has_zero(Kind k) { return is_asym_token(k) || is_per_channel(k); }
KVC_HD constexpr int max_code(Kind k) { return (1 << kind_bits(k)) - 1; }
// 16-bit metadata words per group: scale, then zero for the asymmetric kinds.
KVC_HD constexpr int meta_halves(Kind k) { return has_zero(k) ? 2 : 1; }

// Channels per scale, and scales per row, of a side at head_dim hd.
KVC_HD int group_size(ElemFormat f, int hd) { return f.group ? f.group : hd; }
KVC_HD int groups_per_row(ElemFormat f, int hd) { return hd / group_size(f, hd); }

// ---------------------------------------------------------------- bit casts
KVC_HD uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
KVC_HD float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// ------------------------------------------------- fp16 / bf16 (round to nearest even)
KVC_HD uint16_t float_to_half(float f) {
  uint32_t x = f2u(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x477ff000u)  // >= 65520 rounds to inf; NaN stays NaN
    return (uint16_t)(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x < 0x38800000u)  // below 2^-14: half subnormal, step 2^-24
    return (uint16_t)(sign | (uint32_t)rintf(u2f(x) * 16777216.0f));
  x += 0xfffu + ((x >> 13) & 1u);
  return (uint16_t)(sign | ((x - (112u << 23)) >> 13));
}
KVC_HD float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return u2f(sign | f2u((float)m * 5.9604644775390625e-8f));
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
KVC_HD uint16_t float_to_bf16(float f) {
  uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}
KVC_HD float bf16_to_float(uint16_t b) { return u2f((uint32_t)b << 16); }

// The next half above / below h (finite h; never called past +-65504).
KVC_HD uint16_t half_next_up(uint16_t h) {
  if (h == 0x8000u) return 0x0001u;
  return (h & 0x8000u) ? (uint16_t)(h - 1) : (uint16_t)(h + 1);
}
KVC_HD uint16_t half_next_down(uint16_t h) {
  if (h == 0x0000u) return 0x8001u;
  return (h & 0x8000u) ? (uint16_t)(h + 1) : (uint16_t)(h - 1);
}
// Directed rounding to half, for |x| <= 65504: the smallest half >= x, the
// largest half <= x. Scales round up and zeros down, so a group's values
// always lie inside the range its codes span.
KVC_HD uint16_t half_up(float x) {
  uint16_t h = float_to_half(x);
  return half_to_float(h) < x ? half_next_up(h) : h;
}
KVC_HD uint16_t half_down(float x) {
  uint16_t h = float_to_half(x);
  return half_to_float(h) > x ? half_next_down(h) : h;
}

// -------------------------------------------------------------- fp8 (OCP)
constexpr float kE4M3Max = 448.0f;
constexpr float kE5M2Max = 57344.0f;

// a: finite, 0 <= a <= 448. Round to nearest even, saturating.
KVC_HD uint8_t encode_e4m3_abs(float a) {
  if (a < 0.015625f) return (uint8_t)rintf(a * 512.0f);  // subnormal step 2^-9
  uint32_t x = f2u(a);
  x += 0x7ffffu + ((x >> 20) & 1u);
  uint32_t code = (((x >> 23) - 120u) << 3) | ((x >> 20) & 7u);
  return (uint8_t)(code > 0x7eu ? 0x7eu : code);
}
KVC_HD uint8_t encode_e5m2_abs(float a) {
  if (a < 6.103515625e-05f) return (uint8_t)rintf(a * 65536.0f);  // step 2^-16
  uint32_t x = f2u(a);
  x += 0xfffffu + ((x >> 21) & 1u);
  uint32_t code = (((x >> 23) - 112u) << 2) | ((x >> 21) & 3u);
  return (uint8_t)(code > 0x7bu ? 0x7bu : code);
}
KVC_HD float decode_e4m3(uint8_t c) {
  uint32_t sign = (uint32_t)(c & 0x80u) << 24;
  uint32_t e = (c >> 3) & 0xfu, m = c & 7u;
  if (e == 0) return u2f(sign | f2u((float)m * 0.001953125f));
  return u2f(sign | ((e + 120u) << 23) | (m << 20));
}
KVC_HD float decode_e5m2(uint8_t c) {
  uint32_t sign = (uint32_t)(c & 0x80u) << 24;
  uint32_t e = (c >> 2) & 0x1fu, m = c & 3u;
  if (e == 0) return u2f(sign | f2u((float)m * 1.52587890625e-05f));
  return u2f(sign | ((e + 112u) << 23) | (m << 21));
}

// Min/max of non-NaN values; unlike fminf/fmaxf they compile to one
// instruction everywhere (NaN is rejected before any value is encoded).
KVC_HD float min_f(float a, float b) { return a < b ? a : b; }
KVC_HD float max_f(float a, float b) { return a > b ? a : b; }

// ------------------------------------------------------ Lloyd-Max levels
// The MSE-optimal levels of a standard normal (Max 1960; Lloyd's algorithm
// on the density, to 1e-6): what the coordinates of a rotated K/V vector,
// divided by their scale, roughly follow. Magnitude i counts from the centre
// out: code c of b bits is +magnitude(c - 2^(b-1)) from 2^(b-1) up, else
// -magnitude(2^(b-1) - 1 - c).
KVC_HD constexpr float nf_magnitude(Kind k, int i) {
  // Selects, not arrays: no local memory on the GPU for a run-time i.
  if (k == Kind::NF2) return i == 0 ? 0.452780f : 1.510418f;
  if (k == Kind::NF3)
    return i == 0 ? 0.245094f : i == 1 ? 0.756005f : i == 2 ? 1.343909f : 2.151946f;
  return i == 0 ? 0.128395f : i == 1 ? 0.388048f : i == 2 ? 0.656759f : i == 3 ? 0.942340f
       : i == 4 ? 1.256231f : i == 5 ? 1.618046f : i == 6 ? 2.069017f : 2.732590f;
}
// The values codes of a quantized kind decode to per unit of scale, before
// the zero is added: [code_value_min, code_value_max]. With a group's scale
// and zero they bound its decoded values from the metadata alone (what .kvc
// validation checks without decoding a file's codes).
KVC_HD constexpr float code_value_max(Kind k) {
  return k == Kind::FP8_E4M3 ? 448.0f : k == Kind::FP8_E5M2 ? 57344.0f : k == Kind::INT8 ? 127.0f
       : is_nf(k) ? nf_magnitude(k, (1 << (kind_bits(k) - 1)) - 1)
       : is_int_sym(k) ? (float)((1 << (kind_bits(k) - 1)) - 1) : (float)max_code(k);
}
KVC_HD constexpr float code_value_min(Kind k) {
  return is_absmax(k) || is_nf(k) ? -code_value_max(k)
       : is_int_sym(k) ? -(float)(1 << (kind_bits(k) - 1)) : 0.0f;
}
KVC_HD constexpr float nf_level(Kind k, uint32_t c) {
  const int half = 1 << (kind_bits(k) - 1);
  return (int)c >= half ? nf_magnitude(k, (int)c - half) : -nf_magnitude(k, half - 1 - (int)c);
}
// Code of the level nearest y (ties to the upper level), and that level:
// the number of midpoints between neighbouring levels that lie at or below y
// (they ascend). A full unrolled scan, not a binary search: with k known at
// the call site every midpoint and level folds to a constant and the scan is
// branch-free selects (CPU loops vectorize; no local memory on the GPU).
KVC_HD constexpr float nf_midpoint(Kind k, int i) {
  return 0.5f * (nf_level(k, (uint32_t)i) + nf_level(k, (uint32_t)i + 1));
}
KVC_HD_INLINE uint32_t nf_code_level(Kind k, float y, float& level) {
  uint32_t c = 0;
  float l = nf_level(k, 0);
  KVC_UNROLL
  for (int i = 0; i < 15; ++i) {
    if (i < max_code(k) && y >= nf_midpoint(k, i)) c = (uint32_t)i + 1, l = nf_level(k, (uint32_t)i + 1);
  }
  level = l;
  return c;
}
KVC_HD_INLINE uint32_t nf_code(Kind k, float y) {
  float level;
  return nf_code_level(k, y, level);
}
// An NF scale is the one of these multiples of the group's root mean square
// whose codes leave the smallest squared error (docs/format.md: they span the
// optimum's spread over rotated K/V groups; one multiple alone loses ~7% of
// the error at 3-4 bits).
constexpr int kNFScales = 4;
KVC_HD float nf_scale_factor(int i) { return i == 0 ? 0.8f : i == 1 ? 0.9f : i == 2 ? 1.0f : 1.1f; }

// ------------------------------------------------------------ quant params
// x_hat = code_value * scale + zero (zero 0 for fp8, int8 and NF).
struct QParams {
  float scale;
  float zero;
};
// Stored 16-bit metadata of one group, as half bits.
struct QMeta {
  uint16_t scale;
  uint16_t zero;
};
KVC_HD QParams params_of(Kind k, QMeta m) {
  const float s = half_to_float(m.scale);
  if (has_zero(k)) return QParams{s, half_to_float(m.zero)};
  // Symmetric uniform: (code - 2^(b-1)) * s = fma(code, s, -2^(b-1) * s), exactly.
  if (is_int_sym(k)) return QParams{s, -(float)(1 << (kind_bits(k) - 1)) * s};
  return QParams{s, 0.0f};
}

// fp8, int8: scale = absmax / top, rounded up to a half.
KVC_HD QMeta absmax_meta(Kind k, float absmax) {
  float top = k == Kind::FP8_E4M3 ? kE4M3Max : k == Kind::FP8_E5M2 ? kE5M2Max : 127.0f;
  return QMeta{half_up(absmax / top), 0};
}
// Asymmetric (int4/int3/int2 groups, per-channel kinds): zero = lo rounded
// down, scale = (hi - zero) / L rounded up; lo, hi within +-65504.
KVC_HD QMeta asym_meta(Kind k, float lo, float hi) {
  const uint16_t z = half_down(lo);
  return QMeta{half_up((hi - half_to_float(z)) / (float)max_code(k)), z};
}
// Symmetric uniform (llama.cpp q4_0): the element of largest magnitude m
// (the first, if several) maps to code 0, so scale = m / -2^(b-1), its
// magnitude rounded up.
KVC_HD QMeta sym_meta(Kind k, float m) {
  const float d = m / -(float)(1 << (kind_bits(k) - 1));
  return QMeta{d < 0.0f ? (uint16_t)(half_up(-d) | 0x8000u) : half_up(d), 0};
}

// Code of x for an affine kind: clamp(rint((x - zero) / scale), 0, L).
KVC_HD uint32_t affine_code(Kind k, float x, QParams p) {
  float y = p.scale != 0.0f ? (x - p.zero) / p.scale : 0.0f;
  return (uint32_t)rintf(min_f(max_f(y, 0.0f), (float)max_code(k)));
}
// int8 code of x: clamp(rint(x / scale), -127, 127) as a byte.
KVC_HD uint32_t int8_code(float x, QParams p) {
  float y = p.scale > 0.0f ? x / p.scale : 0.0f;
  return (uint32_t)(uint8_t)(int8_t)rintf(min_f(max_f(y, -127.0f), 127.0f));
}

// Element code for a finite x. Codes are raw bytes/nibbles/crumbs as stored.
KVC_HD_INLINE uint32_t encode(Kind k, float x, QParams p) {
  if (k == Kind::FP32) return f2u(x);
  if (is_raw(k)) return k == Kind::FP16 ? float_to_half(x) : float_to_bf16(x);
  if (k == Kind::INT8) return int8_code(x, p);
  if (is_fp8(k)) {
    float y = p.scale > 0.0f ? x / p.scale : 0.0f;
    uint32_t sign = f2u(y) >> 31 << 7;
    float a = fabsf(y);
    return sign | (k == Kind::FP8_E4M3 ? encode_e4m3_abs(min_f(a, kE4M3Max))
                                       : encode_e5m2_abs(min_f(a, kE5M2Max)));
  }
  if (is_nf(k)) return nf_code(k, p.scale > 0.0f ? x / p.scale : 0.0f);
  return affine_code(k, x, p);
}
// Code as a float before scaling (what the attention loops multiply by the scale).
KVC_HD float code_value(Kind k, uint32_t c) {
  switch (k) {
    case Kind::FP16: return half_to_float((uint16_t)c);
    case Kind::BF16: return bf16_to_float((uint16_t)c);
    case Kind::FP32: return u2f(c);
    case Kind::FP8_E4M3: return decode_e4m3((uint8_t)c);
    case Kind::FP8_E5M2: return decode_e5m2((uint8_t)c);
    case Kind::INT8: return (float)(int8_t)(uint8_t)c;
    case Kind::NF4: case Kind::NF3: case Kind::NF2: return nf_level(k, c);
    default: return (float)c;
  }
}
KVC_HD float decode(Kind k, uint32_t c, QParams p) {
  float v = code_value(k, c);
  if (is_raw(k)) return v;
  return is_affine(k) ? fmaf(v, p.scale, p.zero) : v * p.scale;
}

// ------------------------------------------------- reductions of a group
// Sums over a group's channels are taken in one order everywhere (the CUDA
// encoders reduce across lanes in the same tree): each octet of 8 channels
// left to right, then the octet sums pairwise, neighbours first.
KVC_HD float octet_tree(float* s, int octets) {
  for (int w = 1; w < octets; w *= 2)
    for (int o = 0; o + w < octets; o += 2 * w) s[o] = s[o] + s[o + w];
  return s[0];
}

// NF scale of a group x[0..n) (n a multiple of 8, at most kMaxHeadDim):
// rms = sqrt(sum(x^2) / n), then each candidate f * rms rounded up to a half
// is scored by sum((x - scale * level(code))^2); the first smallest wins.
KVC_HD_INLINE QMeta nf_meta(Kind k, const float* x, int n) {
  float s[kMaxHeadDim / 8];
  const int octets = n / 8;
  for (int o = 0; o < octets; ++o) {
    float a = 0.0f;
    for (int e = 0; e < 8; ++e) a = fmaf(x[8 * o + e], x[8 * o + e], a);
    s[o] = a;
  }
  const float rms = sqrtf(octet_tree(s, octets) / (float)n);
  QMeta best{0, 0};
  float best_err = INFINITY;
  for (int i = 0; i < kNFScales; ++i) {
    const uint16_t h = half_up(min_f(rms * nf_scale_factor(i), kHalfMax));
    const float sc = half_to_float(h);
    if (sc == 0.0f) return QMeta{0, 0};  // an all-zero group
    for (int o = 0; o < octets; ++o) {
      float a = 0.0f;
      for (int e = 0; e < 8; ++e) {
        float level;
        const float xv = x[8 * o + e];
        nf_code_level(k, xv / sc, level);
        const float d = fmaf(-sc, level, xv);
        a = fmaf(d, d, a);
      }
      s[o] = a;
    }
    const float err = octet_tree(s, octets);
    if (err < best_err) best_err = err, best = QMeta{h, 0};
  }
  return best;
}

// ----------------------------------------------------- storable values
// The largest |x| a side stores: fp16 rounds below 65520, 16-bit scales and
// zeros hold +-65504, and a rotated coordinate can reach sqrt(head_dim)
// times the largest input (fp32 and bf16: any finite value, bf16 after its
// rounding). NaN and Inf are never stored.
KVC_HD float storable_max(ElemFormat f, int hd) {
  if (f.kind == Kind::FP16) return 65519.996f;
  if (f.kind == Kind::FP32 || f.kind == Kind::BF16) return 3.4028235e38f;
  return f.rotated ? kHalfMax / sqrtf((float)hd) : kHalfMax;
}
KVC_HD bool storable(ElemFormat f, int hd, float x) {
  if (!isfinite(x)) return false;
  if (f.kind == Kind::BF16) return isfinite(bf16_to_float(float_to_bf16(x)));
  return fabsf(x) <= storable_max(f, hd);
}

// ----------------------------------------------------------- the rotation
// ":h" rotates each token's head_dim-vector x (a power of two) by the
// orthogonal R = H D / sqrt(n): D = diag(sign(i)), H the Sylvester Hadamard
// matrix. Attention is unchanged: q.k = (Rq).(Rk), and the weighted sum of
// rotated V is turned back once (R^T = D H / sqrt(n)).
constexpr uint32_t kHadamardSeed = 0x6b76636fu;  // "kvco"
// sign(i): -1 if the murmur3 finalizer of i * 0x9e3779b1 + seed is odd.
KVC_HD float hadamard_sign(int i) {
  uint32_t h = (uint32_t)i * 0x9e3779b1u + kHadamardSeed;
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return (h & 1u) ? -1.0f : 1.0f;
}
KVC_HD bool is_pow2(int n) { return n > 0 && (n & (n - 1)) == 0; }
KVC_HD float hadamard_norm(int n) { return 1.0f / sqrtf((float)n); }
// In place, unnormalized: stage w = 1, 2, 4, ... turns (a, b) = (x[j], x[j+w])
// into (a + b, a - b).
KVC_HD void fwht(float* x, int n) {
  for (int w = 1; w < n; w *= 2)
    for (int i = 0; i < n; i += 2 * w)
      for (int j = i; j < i + w; ++j) {
        const float a = x[j], b = x[j + w];
        x[j] = a + b;
        x[j + w] = a - b;
      }
}
KVC_HD void rotate(float* x, int n) {
  for (int i = 0; i < n; ++i) x[i] *= hadamard_sign(i);
  fwht(x, n);
  const float r = hadamard_norm(n);
  for (int i = 0; i < n; ++i) x[i] *= r;
}
KVC_HD void unrotate(float* x, int n) {
  fwht(x, n);
  const float r = hadamard_norm(n);
  for (int i = 0; i < n; ++i) x[i] = x[i] * r * hadamard_sign(i);
}

// ------------------------------------------------------------------ packing
// Within a row, channels are packed in chunks of 32. 8- and 16-bit codes are
// plain little-endian arrays. A chunk of b-bit codes (b = 4 or 2) takes 4*b
// bytes, and its channel i sits in byte i % (4*b) at bit b * (i / (4*b)):
//   int4: byte i = ch i | ch i+16 << 4               (16 bytes a chunk)
//   int2: byte i = ch i | ch i+8 << 2 | ch i+16 << 4 | ch i+24 << 6  (8 bytes)
// so one shift and mask of a chunk yields a run of consecutive channels.
// 3-bit codes (12 bytes a chunk): their low two bits as int2's 8 bytes, then
// bit 2 of channels 8j..8j+7 in byte 8 + j (channel 8j + e at bit e).
struct PackPos {
  int byte;
  int shift;
};
KVC_HD PackPos pack_pos(Kind k, int c) {
  int b = kind_bits(k);
  if (b == 3) b = 2;  // the low bits; see load_code for bit 2
  if (b >= 8) return PackPos{c * (b / 8), 0};
  int chunk_bytes = 4 * b;
  int i = c % kChunk;
  return PackPos{(c / kChunk) * (4 * kind_bits(k)) + i % chunk_bytes, b * (i / chunk_bytes)};
}
// Byte and bit of bit 2 of a 3-bit code.
KVC_HD PackPos high_bit_pos(int c) { return PackPos{(c / kChunk) * 12 + 8 + c % kChunk / 8, c % 8}; }

KVC_HD uint32_t load_code(Kind k, const uint8_t* row, int c) {
  PackPos p = pack_pos(k, c);
  int b = kind_bits(k);
  if (b == 32) {
    uint32_t u;
    memcpy(&u, row + p.byte, 4);
    return u;
  }
  if (b == 16) return (uint32_t)row[p.byte] | ((uint32_t)row[p.byte + 1] << 8);
  if (b == 3) {
    PackPos h = high_bit_pos(c);
    return (((uint32_t)row[p.byte] >> p.shift) & 3u) | (((uint32_t)row[h.byte] >> h.shift) & 1u) << 2;
  }
  return ((uint32_t)row[p.byte] >> p.shift) & (uint32_t)max_code(k);
}
// Sub-byte codes are OR-ed in: the row must be zeroed before a sub-byte store.
KVC_HD void store_code(Kind k, uint8_t* row, int c, uint32_t code) {
  PackPos p = pack_pos(k, c);
  int b = kind_bits(k);
  if (b == 32) {
    memcpy(row + p.byte, &code, 4);
  } else if (b == 16) {
    row[p.byte] = (uint8_t)code;
    row[p.byte + 1] = (uint8_t)(code >> 8);
  } else if (b == 8) {
    row[p.byte] = (uint8_t)code;
  } else if (b == 3) {
    PackPos h = high_bit_pos(c);
    row[p.byte] |= (uint8_t)((code & 3u) << p.shift);
    row[h.byte] |= (uint8_t)((code >> 2) << h.shift);
  } else {
    row[p.byte] |= (uint8_t)(code << p.shift);
  }
}

// Bytes of a 32-channel chunk of b-bit codes.
KVC_HD constexpr int chunk_bytes(Kind k) { return 4 * kind_bits(k); }

// Packs the 32 codes of one chunk (codes[i] for channel i) per the rule above.
KVC_HD void pack_chunk(Kind k, const uint8_t* codes, uint8_t* out) {
  const bool three = kind_bits(k) == 3;
  const int b = three ? 2 : kind_bits(k), nbytes = 4 * b;
  const uint32_t mask = (1u << b) - 1u;
  for (int i = 0; i < nbytes; ++i) {
    uint32_t v = 0;
    for (int j = 0; j < 8 / b; ++j) v |= ((uint32_t)codes[i + j * nbytes] & mask) << (b * j);
    out[i] = (uint8_t)v;
  }
  if (three)
    for (int j = 0; j < 4; ++j) {
      uint32_t v = 0;
      for (int e = 0; e < 8; ++e) v |= ((uint32_t)codes[8 * j + e] >> 2 & 1u) << e;
      out[8 + j] = (uint8_t)v;
    }
}

// ------------------------------------------------------------------- layout
KVC_HD int align_up(int x, int a) { return (x + a - 1) / a * a; }

// One side's region of a tile: packed codes for block_size tokens, then its
// 16-bit metadata (IEEE half, little-endian):
//  fp32/fp16/bf16:       data only
//  per-token quantized:  half meta[block_size][groups][halves]  (halves: scale, zero
//                        for asymmetric int*; scale only for fp8, int8, int*:s, nf*)
//  int8c/int4c/int2c:    half scale[head_dim], then half zero[head_dim]
struct Section {
  ElemFormat fmt;
  int offset;     // from the start of the tile
  int row_bytes;  // packed code bytes of one token
  int data_bytes;
  int meta_bytes;
  int groups;     // scales per token (per-token quantized kinds)
  KVC_HD int meta_offset() const { return offset + data_bytes; }
  KVC_HD int end() const { return offset + align_up(data_bytes + meta_bytes, kAlign); }
  // Half words of a token's metadata (per-token kinds).
  KVC_HD int token_halves() const { return groups * meta_halves(fmt.kind); }
};

KVC_HD Section make_section(ElemFormat f, int head_dim, int block_size, int offset) {
  Section s;
  s.fmt = f;
  s.offset = offset;
  s.row_bytes = head_dim * kind_bits(f.kind) / 8;
  s.data_bytes = align_up(block_size * s.row_bytes, kAlign);
  s.groups = is_token_quant(f.kind) ? groups_per_row(f, head_dim) : 0;
  if (is_token_quant(f.kind)) s.meta_bytes = block_size * s.token_halves() * 2;
  else if (is_per_channel(f.kind)) s.meta_bytes = head_dim * 4;
  else s.meta_bytes = 0;
  return s;
}

KVC_HD uint16_t load_half(const uint8_t* p) { return (uint16_t)(p[0] | p[1] << 8); }
KVC_HD void store_half(uint8_t* p, uint16_t h) {
  p[0] = (uint8_t)h;
  p[1] = (uint8_t)(h >> 8);
}

// The stored metadata of token t's group g (per-token kinds).
KVC_HD QMeta load_meta(const Section& s, const uint8_t* tile, int token, int g) {
  const uint8_t* p = tile + s.meta_offset() + 2 * (token * s.token_halves() + g * meta_halves(s.fmt.kind));
  return QMeta{load_half(p), has_zero(s.fmt.kind) ? load_half(p + 2) : (uint16_t)0};
}
KVC_HD void store_meta(const Section& s, uint8_t* tile, int token, int g, QMeta m) {
  uint8_t* p = tile + s.meta_offset() + 2 * (token * s.token_halves() + g * meta_halves(s.fmt.kind));
  store_half(p, m.scale);
  if (has_zero(s.fmt.kind)) store_half(p + 2, m.zero);
}
// A per-channel block's metadata of channel c.
KVC_HD QMeta load_channel_meta(const Section& s, const uint8_t* tile, int c, int head_dim) {
  const uint8_t* p = tile + s.meta_offset();
  return QMeta{load_half(p + 2 * c), load_half(p + 2 * (head_dim + c))};
}
KVC_HD void store_channel_meta(const Section& s, uint8_t* tile, int c, int head_dim, QMeta m) {
  uint8_t* p = tile + s.meta_offset();
  store_half(p + 2 * c, m.scale);
  store_half(p + 2 * (head_dim + c), m.zero);
}

// Where a token's (or the block's) scale and zero live, as floats.
KVC_HD QParams load_params(const Section& s, const uint8_t* tile, int token, int channel) {
  Kind k = s.fmt.kind;
  if (is_raw(k)) return QParams{1.0f, 0.0f};
  if (is_per_channel(k)) {
    const int head_dim = s.row_bytes * 8 / kind_bits(k);
    return params_of(k, load_channel_meta(s, tile, channel, head_dim));
  }
  const int head_dim = s.row_bytes * 8 / kind_bits(k);
  return params_of(k, load_meta(s, tile, token, channel / group_size(s.fmt, head_dim)));
}

struct TileLayout {
  Section k, v;
  int head_dim;
  int block_size;
  int natural_bytes;  // both sections, padded to a multiple of block_size; before the
                      // padding that makes tile sizes unique (host table)
};

KVC_HD TileLayout make_layout(ElemFormat kf, ElemFormat vf, int head_dim, int block_size) {
  TileLayout t;
  t.head_dim = head_dim;
  t.block_size = block_size;
  t.k = make_section(kf, head_dim, block_size, 0);
  t.v = make_section(vf, head_dim, block_size, t.k.end());
  t.natural_bytes = align_up(t.v.end(), block_size);  // whole tokens' worth of bytes
  return t;
}

}  // namespace kvcomp
