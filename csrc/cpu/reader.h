// Vectorized reading of one side of a tile: 8 channels of a token at a time,
// dequantized in registers. Shared by decode attention and the row decoder.
#pragma once
#include "cpu/simd.h"
#include "kvcomp/format.h"

namespace kvcomp {

// One side's tile reader for kind K: dequantized (or, for per-token symmetric
// kinds, unscaled) 8-channel runs. token_scale() is the factor left out.
template <Kind K>
struct Reader {
  using vf8 = simd::vf8;
  const uint8_t* data;
  const float* meta;
  int row_bytes, groups, group, head_dim;

  Reader(const Section& s, const uint8_t* tile, int hd)
      : data(tile + s.offset), meta((const float*)(tile + s.meta_offset())),
        row_bytes(s.row_bytes), groups(s.fmt.group ? hd / s.fmt.group : 0),
        group(s.fmt.group), head_dim(hd) {}

  float token_scale(int t) const {
    if constexpr (is_symmetric_token(K)) return meta[t] * simd::kCodeScale<K>;
    return 1.0f;
  }
  vf8 run(int t, int sub) const { return dequant(t, sub, simd::codes8<K>(data + (int64_t)t * row_bytes, sub)); }

  // Channel runs come in pairs that unpack from the same bytes: pair P of
  // chunk c (channels 32c..32c+31) holds runs 4c + pair_sub(P, 0|1). For
  // int4 those are the low and high nibbles of 8 bytes; for int2 two of the
  // four crumbs; for byte kinds simply neighbours (so a pair also covers the
  // last 16 channels when head_dim is not a multiple of 32).
  static constexpr int pair_sub(int P, int i) {
    return kind_bits(K) == 4 ? P + 2 * i : 2 * P + i;
  }
  template <int P>
  void run_pair(int t, int c, vf8& a, vf8& b) const {
    constexpr int sa = pair_sub(P, 0), sb = pair_sub(P, 1);
    const uint8_t* row = data + (int64_t)t * row_bytes;
    if constexpr (kind_bits(K) == 4) {
      simd::vi8 x = simd::bytes8(row + 16 * c + 8 * P);
      a = dequant(t, 4 * c + sa, simd::field8<0, 15>(x));
      b = dequant(t, 4 * c + sb, simd::field8<4, 0>(x));
    } else if constexpr (kind_bits(K) == 2) {
      simd::vi8 x = simd::bytes8(row + 8 * c);
      a = dequant(t, 4 * c + sa, simd::field8<4 * P, 3>(x));
      b = dequant(t, 4 * c + sb, simd::field8<4 * P + 2, P ? 0 : 3>(x));
    } else {
      a = run(t, 4 * c + sa);
      b = run(t, 4 * c + sb);
    }
  }

  // Codes of run `sub` of token t, scaled (all but the per-token factor).
  vf8 dequant(int t, int sub, vf8 c) const {
    if constexpr (is_grouped(K)) {
      const float* p = meta + 2 * (t * groups + sub * 8 / group);
      return simd::fma8(c, simd::set8(p[0]), simd::set8(p[1]));
    } else if constexpr (is_per_channel(K)) {
      return simd::fma8(c, simd::load8(meta + 8 * sub), simd::load8(meta + head_dim + 8 * sub));
    } else {
      return c;
    }
  }
};

}  // namespace kvcomp
