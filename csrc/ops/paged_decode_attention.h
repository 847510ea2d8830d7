// Argument checks of paged_decode_attention shared by the CPU implementation
// (ops/paged_decode_attention.cpp) and the CUDA binding: same rules, same
// messages (see ops/prepare.h for the other ops).
#pragma once

#include <optional>
#include <string>

#include "ops/common.h"

namespace kvcomp {

struct PagedDecodeArgs {
  Pool pool;
  BlockTables bt;                     // ids: block_tables' data (device memory on CUDA)
  Tensor block_tables, seq_lens;  // contiguous
  bool with_logits;                   // logits_out given (its data may be null when empty)
  float* logits;                      // logits_out's data, or null
  int64_t logits_len;
};

// Shapes, dtypes, devices, format, scale and softcap; reads no tensor data.
PagedDecodeArgs prepare_paged_decode(const Tensor& query, const Tensor& pool,
                                     const Tensor& block_tables, const Tensor& seq_lens,
                                     const std::string& format, double scale,
                                     const std::optional<Tensor>& logits_out, double softcap);

// logits_out has room for the longest sequence (reads seq_lens on the host).
void validate_logits_len(const Tensor& seq_lens, int64_t logits_len);

}  // namespace kvcomp
