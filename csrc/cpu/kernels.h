// CPU kernels of every op, on raw pointers: no torch here (the binding in
// csrc/ops/ adapts tensors). Each kernel validates the data it depends on
// (ids, lengths, finiteness) before its first write and throws ArgError.
#pragma once
#include <stdint.h>

#include <functional>

#include "kvcomp/args.h"

namespace kvcomp {

// at::parallel_for, supplied by the binding so kernels stay torch-free.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f);
int num_threads();
// parallel_for grain for items of about `work` elements each: small calls
// stay on the calling thread, since waking the pool (worse on a busy
// machine) costs more than they do.
constexpr int64_t kParallelWork = 1 << 15;
inline int64_t grain_for(int64_t work) {
  return work >= kParallelWork ? 1 : kParallelWork / (work > 0 ? work : 1);
}

// The data-dependent checks (csrc/cpu/checks.cpp), one implementation each:
// the CPU kernels call them, the CUDA bindings run them on host copies.
// slots below num_slots (negative ones skip).
void check_slots(const int64_t* slots, int64_t n, int64_t num_slots);
// ids within [0, num_blocks); name is the argument's.
void check_block_ids(const int32_t* ids, int64_t n, int64_t num_blocks, const char* name);
// seq_lens within [0, limit]; `what` says what limits them.
void check_seq_lens(const int32_t* seq_lens, int64_t n, int64_t limit, const char* what);
// seq_lens within [0, max_blocks * block_size]; the ids of used blocks in range.
void check_paged(const Pool& pool, const BlockTables& bt, const int32_t* seq_lens);
// keep rows [batch, num_heads, k]: non-negative entries strictly ascending,
// each (and each destination) inside a block the sequence's table names.
void check_keep(const Pool& pool, const BlockTables& bt, const int32_t* keep, int64_t k);

void quantize_write_cpu(const void* key, const void* value, DType dtype, int64_t num_tokens,
                        const int64_t* slots, const Pool& pool);

void seal_blocks_cpu(const Pool& hot, const int32_t* src, const Pool& cold, const int32_t* dst,
                     int64_t n);

void paged_decode_attention_cpu(const DecodeArgs& a);

void merge_attention_states_cpu(const float* out_a, const float* lse_a, const float* out_b,
                                const float* lse_b, int64_t rows, int64_t head_dim,
                                float* out, float* lse);

void accumulate_scores_cpu(const float* logits, int64_t logits_len, const float* lse,
                           const int32_t* seq_lens, int64_t batch, int64_t num_heads,
                           float* scores, int64_t num_kv_heads, int64_t scores_len);

void heavy_hitter_topk_cpu(const float* scores, int64_t rows, int64_t rows_per_batch,
                           int64_t len, const int32_t* seq_lens, int64_t k, int32_t* out);

void compact_cpu(const Pool& pool, const BlockTables& bt, const int32_t* keep, int64_t k);

void gather_dequant_cpu(const Pool& pool, const BlockTables& bt, const int32_t* seq_lens,
                        int64_t max_len, DType dtype, void* key, void* value);

}  // namespace kvcomp
