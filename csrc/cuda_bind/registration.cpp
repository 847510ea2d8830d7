// CUDA implementations of every op (schemas: csrc/registration.cpp).
#include <torch/library.h>

#include "cuda_bind/ops.h"

TORCH_LIBRARY_IMPL(kvcomp, CUDA, m) {
  using namespace kvcomp::cuda_op;
  m.impl("quantize_write", &quantize_write);
  m.impl("seal_blocks", &seal_blocks);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("merge_attention_states", &merge_attention_states);
  m.impl("accumulate_scores", &accumulate_scores);
  m.impl("heavy_hitter_topk", &heavy_hitter_topk);
  m.impl("compact", &compact);
  m.impl("gather_dequant", &gather_dequant);
}
