// Torch-free argument structs shared by the CPU kernels (csrc/cpu/) and the
// CUDA launchers (csrc/cuda/); plain C++ that nvcc compiles too.
#pragma once
#include <stdint.h>

#include <stdexcept>

#include "kvcomp/format.h"

namespace kvcomp {

// A rejected argument; the bindings turn it into ValueError.
struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

enum class DType : uint8_t { F32, F16, BF16 };

struct Pool {
  uint8_t* data;  // [num_blocks, num_heads, tile_bytes], contiguous
  int64_t num_blocks;
  int num_heads;
  int64_t tile_bytes;
  TileLayout layout;
  KVC_HD uint8_t* tile(int64_t block, int head) const {
    return data + (block * num_heads + head) * tile_bytes;
  }
};

struct BlockTables {
  const int32_t* ids;  // [batch, max_blocks], contiguous
  int64_t batch;
  int64_t max_blocks;
};

struct DecodeArgs {
  const float* query;  // [batch, num_heads, head_dim]
  int num_heads;
  float scale;
  const Pool* pool;
  BlockTables bt;
  const int32_t* seq_lens;
  float* out;        // [batch, num_heads, head_dim]
  float* lse;        // [batch, num_heads]
  float* logits;     // [batch, num_heads, logits_len] or null
  int64_t logits_len;
  float softcap;     // > 0: logits become softcap * tanh(logit / softcap) (Gemma 2); 0: none
};

}  // namespace kvcomp
