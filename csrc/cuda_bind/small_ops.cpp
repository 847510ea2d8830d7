// merge_attention_states, accumulate_scores and heavy_hitter_topk on CUDA.
#include <algorithm>

#include "cuda/launch.h"
#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/prepare.h"

namespace kvcomp::cuda_op {

std::tuple<Tensor, Tensor> merge_attention_states(const Tensor& out_a,
                                                  const Tensor& lse_a,
                                                  const Tensor& out_b,
                                                  const Tensor& lse_b) {
  MergeArgs m = prepare_merge_attention_states(out_a, lse_a, out_b, lse_b);
  const Guard guard(out_a);
  Tensor out = empty_as(m.a), lse = empty_as(m.lse_a);
  KVCOMP_CUDA_CHECK(cuda::merge_attention_states(
      m.a.const_data_ptr(), m.lse_a.const_data_ptr<float>(), m.b.const_data_ptr(),
      m.lse_b.const_data_ptr<float>(), m.rows, m.head_dim, dtype_of(out_a.scalar_type()),
      out.mutable_data_ptr(), lse.mutable_data_ptr<float>(), stream()));
  return {out, lse};
}

void accumulate_scores(const Tensor& logits, const Tensor& lse,
                       const Tensor& seq_lens, Tensor& scores) {
  ScoresArgs a = prepare_accumulate_scores(logits, lse, seq_lens, scores);
  const Guard guard(logits);
  if (host_checks())
    validate_seq_lens(a.seq_lens, std::min(logits.size(2), scores.size(2)),
                      "the length of logits and scores");
  KVCOMP_CUDA_CHECK(cuda::accumulate_scores(a.logits.const_data_ptr<float>(), logits.size(2),
                                            a.lse.const_data_ptr<float>(), a.seq_lens.const_data_ptr<int32_t>(),
                                            logits.size(0), logits.size(1), scores.mutable_data_ptr<float>(),
                                            scores.size(1), scores.size(2), stream()));
}

Tensor heavy_hitter_topk(const Tensor& scores, const Tensor& seq_lens, int64_t k) {
  TopkArgs a = prepare_heavy_hitter_topk(scores, seq_lens, k);
  const Guard guard(scores);
  const Tensor& s = a.scores;
  KVCOMP_CHECK(s.size(2) <= INT32_MAX, "scores has ", s.size(2),
               " positions per row; positions are int32");
  if (s.size(1) > 0 && host_checks())
    validate_seq_lens(a.seq_lens, s.size(2), "the length of scores");
  KVCOMP_CUDA_CHECK(cuda::heavy_hitter_topk(s.const_data_ptr<float>(), s.size(0) * s.size(1),
                                            s.size(1), s.size(2), a.seq_lens.const_data_ptr<int32_t>(), k,
                                            a.out.mutable_data_ptr<int32_t>(), stream()));
  return a.out;
}

}  // namespace kvcomp::cuda_op
