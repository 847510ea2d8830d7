// Per-op argument checks shared by the CPU implementations (csrc/ops/<op>.cpp)
// and the CUDA bindings (csrc/cuda_bind/<op>.cpp): same rules, same messages.
// prepare_<op> checks shapes, dtypes, devices and formats (no data is read)
// and returns the contiguous tensors and raw structs the kernels take.
// validate_* are the data-dependent checks (ids, lengths, positions) for the
// CUDA bindings: csrc/cpu/checks.cpp run on host copies of the index tensors
// (the CPU kernels call those checks themselves).
#pragma once

#include <string>

#include "ops/common.h"

namespace kvcomp {

struct QuantizeWriteArgs {
  Pool pool;
  Tensor key, value, slots;  // contiguous
  DType dtype;
};
QuantizeWriteArgs prepare_quantize_write(const Tensor& key, const Tensor& value,
                                         Tensor& pool, const Tensor& slot_mapping,
                                         const std::string& format);

struct SealArgs {
  Pool hot, cold;
  Tensor src, dst;  // contiguous
};
SealArgs prepare_seal_blocks(const Tensor& hot_pool, const Tensor& src_blocks,
                             Tensor& cold_pool, const Tensor& dst_blocks,
                             const std::string& hot_format, const std::string& cold_format);

struct MergeArgs {
  Tensor a, lse_a, b, lse_b;  // contiguous, out_a's dtype
  int64_t rows, head_dim;
};
MergeArgs prepare_merge_attention_states(const Tensor& out_a, const Tensor& lse_a,
                                         const Tensor& out_b, const Tensor& lse_b);

struct ScoresArgs {
  Tensor logits, lse, seq_lens;  // contiguous
};
ScoresArgs prepare_accumulate_scores(const Tensor& logits, const Tensor& lse,
                                     const Tensor& seq_lens, Tensor& scores);

struct TopkArgs {
  Tensor scores, seq_lens;  // contiguous
  Tensor out;               // int32 [batch, num_kv_heads, k], uninitialized
};
TopkArgs prepare_heavy_hitter_topk(const Tensor& scores, const Tensor& seq_lens,
                                   int64_t k);

struct CompactArgs {
  Pool pool;
  BlockTables bt;  // ids: block_tables' data (device memory on CUDA)
  Tensor block_tables, keep;  // contiguous
};
CompactArgs prepare_compact(Tensor& pool, const Tensor& block_tables,
                            const Tensor& keep, const std::string& format);

struct GatherArgs {
  Pool pool;
  BlockTables bt;
  Tensor block_tables, seq_lens;  // contiguous
};
GatherArgs prepare_gather_dequant(const Tensor& pool, const Tensor& block_tables,
                                  const Tensor& seq_lens, const std::string& format,
                                  ScalarType dtype);

// int64 slots below the pool's num_blocks * block_size (negative ones skip).
void validate_slots(const Tensor& slots, int64_t num_slots);
// int32 block ids within [0, num_blocks); name is the argument's.
void validate_block_ids(const Tensor& ids, int64_t num_blocks, const char* name);
// seq_lens within [0, limit]; `what` says what limits them.
void validate_seq_lens(const Tensor& seq_lens, int64_t limit, const char* what);
// check_paged on host copies of block_tables and seq_lens.
void validate_paged(const Pool& pool, const BlockTables& bt, const Tensor& block_tables,
                    const Tensor& seq_lens);
// keep rows ascending, each kept position and destination in a named block.
void validate_keep(const Pool& pool, const BlockTables& bt, const Tensor& block_tables,
                   const Tensor& keep);

}  // namespace kvcomp
