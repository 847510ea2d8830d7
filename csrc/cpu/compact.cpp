#include <string>
#include <vector>

#include "cpu/codec.h"

namespace kvcomp {

namespace {

std::string at(int64_t b, int64_t h, int64_t j) {
  return "[" + std::to_string(b) + ", " + std::to_string(h) + ", " + std::to_string(j) + "]";
}

// keep rows: non-negative entries strictly ascending, each (and each
// destination) inside a block the sequence's table names.
void check_keep(const Pool& pool, const BlockTables& bt, const int32_t* keep, int64_t k) {
  const int64_t bs = pool.layout.block_size, cap = bt.max_blocks * bs;
  auto block_ok = [&](int64_t b, int64_t pos) {
    int32_t id = bt.ids[b * bt.max_blocks + pos / bs];
    return id >= 0 && id < pool.num_blocks;
  };
  for (int64_t b = 0; b < bt.batch; ++b)
    for (int64_t h = 0; h < pool.num_heads; ++h) {
      const int32_t* row = keep + (b * pool.num_heads + h) * k;
      int64_t n = 0, prev = -1;
      for (int64_t j = 0; j < k; ++j) {
        int64_t p = row[j];
        if (p < 0) continue;
        if (p <= prev)
          throw ArgError("keep" + at(b, h, j) + " = " + std::to_string(p) +
                         ": positions must be strictly ascending");
        if (p >= cap)
          throw ArgError("keep" + at(b, h, j) + " = " + std::to_string(p) +
                         " is beyond the sequence's " + std::to_string(cap) + " slots");
        if (!block_ok(b, p) || !block_ok(b, n))
          throw ArgError("block_tables[" + std::to_string(b) + "] names no valid block for keep" +
                         at(b, h, j) + " (num_blocks = " + std::to_string(pool.num_blocks) + ")");
        prev = p;
        ++n;
      }
    }
}

}  // namespace

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
            if (src[j] != j) copy_token(s, tile(src[j]), (int)(src[j] % bs), tile(j), (int)(j % bs), hd);
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
