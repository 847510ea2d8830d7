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
#include "ops/signatures.inc"
}  // namespace op
}  // namespace kvcomp

// Binds every op of the namespace in scope (`using namespace kvcomp::op` or
// kvcomp::cuda_op) to the STABLE_TORCH_LIBRARY_IMPL block's library m.
#define KVCOMP_IMPL_EVERY_OP(m)                                          \
  do {                                                                   \
    m.impl("quantize_write", TORCH_BOX(&quantize_write));                \
    m.impl("seal_blocks", TORCH_BOX(&seal_blocks));                      \
    m.impl("paged_decode_attention", TORCH_BOX(&paged_decode_attention)); \
    m.impl("merge_attention_states", TORCH_BOX(&merge_attention_states)); \
    m.impl("accumulate_scores", TORCH_BOX(&accumulate_scores));          \
    m.impl("heavy_hitter_topk", TORCH_BOX(&heavy_hitter_topk));          \
    m.impl("compact", TORCH_BOX(&compact));                              \
    m.impl("gather_dequant", TORCH_BOX(&gather_dequant));                \
  } while (0)
