// Launcher of paged decode attention on CUDA (flash-decoding over the paged,
// compressed pool). No torch: raw device pointers, sizes and the stream.
#pragma once
#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "kvcomp/args.h"

namespace kvcomp {
namespace cuda {

struct DecodeParams {
  const void* query;  // [batch, num_heads, head_dim] in dtype, contiguous
  DType dtype;        // of query and out
  int num_heads;      // a multiple of pool.num_heads
  float scale;
  Pool pool;          // device memory, 16-byte aligned; head_dim 64, 128 or 256
  BlockTables bt;     // ids: device memory
  const int32_t* seq_lens;  // [batch], device memory
  void* out;          // [batch, num_heads, head_dim] in dtype
  float* lse;         // [batch, num_heads], natural log
  float* logits;      // [batch, num_heads, logits_len] or null
  int64_t logits_len;
  int num_sms;        // of the device: the split count depends on it
  float softcap;      // > 0: logits become softcap * tanh(logit / softcap) (Gemma 2); 0: none
};

bool paged_decode_head_dim_ok(int head_dim);

// Scratch the launch needs (0 when no sequence is split). Depends only on
// sizes known on the host (batch, heads, head_dim, max_blocks, block_size,
// num_sms, formats), never on seq_lens, so a launch can be graph-captured.
size_t paged_decode_workspace_bytes(const DecodeParams& p);

// Writes out and lse for every (sequence, head); seq_len 0 gives out 0 and
// lse -inf. Block ids outside [0, num_blocks) are never read: their tokens
// are skipped (logits -inf). workspace: paged_decode_workspace_bytes(p)
// bytes, 16-byte aligned. No host synchronization.
cudaError_t paged_decode_attention(const DecodeParams& p, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace kvcomp
