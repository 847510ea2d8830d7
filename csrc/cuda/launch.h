// Launchers of the CUDA kernels (one .cu per op): raw device pointers, sizes
// and the stream; no torch. Each returns the launch error (cudaGetLastError)
// and never synchronizes. Kernels are bounds-safe on their own: a slot, block
// id or position outside the pool or block table is skipped (its outputs, if
// any, zeroed), never read or written; the bindings validate before launching.
// The decode-attention launcher is in paged_decode_attention.h.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "kvcomp/args.h"

namespace kvcomp {
namespace cuda {

// key/value [num_tokens, pool.num_heads, head_dim] in dtype, contiguous and
// 16-byte aligned; slots int64 [num_tokens].
cudaError_t quantize_write(const void* key, const void* value, DType dtype, int64_t num_tokens,
                           const int64_t* slots, const Pool& pool, cudaStream_t stream);

// Pre-pass for the checks: *first_bad (preset to UINT64_MAX) becomes the
// smallest 2 * token + side (side 0 key, 1 value) over tokens with a slot >= 0
// whose row holds a value its side cannot store (format.h storable).
cudaError_t find_unstorable_tokens(const void* key, const void* value, DType dtype,
                                   int64_t num_tokens, int num_heads, int head_dim,
                                   const int64_t* slots, ElemFormat k_fmt, ElemFormat v_fmt,
                                   unsigned long long* first_bad, cudaStream_t stream);

// Whole hot blocks src[i] -> cold blocks dst[i], i < n.
cudaError_t seal_blocks(const Pool& hot, const int32_t* src, const Pool& cold, const int32_t* dst,
                        int64_t n, cudaStream_t stream);

// Pre-pass: *first_bad (preset to UINT64_MAX) becomes the smallest
// ((i * num_heads + head) * 2 + side) * block_size + token over hot values
// that cold's kinds cannot store.
cudaError_t find_unstorable_blocks(const Pool& hot, const int32_t* src, int64_t n, ElemFormat k_cold,
                                   ElemFormat v_cold, unsigned long long* first_bad,
                                   cudaStream_t stream);

// out_a/out_b/out [rows, head_dim] in dtype; lse_* fp32 [rows].
cudaError_t merge_attention_states(const void* out_a, const float* lse_a, const void* out_b,
                                   const float* lse_b, int64_t rows, int64_t head_dim,
                                   DType dtype, void* out, float* lse, cudaStream_t stream);

// logits [batch, num_heads, logits_len], lse [batch, num_heads],
// scores [batch, num_kv_heads, scores_len] (+= in place).
cudaError_t accumulate_scores(const float* logits, int64_t logits_len, const float* lse,
                              const int32_t* seq_lens, int64_t batch, int64_t num_heads,
                              float* scores, int64_t num_kv_heads, int64_t scores_len,
                              cudaStream_t stream);

// scores [rows, len] (rows_per_batch rows share seq_lens[row / rows_per_batch]);
// out int32 [rows, k]. len < 2^31.
cudaError_t heavy_hitter_topk(const float* scores, int64_t rows, int64_t rows_per_batch,
                              int64_t len, const int32_t* seq_lens, int64_t k, int32_t* out,
                              cudaStream_t stream);

// workspace: int32 [bt.batch * pool.num_heads * k], scratch.
cudaError_t compact(const Pool& pool, const BlockTables& bt, const int32_t* keep, int64_t k,
                    int32_t* workspace, cudaStream_t stream);

// key/value [bt.batch, pool.num_heads, max_len, head_dim] in dtype.
cudaError_t gather_dequant(const Pool& pool, const BlockTables& bt, const int32_t* seq_lens,
                           int64_t max_len, DType dtype, void* key, void* value,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace kvcomp
