// CUDA implementations of the ops of csrc/ops/ops.h, same signatures,
// registered for the CUDA dispatch key in registration.cpp. Compiled only
// when torch has CUDA. Each checks its arguments with csrc/ops/prepare.h
// and launches a kernel of csrc/cuda/ on the current stream.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace kvcomp {
namespace cuda_op {

void quantize_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& pool,
                    const at::Tensor& slot_mapping, const std::string& format);

void seal_blocks(const at::Tensor& hot_pool, const at::Tensor& src_blocks, at::Tensor& cold_pool,
                 const at::Tensor& dst_blocks, const std::string& hot_format,
                 const std::string& cold_format);

std::tuple<at::Tensor, at::Tensor> paged_decode_attention(
    const at::Tensor& query, const at::Tensor& pool, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, const std::string& format, double scale,
    const std::optional<at::Tensor>& logits_out);

std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& out_a,
                                                          const at::Tensor& lse_a,
                                                          const at::Tensor& out_b,
                                                          const at::Tensor& lse_b);

void accumulate_scores(const at::Tensor& logits, const at::Tensor& lse,
                       const at::Tensor& seq_lens, at::Tensor& scores);

at::Tensor heavy_hitter_topk(const at::Tensor& scores, const at::Tensor& seq_lens, int64_t k);

void compact(at::Tensor& pool, const at::Tensor& block_tables, const at::Tensor& keep,
             const std::string& format);

std::tuple<at::Tensor, at::Tensor> gather_dequant(const at::Tensor& pool,
                                                  const at::Tensor& block_tables,
                                                  const at::Tensor& seq_lens,
                                                  const std::string& format,
                                                  at::ScalarType dtype);

}  // namespace cuda_op
}  // namespace kvcomp
