#include <string.h>

#include <vector>

#include "cpu/codec.h"

namespace kvcomp {

void gather_dequant_cpu(const Pool& pool, const BlockTables& bt, const int32_t* seq_lens,
                        int64_t max_len, DType dtype, void* key, void* value) {
  check_paged(pool, bt, seq_lens);
  const TileLayout& L = pool.layout;
  const int hd = L.head_dim, bs = L.block_size, heads = pool.num_heads;
  const int64_t blocks = (max_len + bs - 1) / bs;
  // One work item per (sequence, head, block); positions past seq_len are zero.
  parallel_for(bt.batch * heads * blocks, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> x(hd);
    for (int64_t w = begin; w < end; ++w) {
      int64_t b = w / (heads * blocks), h = w / blocks % heads, j = w % blocks;
      for (int t = 0; t < bs && j * bs + t < max_len; ++t) {
        int64_t pos = j * bs + t, base = ((b * heads + h) * max_len + pos) * hd;
        for (int side = 0; side < 2; ++side) {
          void* dst = side ? value : key;
          if (pos < seq_lens[b])
            decode_row(side ? L.v : L.k, pool.tile(bt.ids[b * bt.max_blocks + j], (int)h), t, hd,
                       x.data());
          else
            memset(x.data(), 0, hd * sizeof(float));
          store_activations(x.data(), hd, dtype, dst, base);
        }
      }
    }
  });
}

}  // namespace kvcomp
