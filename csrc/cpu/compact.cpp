#include <vector>

#include "cpu/codec.h"

namespace kvcomp {

void compact_cpu(const Pool& pool, const BlockTables& bt, const int32_t* keep, int64_t k) {
  check_keep(pool, bt, keep, k);
  const TileLayout& L = pool.layout;
  const int hd = L.head_dim, bs = L.block_size, heads = pool.num_heads;
  parallel_for(bt.batch * heads, grain_for(k * hd), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> src;
    std::vector<float> x;
    for (int64_t w = begin; w < end; ++w) {
      int64_t b = w / heads;
      int h = (int)(w % heads);
      const int32_t* row = keep + w * k;
      auto tile = [&](int64_t pos) { return pool.tile(bt.ids[b * bt.max_blocks + pos / bs], h); };
      src.clear();
      for (int64_t j = 0; j < k; ++j)
        if (row[j] >= 0) src.push_back(row[j]);
      const int64_t n = (int64_t)src.size();
      for (int side = 0; side < 2; ++side) {
        const Section& s = side ? L.v : L.k;
        if (!is_per_channel(s.fmt.kind)) {
          // Ascending sources never lie below their destination: copy in order.
          for (int64_t j = 0; j < n; ++j)
            if (src[j] != j) copy_token(s, tile(src[j]), (int)(src[j] % bs), tile(j), (int)(j % bs));
          continue;
        }
        // Per-channel scales span a block: decode every kept token first,
        // then re-quantize each destination block whose tokens changed.
        x.resize((size_t)n * hd);
        for (int64_t j = 0; j < n; ++j)
          decode_row(s, tile(src[j]), (int)(src[j] % bs), hd, &x[(size_t)j * hd]);
        for (int64_t first = 0; first < n; first += bs) {
          int64_t cnt = std::min<int64_t>(bs, n - first);
          bool same = true;
          for (int64_t j = first; j < first + cnt; ++j) same &= src[j] == j;
          if (!same) encode_block(s, tile(first), &x[(size_t)first * hd], (int)cnt, hd, bs);
        }
      }
    }
  });
}

}  // namespace kvcomp
