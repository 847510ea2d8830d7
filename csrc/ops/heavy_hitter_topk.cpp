#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

TopkArgs prepare_heavy_hitter_topk(const Tensor& scores, const Tensor& seq_lens,
                                   int64_t k) {
  KVCOMP_CHECK(k > 0, "k must be positive, got ", k);
  check_dtype(scores, "scores", {ScalarType::Float});
  check_dim(scores, "scores", 3, "[batch, num_kv_heads, L]");
  check_dtype(seq_lens, "seq_lens", {ScalarType::Int});
  check_dim(seq_lens, "seq_lens", 1, "[batch]");
  check_size(seq_lens, "seq_lens", 0, scores.size(0), "batch of scores");
  check_same_device(seq_lens, "seq_lens", scores, "scores");
  Tensor out = empty_on(scores, {scores.size(0), scores.size(1), k}, ScalarType::Int);
  return {contig(scores), contig(seq_lens), out};
}

namespace op {

Tensor heavy_hitter_topk(const Tensor& scores, const Tensor& seq_lens, int64_t k) {
  TopkArgs a = prepare_heavy_hitter_topk(scores, seq_lens, k);
  const Tensor& s = a.scores;
  heavy_hitter_topk_cpu(s.const_data_ptr<float>(), s.size(0) * s.size(1), s.size(1), s.size(2),
                        a.seq_lens.const_data_ptr<int32_t>(), k, a.out.mutable_data_ptr<int32_t>());
  return a.out;
}

}  // namespace op
}  // namespace kvcomp
