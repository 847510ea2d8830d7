// Row-level encode/decode of one token (or one block, for per-channel kinds)
// on the CPU, built from the format header's element math.
#pragma once
#include <math.h>
#include <string.h>

#include <algorithm>

#include "cpu/kernels.h"
#include "cpu/reader.h"
#include "kvcomp/format.h"

namespace kvcomp {

// Calls body with a constexpr `K` equal to the runtime kind.
#define KVC_DISPATCH_KIND(kind, ...)                                           \
  [&] {                                                                        \
    switch (kind) {                                                            \
      case Kind::FP32: { constexpr Kind K = Kind::FP32; return __VA_ARGS__(); }         \
      case Kind::FP16: { constexpr Kind K = Kind::FP16; return __VA_ARGS__(); }         \
      case Kind::BF16: { constexpr Kind K = Kind::BF16; return __VA_ARGS__(); }         \
      case Kind::FP8_E4M3: { constexpr Kind K = Kind::FP8_E4M3; return __VA_ARGS__(); } \
      case Kind::FP8_E5M2: { constexpr Kind K = Kind::FP8_E5M2; return __VA_ARGS__(); } \
      case Kind::INT8: { constexpr Kind K = Kind::INT8; return __VA_ARGS__(); }         \
      case Kind::INT4: { constexpr Kind K = Kind::INT4; return __VA_ARGS__(); }         \
      case Kind::INT2: { constexpr Kind K = Kind::INT2; return __VA_ARGS__(); }         \
      case Kind::INT8C: { constexpr Kind K = Kind::INT8C; return __VA_ARGS__(); }       \
      case Kind::INT4C: { constexpr Kind K = Kind::INT4C; return __VA_ARGS__(); }       \
      default: { constexpr Kind K = Kind::INT2C; return __VA_ARGS__(); }                \
    }                                                                          \
  }()

// src[offset .. offset + n) as floats (the dtype switch outside the loop, so it vectorizes).
inline void load_activations(const void* src, DType t, int64_t offset, int64_t n, float* dst) {
  switch (t) {
    case DType::F32: memcpy(dst, (const float*)src + offset, n * sizeof(float)); break;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(((const uint16_t*)src)[offset + i]);
      break;
    default:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(((const uint16_t*)src)[offset + i]);
  }
}
// dst[offset .. offset + n) = src in the activation dtype (round to nearest even).
inline void store_activations(const float* src, int64_t n, DType t, void* dst, int64_t offset) {
  switch (t) {
    case DType::F32: memcpy((float*)dst + offset, src, n * sizeof(float)); break;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) ((uint16_t*)dst)[offset + i] = float_to_half(src[i]);
      break;
    default:
      for (int64_t i = 0; i < n; ++i) ((uint16_t*)dst)[offset + i] = float_to_bf16(src[i]);
  }
}

// True if every value of the row is stored without becoming NaN or Inf
// (finite input; for fp16/bf16 storage also no overflow on rounding).
inline bool row_storable(Kind k, const float* x, int n) {
  for (int i = 0; i < n; ++i) {
    if (!isfinite(x[i])) return false;
    if (k == Kind::FP16 && fabsf(x[i]) >= 65520.0f) return false;
    if (k == Kind::BF16 && !isfinite(bf16_to_float(float_to_bf16(x[i])))) return false;
  }
  return true;
}

template <Kind K>
void decode_row_k(const Section& s, const uint8_t* tile, int t, int hd, float* out) {
  Reader<K> r(s, tile, hd);
  simd::vf8 ts = simd::set8(r.token_scale(t));
  for (int sub = 0; sub < hd / 8; ++sub) simd::store8(out + 8 * sub, simd::mul8(r.run(t, sub), ts));
}
inline void decode_row(const Section& s, const uint8_t* tile, int t, int hd, float* out) {
  KVC_DISPATCH_KIND(s.fmt.kind, [&] { decode_row_k<K>(s, tile, t, hd, out); });
}

