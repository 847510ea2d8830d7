// Row-level encode/decode of one token (or one block, for per-channel kinds)
// on the CPU, built from the format header's element math.
#pragma once
#include <math.h>
#include <string.h>

#include <stdio.h>

#include <algorithm>
#include <string>

#include "cpu/kernels.h"
#include "cpu/nf_encode.h"
#include "cpu/reader.h"
#include "kvcomp/format.h"

namespace kvcomp {

// Calls body with a constexpr `K` equal to the runtime kind.
#define KVC_KIND_CASE(NAME, ...) \
  case Kind::NAME: { constexpr Kind K = Kind::NAME; return __VA_ARGS__(); }
#define KVC_DISPATCH_KIND(kind, ...)                                                        \
  [&] {                                                                                     \
    switch (kind) {                                                                         \
      KVC_KIND_CASE(FP32, __VA_ARGS__) KVC_KIND_CASE(FP16, __VA_ARGS__)                     \
      KVC_KIND_CASE(BF16, __VA_ARGS__) KVC_KIND_CASE(FP8_E4M3, __VA_ARGS__)                 \
      KVC_KIND_CASE(FP8_E5M2, __VA_ARGS__) KVC_KIND_CASE(INT8, __VA_ARGS__)                 \
      KVC_KIND_CASE(INT4, __VA_ARGS__) KVC_KIND_CASE(INT3, __VA_ARGS__)                     \
      KVC_KIND_CASE(INT2, __VA_ARGS__) KVC_KIND_CASE(INT4S, __VA_ARGS__)                    \
      KVC_KIND_CASE(INT3S, __VA_ARGS__) KVC_KIND_CASE(INT2S, __VA_ARGS__)                   \
      KVC_KIND_CASE(NF4, __VA_ARGS__) KVC_KIND_CASE(NF3, __VA_ARGS__)                       \
      KVC_KIND_CASE(NF2, __VA_ARGS__) KVC_KIND_CASE(INT8C, __VA_ARGS__)                     \
      KVC_KIND_CASE(INT4C, __VA_ARGS__)                                                     \
      default: { constexpr Kind K = Kind::INT2C; return __VA_ARGS__(); }                   \
    }                                                                                       \
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

// True if every value of the row is stored as is or within its format's
// range (format.h storable: finite, fp16 and 16-bit scales' limits).
inline bool row_storable(ElemFormat f, int hd, const float* x, int n) {
  const float top = storable_max(f, hd);
  for (int i = 0; i < n; ++i) {
    if (!(fabsf(x[i]) <= top)) return false;  // NaN fails too
    if (f.kind == Kind::BF16 && !isfinite(bf16_to_float(float_to_bf16(x[i])))) return false;
  }
  return true;
}

// The largest |x| a side stores, for error messages.
inline std::string limit_str(ElemFormat f, int hd) {
  char buf[32];
  snprintf(buf, sizeof buf, "%g", storable_max(f, hd));
  return buf;
}

// Token t's values, true ones: dequantized, and turned back for ":h".
template <Kind K>
void decode_row_k(const Section& s, const uint8_t* tile, int t, int hd, float* out) {
  Reader<K> r(s, tile, hd);
  simd::vf8 ts = simd::set8(r.token_scale(t));
  for (int sub = 0; sub < hd / 8; ++sub) simd::store8(out + 8 * sub, simd::mul8(r.run(t, sub), ts));
  if (s.fmt.rotated) unrotate(out, hd);
}
inline void decode_row(const Section& s, const uint8_t* tile, int t, int hd, float* out) {
  KVC_DISPATCH_KIND(s.fmt.kind, [&] { decode_row_k<K>(s, tile, t, hd, out); });
}

// The 16-bit metadata of one group g of G values (per-token quantized kinds
// but NF: nf_encode.h).
template <Kind K>
QMeta group_meta(const float* xg, int G) {
  if constexpr (is_absmax(K)) {
    float absmax = 0.0f;
    for (int c = 0; c < G; ++c) absmax = max_f(absmax, fabsf(xg[c]));
    return absmax_meta(K, absmax);
  } else if constexpr (is_asym_token(K)) {
    float lo = xg[0], hi = xg[0];
    for (int c = 1; c < G; ++c) lo = min_f(lo, xg[c]), hi = max_f(hi, xg[c]);
    return asym_meta(K, lo, hi);
  } else {
    static_assert(is_int_sym(K), "NF kinds: nf_encode_group");
    float m = xg[0];
    for (int c = 1; c < G; ++c) m = fabsf(xg[c]) > fabsf(m) ? xg[c] : m;
    return sym_meta(K, m);
  }
}

// Per-token kinds: computes the token's scales and writes its codes (x in
// true values; rotated here for ":h").
template <Kind K>
void encode_row_k(const Section& s, uint8_t* tile, int t, const float* x_in, int hd) {
  uint8_t* row = tile + s.offset + (int64_t)t * s.row_bytes;
  if constexpr (is_raw(K)) {
    for (int c = 0; c < hd; ++c) store_code(K, row, c, encode(K, x_in[c], QParams{1, 0}));
  } else if constexpr (is_token_quant(K)) {  // per-channel kinds: see encode_block_k
    float rotated[kMaxHeadDim];
    const float* x = x_in;
    if (s.fmt.rotated) {
      memcpy(rotated, x_in, hd * sizeof(float));
      rotate(rotated, hd);
      x = rotated;
    }
    const int G = group_size(s.fmt, hd), groups = hd / G;
    uint8_t codes[kMaxHeadDim];
    for (int gi = 0; gi < groups; ++gi) {
      const float* xg = x + gi * G;
      if constexpr (is_nf(K)) {  // scale and codes in one pass
        store_meta(s, tile, t, gi, nf_encode_group<K>(xg, G, codes + gi * G));
      } else {
        const QMeta m = group_meta<K>(xg, G);
        store_meta(s, tile, t, gi, m);
        const QParams p = params_of(K, m);
        if constexpr (K == Kind::INT8) {
          for (int c = 0; c < G; ++c) row[gi * G + c] = (uint8_t)int8_code(xg[c], p);  // vectorizes
        } else if constexpr (kind_bits(K) == 8) {
          for (int c = 0; c < G; ++c) row[gi * G + c] = (uint8_t)encode(K, xg[c], p);
        } else {
          for (int c = 0; c < G; ++c) codes[gi * G + c] = (uint8_t)affine_code(K, xg[c], p);  // vectorizes
        }
      }
    }
    if constexpr (kind_bits(K) < 8)
      for (int c = 0; c < hd; c += kChunk) pack_chunk(K, codes + c, row + c / kChunk * chunk_bytes(K));
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
  uint8_t* data = tile + s.offset;
  memset(data, 0, (size_t)bs * s.row_bytes);
  for (int c = 0; c < hd; ++c) {
    float lo = n ? x[c] : 0.0f, hi = lo;
    for (int t = 1; t < n; ++t) lo = min_f(lo, x[t * hd + c]), hi = max_f(hi, x[t * hd + c]);
    const QMeta m = asym_meta(K, lo, hi);
    store_channel_meta(s, tile, c, hd, m);
    const QParams p = params_of(K, m);
    for (int t = 0; t < n; ++t)
      store_code(K, data + (int64_t)t * s.row_bytes, c, affine_code(K, x[t * hd + c], p));
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
                       int dst_t) {
  memmove(dst_tile + s.offset + (int64_t)dst_t * s.row_bytes,
          src_tile + s.offset + (int64_t)src_t * s.row_bytes, s.row_bytes);
  const int mb = 2 * s.token_halves();
  memmove(dst_tile + s.meta_offset() + dst_t * mb, src_tile + s.meta_offset() + src_t * mb, mb);
}

}  // namespace kvcomp
