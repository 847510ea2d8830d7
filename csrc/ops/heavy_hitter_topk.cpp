#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

TopkArgs prepare_heavy_hitter_topk(const at::Tensor& scores, const at::Tensor& seq_lens,
                                   int64_t k) {
  TORCH_CHECK_VALUE(k > 0, "k must be positive, got ", k);
  check_dtype(scores, "scores", {at::kFloat});
  check_dim(scores, "scores", 3, "[batch, num_kv_heads, L]");
  check_dtype(seq_lens, "seq_lens", {at::kInt});
  check_dim(seq_lens, "seq_lens", 1, "[batch]");
  check_size(seq_lens, "seq_lens", 0, scores.size(0), "batch of scores");
  check_same_device(seq_lens, "seq_lens", scores, "scores");
  at::Tensor out = at::empty({scores.size(0), scores.size(1), k}, scores.options().dtype(at::kInt));
  return {scores.contiguous(), seq_lens.contiguous(), out};
}

namespace op {

at::Tensor heavy_hitter_topk(const at::Tensor& scores, const at::Tensor& seq_lens, int64_t k) {
  TopkArgs a = prepare_heavy_hitter_topk(scores, seq_lens, k);
  const at::Tensor& s = a.scores;
  guarded([&] {
    heavy_hitter_topk_cpu(s.data_ptr<float>(), s.size(0) * s.size(1), s.size(1), s.size(2),
                          a.seq_lens.data_ptr<int32_t>(), k, a.out.data_ptr<int32_t>());
  });
  return a.out;
}

}  // namespace op
}  // namespace kvcomp
