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
  vf8 run(int t, int sub) const {
    vf8 c = simd::codes8<K>(data + (int64_t)t * row_bytes, sub);
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
