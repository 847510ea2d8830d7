// The tensor-level ops of CONTRACT.md §3 (registered in registration.cpp).
// Each op file holds the argument checks, shared by every device, and the
// CPU implementation that calls the kernel in csrc/cpu/.
#pragma once
#include "ops/common.h"

#include <optional>
#include <string>
#include <tuple>

namespace kvcomp {
namespace op {

void quantize_write(const Tensor& key, const Tensor& value, Tensor& pool,
                    const Tensor& slot_mapping, const std::string& format);

void seal_blocks(const Tensor& hot_pool, const Tensor& src_blocks, Tensor& cold_pool,
                 const Tensor& dst_blocks, const std::string& hot_format,
                 const std::string& cold_format);

std::tuple<Tensor, Tensor> paged_decode_attention(
    const Tensor& query, const Tensor& pool, const Tensor& block_tables,
    const Tensor& seq_lens, const std::string& format, double scale,
    const std::optional<Tensor>& logits_out);

std::tuple<Tensor, Tensor> merge_attention_states(const Tensor& out_a,
                                                  const Tensor& lse_a,
                                                  const Tensor& out_b,
                                                  const Tensor& lse_b);

void accumulate_scores(const Tensor& logits, const Tensor& lse,
                       const Tensor& seq_lens, Tensor& scores);

Tensor heavy_hitter_topk(const Tensor& scores, const Tensor& seq_lens, int64_t k);

void compact(Tensor& pool, const Tensor& block_tables, const Tensor& keep,
             const std::string& format);

std::tuple<Tensor, Tensor> gather_dequant(const Tensor& pool,
                                          const Tensor& block_tables,
                                          const Tensor& seq_lens,
                                          const std::string& format,
                                          ScalarType dtype);

}  // namespace op
}  // namespace kvcomp
