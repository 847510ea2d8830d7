// Vectorized reading of one side of a tile: 8 channels of a token at a time,
// dequantized in registers. Shared by decode attention and the row decoder.
// Values come out in the stored space: rotated formats (":h") are turned
// back by the callers, once per row or per attention output.
#pragma once
#include "cpu/simd.h"
#include "kvcomp/format.h"

namespace kvcomp {

// One side's tile reader for kind K: dequantized (or, for kinds with one
// scale and no zero per row, unscaled) 8-channel runs. token_scale() is the
// factor left out.
template <Kind K>
struct Reader {
  using vf8 = simd::vf8;
  using vi8 = simd::vi8;
  const uint8_t* data;
  const uint8_t* meta;  // 16-bit words
  int row_bytes, group, head_dim, token_halves;

  Reader(const Section& s, const uint8_t* tile, int hd)
      : data(tile + s.offset), meta(tile + s.meta_offset()), row_bytes(s.row_bytes),
        group(group_size(s.fmt, hd)), head_dim(hd), token_halves(s.token_halves()) {}

  // fp8/int8/NF with one scale per row: it multiplies whole dot products.
  static constexpr bool kScaleOnly = is_absmax(K) || is_nf(K);
  bool row_scale() const { return kScaleOnly && group == head_dim; }
  float token_scale(int t) const {
    if constexpr (kScaleOnly) {
      if (row_scale()) return simd::half1(meta + 2 * t * token_halves) * simd::kCodeScale<K>;
    }
    return 1.0f;
  }
  vf8 run(int t, int sub) const { return dequant(t, sub, simd::codes8<K>(data + (int64_t)t * row_bytes, sub)); }

  // Channel runs come in pairs that unpack from the same bytes: pair P of
  // chunk c (channels 32c..32c+31) holds runs 4c + pair_sub(P, 0|1). For
  // int4 those are the low and high nibbles of 8 bytes; for 2 and 3 bits two
  // of the four crumbs (and two high-bit bytes); for byte kinds simply
  // neighbours (so a pair also covers the last 16 channels when head_dim is
  // not a multiple of 32).
  static constexpr int pair_sub(int P, int i) {
    return kind_bits(K) == 4 ? P + 2 * i : 2 * P + i;
  }
  template <int P>
  void run_pair(int t, int c, vf8& a, vf8& b) const {
    constexpr int sa = pair_sub(P, 0), sb = pair_sub(P, 1);
    const uint8_t* row = data + (int64_t)t * row_bytes;
    if constexpr (kind_bits(K) == 4) {
      vi8 x = simd::bytes8(row + 16 * c + 8 * P);
      a = dequant(t, 4 * c + sa, simd::value8<K>(simd::ifield8<0, 15>(x)));
      b = dequant(t, 4 * c + sb, simd::value8<K>(simd::ifield8<4, 0>(x)));
#if KVCOMP_AVX2
    } else if constexpr (kind_bits(K) == 3 && is_nf(K)) {
      const uint8_t* chunk = row + 12 * c;  // runs sa = 2P and sb = 2P + 1: crumbs 2P, 2P + 1
      vi8 x = simd::bytes8(chunk);
      simd::nf3_pair8<K>(simd::ifield8<4 * P, 0>(x).v, (uint32_t)chunk[8 + sa] | (uint32_t)chunk[8 + sb] << 8, a, b);
      a = dequant(t, 4 * c + sa, a);
      b = dequant(t, 4 * c + sb, b);
#endif
    } else if constexpr (kind_bits(K) == 3) {
      const uint8_t* chunk = row + 12 * c;
      vi8 x = simd::bytes8(chunk);
      a = dequant(t, 4 * c + sa, simd::value8<K>(simd::or8(simd::ifield8<4 * P, 3>(x), simd::high8(chunk[8 + sa]))));
      b = dequant(t, 4 * c + sb, simd::value8<K>(simd::or8(simd::ifield8<4 * P + 2, 3>(x), simd::high8(chunk[8 + sb]))));
    } else if constexpr (kind_bits(K) == 2) {
      vi8 x = simd::bytes8(row + 8 * c);
      a = dequant(t, 4 * c + sa, simd::value8<K>(simd::ifield8<4 * P, 3>(x)));
      b = dequant(t, 4 * c + sb, simd::value8<K>(simd::ifield8<4 * P + 2, P ? 0 : 3>(x)));
    } else {
      a = run(t, 4 * c + sa);
      b = run(t, 4 * c + sb);
    }
  }

  // Code values of run `sub` of token t, scaled (all but a row scale).
  vf8 dequant(int t, int sub, vf8 c) const {
    if constexpr (is_token_quant(K)) {
      if constexpr (kScaleOnly)
        if (row_scale()) return c;
      const uint8_t* p = meta + 2 * (t * token_halves + sub * 8 / group * meta_halves(K));
      const float s = simd::half1(p);
      if constexpr (is_asym_token(K)) return simd::fma8(c, simd::set8(s), simd::set8(simd::half1(p + 2)));
      if constexpr (is_int_sym(K))
        return simd::fma8(c, simd::set8(s), simd::set8(-(float)(1 << (kind_bits(K) - 1)) * s));
      return simd::mul8(c, simd::set8(s * simd::kCodeScale<K>));
    } else if constexpr (is_per_channel(K)) {
      return simd::fma8(c, simd::halves8(meta + 16 * sub), simd::halves8(meta + 2 * head_dim + 16 * sub));
    } else {
      return c;
    }
  }
};

}  // namespace kvcomp
