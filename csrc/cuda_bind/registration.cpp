// CUDA implementations of every op (schemas: csrc/registration.cpp).
#include <torch/csrc/stable/library.h>

#include "cuda_bind/ops.h"

STABLE_TORCH_LIBRARY_IMPL(kvcomp, CUDA, m) {
  using namespace kvcomp::cuda_op;
  m.impl("quantize_write", TORCH_BOX(&quantize_write));
  m.impl("seal_blocks", TORCH_BOX(&seal_blocks));
  m.impl("paged_decode_attention", TORCH_BOX(&paged_decode_attention));
  m.impl("merge_attention_states", TORCH_BOX(&merge_attention_states));
  m.impl("accumulate_scores", TORCH_BOX(&accumulate_scores));
  m.impl("heavy_hitter_topk", TORCH_BOX(&heavy_hitter_topk));
  m.impl("compact", TORCH_BOX(&compact));
  m.impl("gather_dequant", TORCH_BOX(&gather_dequant));
}