// Per-token kinds: computes the token's scales and writes its codes.
template <Kind K>
void encode_row_k(const Section& s, uint8_t* tile, int t, const float* x, int hd) {
  uint8_t* row = tile + s.offset + (int64_t)t * s.row_bytes;
  float* meta = (float*)(tile + s.meta_offset());
  if constexpr (is_raw(K)) {
    for (int c = 0; c < hd; ++c) store_code(K, row, c, encode(K, x[c], QParams{1, 0}));
  } else if constexpr (is_symmetric_token(K)) {
    float absmax = 0.0f;
    for (int c = 0; c < hd; ++c) absmax = max_f(absmax, fabsf(x[c]));
    QParams p = symmetric_params(K, absmax);
    meta[t] = p.scale;
    if constexpr (K == Kind::INT8) {
      for (int c = 0; c < hd; ++c) row[c] = (uint8_t)int8_code(x[c], p);  // vectorizes
    } else {
      for (int c = 0; c < hd; ++c) row[c] = (uint8_t)encode(K, x[c], p);
    }
  } else if constexpr (is_grouped(K)) {  // per-channel kinds: see encode_block_k
    const int g = s.fmt.group, groups = hd / g;
    uint8_t codes[kMaxHeadDim];
    for (int gi = 0; gi < groups; ++gi) {
      const float* xg = x + gi * g;
      float lo = xg[0], hi = xg[0];
      for (int c = 1; c < g; ++c) lo = min_f(lo, xg[c]), hi = max_f(hi, xg[c]);
      QParams p = asymmetric_params(K, lo, hi);
      meta[2 * (t * groups + gi)] = p.scale;
      meta[2 * (t * groups + gi) + 1] = p.zero;
      uint8_t* cg = codes + gi * g;
      if (isfinite(hi - lo)) {
        for (int c = 0; c < g; ++c) cg[c] = (uint8_t)asym_code(K, xg[c], p);  // vectorizes
      } else {
        for (int c = 0; c < g; ++c) cg[c] = (uint8_t)encode(K, xg[c], p);
      }
    }
    for (int c = 0; c < hd; c += kChunk) pack_chunk(K, codes + c, row + c / kChunk * (4 * kind_bits(K)));
  }
}
inline void encode_row(const Section& s, uint8_t* tile, int t, const float* x, int hd) {
  KVC_DISPATCH_KIND(s.fmt.kind, [&] {
    if constexpr (!is_per_channel(K)) encode_row_k<K>(s, tile, t, x, hd);
  });
}

// Per-channel kinds: scales per channel over the block's first n tokens
// (x is [n][hd]); rows n.. are cleared.
template <Kind K>
void encode_block_k(const Section& s, uint8_t* tile, const float* x, int n, int hd, int bs) {
  float* meta = (float*)(tile + s.meta_offset());
  uint8_t* data = tile + s.offset;
  memset(data, 0, (size_t)bs * s.row_bytes);
  for (int c = 0; c < hd; ++c) {
    float lo = n ? x[c] : 0.0f, hi = lo;
    for (int t = 1; t < n; ++t) lo = min_f(lo, x[t * hd + c]), hi = max_f(hi, x[t * hd + c]);
    QParams p = asymmetric_params(K, lo, hi);
    meta[c] = p.scale;
    meta[hd + c] = p.zero;
    for (int t = 0; t < n; ++t)
      store_code(K, data + (int64_t)t * s.row_bytes, c, encode(K, x[t * hd + c], p));
  }
}

// Encodes n tokens x[n][hd] as the first n tokens of a section's block.
inline void encode_block(const Section& s, uint8_t* tile, const float* x, int n, int hd, int bs) {
  KVC_DISPATCH_KIND(s.fmt.kind, [&] {
    if constexpr (is_per_channel(K)) {
      encode_block_k<K>(s, tile, x, n, hd, bs);
    } else {
      for (int t = 0; t < n; ++t) encode_row_k<K>(s, tile, t, x + (int64_t)t * hd, hd);
    }
  });
}

// Per-token kinds: moves a token's codes and scales, bit for bit.
inline void copy_token(const Section& s, const uint8_t* src_tile, int src_t, uint8_t* dst_tile,
                       int dst_t, int hd) {
  memmove(dst_tile + s.offset + (int64_t)dst_t * s.row_bytes,
          src_tile + s.offset + (int64_t)src_t * s.row_bytes, s.row_bytes);
  Kind k = s.fmt.kind;
  int meta_floats = is_symmetric_token(k) ? 1 : is_grouped(k) ? 2 * hd / s.fmt.group : 0;
  const float* sm = (const float*)(src_tile + s.meta_offset());
  float* dm = (float*)(dst_tile + s.meta_offset());
  memmove(dm + dst_t * meta_floats, sm + src_t * meta_floats, meta_floats * sizeof(float));
}

}  // namespace kvcomp
