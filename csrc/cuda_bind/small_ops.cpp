// merge_attention_states, accumulate_scores and heavy_hitter_topk on CUDA.
#include <algorithm>

#include "cuda/launch.h"
#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/prepare.h"

namespace kvcomp::cuda_op {

std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& out_a,
                                                          const at::Tensor& lse_a,
                                                          const at::Tensor& out_b,
                                                          const at::Tensor& lse_b) {
  MergeArgs m = prepare_merge_attention_states(out_a, lse_a, out_b, lse_b);
  const c10::cuda::CUDAGuard guard(out_a.device());
  at::Tensor out = at::empty_like(m.a), lse = at::empty_like(m.lse_a);
  C10_CUDA_CHECK(cuda::merge_attention_states(
      m.a.data_ptr(), m.lse_a.data_ptr<float>(), m.b.data_ptr(), m.lse_b.data_ptr<float>(), m.rows,
      m.head_dim, dtype_of(out_a.scalar_type()), out.data_ptr(), lse.data_ptr<float>(), stream()));
  return {out, lse};
}

void accumulate_scores(const at::Tensor& logits, const at::Tensor& lse,
                       const at::Tensor& seq_lens, at::Tensor& scores) {
  ScoresArgs a = prepare_accumulate_scores(logits, lse, seq_lens, scores);
  const c10::cuda::CUDAGuard guard(logits.device());
  if (host_checks())
    validate_seq_lens(a.seq_lens, std::min(logits.size(2), scores.size(2)),
                      "the length of logits and scores");
  C10_CUDA_CHECK(cuda::accumulate_scores(a.logits.data_ptr<float>(), logits.size(2),
                                         a.lse.data_ptr<float>(), a.seq_lens.data_ptr<int32_t>(),
                                         logits.size(0), logits.size(1), scores.data_ptr<float>(),
                                         scores.size(1), scores.size(2), stream()));
}

at::Tensor heavy_hitter_topk(const at::Tensor& scores, const at::Tensor& seq_lens, int64_t k) {
  TopkArgs a = prepare_heavy_hitter_topk(scores, seq_lens, k);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor& s = a.scores;
  TORCH_CHECK_VALUE(s.size(2) <= INT32_MAX, "scores has ", s.size(2),
                    " positions per row; positions are int32");
  if (s.size(1) > 0 && host_checks())
    validate_seq_lens(a.seq_lens, s.size(2), "the length of scores");
  C10_CUDA_CHECK(cuda::heavy_hitter_topk(s.data_ptr<float>(), s.size(0) * s.size(1), s.size(1),
                                         s.size(2), a.seq_lens.data_ptr<int32_t>(), k,
                                         a.out.data_ptr<int32_t>(), stream()));
  return a.out;
}

}  // namespace kvcomp::cuda_op
