#include <string>

#include "cpu/kernels.h"

namespace kvcomp {

void check_paged(const Pool& pool, const BlockTables& bt, const int32_t* seq_lens) {
  const int64_t bs = pool.layout.block_size, cap = bt.max_blocks * bs;
  for (int64_t b = 0; b < bt.batch; ++b) {
    int64_t len = seq_lens[b];
    if (len < 0 || len > cap)
      throw ArgError("seq_lens[" + std::to_string(b) + "] = " + std::to_string(len) +
                     " is outside [0, " + std::to_string(cap) + "] (block_tables has " +
                     std::to_string(bt.max_blocks) + " blocks of " + std::to_string(bs) +
                     " tokens per sequence)");
    for (int64_t j = 0; j < (len + bs - 1) / bs; ++j) {
      int64_t id = bt.ids[b * bt.max_blocks + j];
      if (id < 0 || id >= pool.num_blocks)
        throw ArgError("block_tables[" + std::to_string(b) + ", " + std::to_string(j) + "] = " +
                       std::to_string(id) + " is not a block of the pool (num_blocks = " +
                       std::to_string(pool.num_blocks) + ")");
    }
  }
}

}  // namespace kvcomp
