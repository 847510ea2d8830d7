#include <algorithm>

#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

ScoresArgs prepare_accumulate_scores(const Tensor& logits, const Tensor& lse,
                                     const Tensor& seq_lens, Tensor& scores) {
  check_dtype(logits, "logits", {ScalarType::Float});
  check_dim(logits, "logits", 3, "[batch, num_heads, L]");
  check_dtype(lse, "lse", {ScalarType::Float});
  check_dim(lse, "lse", 2, "[batch, num_heads]");
  check_size(lse, "lse", 0, logits.size(0), "batch of logits");
  check_size(lse, "lse", 1, logits.size(1), "num_heads of logits");
  check_dtype(seq_lens, "seq_lens", {ScalarType::Int});
  check_dim(seq_lens, "seq_lens", 1, "[batch]");
  check_size(seq_lens, "seq_lens", 0, logits.size(0), "batch of logits");
  check_dtype(scores, "scores", {ScalarType::Float});
  check_dim(scores, "scores", 3, "[batch, num_kv_heads, L]");
  check_size(scores, "scores", 0, logits.size(0), "batch of logits");
  check_contiguous(scores, "scores");
  for (auto [t, name] : {std::pair{&lse, "lse"}, {&seq_lens, "seq_lens"}, {&scores, "scores"}})
    check_same_device(*t, name, logits, "logits");
  KVCOMP_CHECK(scores.size(1) > 0 && logits.size(1) % scores.size(1) == 0, "logits has ",
               logits.size(1), " query heads, not a multiple of scores' ", scores.size(1),
               " KV heads");
  return {contig(logits), contig(lse), contig(seq_lens)};
}

namespace op {

void accumulate_scores(const Tensor& logits, const Tensor& lse,
                       const Tensor& seq_lens, Tensor& scores) {
  ScoresArgs a = prepare_accumulate_scores(logits, lse, seq_lens, scores);
  accumulate_scores_cpu(a.logits.const_data_ptr<float>(), logits.size(2),
                        a.lse.const_data_ptr<float>(),
                        a.seq_lens.const_data_ptr<int32_t>(), logits.size(0), logits.size(1),
                        scores.mutable_data_ptr<float>(), scores.size(1), scores.size(2));
}

}  // namespace op
}  // namespace kvcomp
