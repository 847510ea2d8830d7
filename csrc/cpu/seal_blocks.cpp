#include <string>
#include <vector>

#include "cpu/codec.h"

namespace kvcomp {

void seal_blocks_cpu(const Pool& hot, const int32_t* src, const Pool& cold, const int32_t* dst,
                     int64_t n) {
  check_block_ids(src, n, hot.num_blocks, "src_blocks");
  check_block_ids(dst, n, cold.num_blocks, "dst_blocks");
  const int hd = hot.layout.head_dim, bs = hot.layout.block_size;
  // A hot block holding NaN/Inf is rejected before anything is written.
  parallel_for(n * hot.num_heads, grain_for(2 * bs * hd), [&](int64_t begin, int64_t end) {
    std::vector<float> x(hd);
    for (int64_t w = begin; w < end; ++w) {
      int64_t i = w / hot.num_heads;
      for (int side = 0; side < 2; ++side)
        for (int t = 0; t < bs; ++t) {
          decode_row(side ? hot.layout.v : hot.layout.k, hot.tile(src[i], (int)(w % hot.num_heads)),
                     t, hd, x.data());
          if (!row_storable(side ? cold.layout.v.fmt : cold.layout.k.fmt, hd, x.data(), hd))
            throw ArgError("hot_pool block src_blocks[" + std::to_string(i) + "] = " +
                           std::to_string(src[i]) + " holds NaN or Inf, or a value beyond +-" +
                           limit_str(side ? cold.layout.v.fmt : cold.layout.k.fmt, hd) + " (token " +
                           std::to_string(t) + ")");
        }
    }
  });
  parallel_for(n * hot.num_heads, grain_for(2 * bs * hd), [&](int64_t begin, int64_t end) {
    std::vector<float> x((size_t)bs * hd);
    for (int64_t w = begin; w < end; ++w) {
      int64_t i = w / hot.num_heads;
      int h = (int)(w % hot.num_heads);
      const uint8_t* in = hot.tile(src[i], h);
      uint8_t* out = cold.tile(dst[i], h);
      for (int side = 0; side < 2; ++side) {
        const Section& hs = side ? hot.layout.v : hot.layout.k;
        for (int t = 0; t < bs; ++t) decode_row(hs, in, t, hd, &x[(size_t)t * hd]);
        encode_block(side ? cold.layout.v : cold.layout.k, out, x.data(), bs, hd, bs);
      }
    }
  });
}

}  // namespace kvcomp
