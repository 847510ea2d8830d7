#include <string>

#include "cpu/kernels.h"

namespace kvcomp {

namespace {
std::string at3(int64_t b, int64_t h, int64_t j) {
  return "[" + std::to_string(b) + ", " + std::to_string(h) + ", " + std::to_string(j) + "]";
}
}  // namespace

void check_slots(const int64_t* slots, int64_t n, int64_t num_slots) {
  for (int64_t i = 0; i < n; ++i)
    if (slots[i] >= num_slots)
      throw ArgError("slot_mapping[" + std::to_string(i) + "] = " + std::to_string(slots[i]) +
                     " is beyond the pool's " + std::to_string(num_slots) + " slots");
}

void check_block_ids(const int32_t* ids, int64_t n, int64_t num_blocks, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= num_blocks)
      throw ArgError(std::string(name) + "[" + std::to_string(i) + "] = " +
                     std::to_string(ids[i]) + " is not a block of the pool (num_blocks = " +
                     std::to_string(num_blocks) + ")");
}

void check_seq_lens(const int32_t* seq_lens, int64_t n, int64_t limit, const char* what) {
  for (int64_t b = 0; b < n; ++b)
    if (seq_lens[b] < 0 || seq_lens[b] > limit)
      throw ArgError("seq_lens[" + std::to_string(b) + "] = " + std::to_string(seq_lens[b]) +
                     " is outside [0, " + std::to_string(limit) + "] (" + what + ")");
}

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
          throw ArgError("keep" + at3(b, h, j) + " = " + std::to_string(p) +
                         ": positions must be strictly ascending");
        if (p >= cap)
          throw ArgError("keep" + at3(b, h, j) + " = " + std::to_string(p) +
                         " is beyond the sequence's " + std::to_string(cap) + " slots");
        if (!block_ok(b, p) || !block_ok(b, n))
          throw ArgError("block_tables[" + std::to_string(b) + "] names no valid block for keep" +
                         at3(b, h, j) + " (num_blocks = " + std::to_string(pool.num_blocks) + ")");
        prev = p;
        ++n;
      }
    }
}

}  // namespace kvcomp
