#include <string>
#include <vector>

#include "cpu/codec.h"

namespace kvcomp {

void quantize_write_cpu(const void* key, const void* value, DType dtype, int64_t num_tokens,
                        const int64_t* slots, const Pool& pool) {
  const TileLayout& L = pool.layout;
  const int hd = L.head_dim, heads = pool.num_heads;
  const int64_t row = (int64_t)heads * hd, num_slots = pool.num_blocks * L.block_size;
  // Validate everything first: a rejected call writes nothing.
  check_slots(slots, num_tokens, num_slots);
  parallel_for(num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(row);
    for (int64_t i = begin; i < end; ++i) {
      if (slots[i] < 0) continue;
      for (int side = 0; side < 2; ++side) {
        const void* src = side ? value : key;
        const Section& s = side ? L.v : L.k;
        load_activations(src, dtype, i * row, row, x.data());
        if (!row_storable(s.fmt, hd, x.data(), (int)row))
          throw ArgError(std::string(side ? "value" : "key") + "[" + std::to_string(i) +
                         "] holds NaN or Inf, or a value beyond +-" + limit_str(s.fmt, hd) +
                         " (the largest its format stores)");
      }
    }
  });
  parallel_for(num_tokens * heads, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> x(hd);
    for (int64_t w = begin; w < end; ++w) {
      int64_t i = w / heads;
      int h = (int)(w % heads);
      if (slots[i] < 0) continue;
      uint8_t* tile = pool.tile(slots[i] / L.block_size, h);
      int t = (int)(slots[i] % L.block_size);
      for (int side = 0; side < 2; ++side) {
        const void* src = side ? value : key;
        load_activations(src, dtype, i * row + h * hd, hd, x.data());
        encode_row(side ? L.v : L.k, tile, t, x.data(), hd);
      }
    }
  });
}

}  // namespace kvcomp
