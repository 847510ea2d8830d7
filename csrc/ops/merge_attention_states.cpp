#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

MergeArgs prepare_merge_attention_states(const Tensor& out_a, const Tensor& lse_a,
                                         const Tensor& out_b, const Tensor& lse_b) {
  check_float_activation(out_a, "out_a");
  KVCOMP_CHECK(out_a.dim() >= 1, "out_a must have a head_dim dimension");
  KVCOMP_CHECK(same_shape(out_b, out_a), "out_b has shape ", Shape{out_b},
               " but out_a has shape ", Shape{out_a});
  KVCOMP_CHECK(out_b.scalar_type() == out_a.scalar_type(), "out_b has dtype ",
               out_b.scalar_type(), " but out_a has dtype ", out_a.scalar_type());
  for (auto [t, name] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}}) {
    check_dtype(*t, name, {ScalarType::Float});
    bool rows = t->dim() == out_a.dim() - 1;
    for (int64_t d = 0; rows && d < t->dim(); ++d) rows = t->size(d) == out_a.size(d);
    KVCOMP_CHECK(rows, name, " has shape ", Shape{*t}, " but must be out_a's shape ",
                 Shape{out_a}, " without head_dim");
  }
  for (auto [t, name] : {std::pair{&lse_a, "lse_a"}, {&out_b, "out_b"}, {&lse_b, "lse_b"}})
    check_same_device(*t, name, out_a, "out_a");
  const int64_t hd = out_a.size(-1);
  return {contig(out_a), contig(lse_a), contig(out_b), contig(lse_b),
          lse_a.numel(), hd};
}

namespace op {

std::tuple<Tensor, Tensor> merge_attention_states(const Tensor& out_a,
                                                  const Tensor& lse_a,
                                                  const Tensor& out_b,
                                                  const Tensor& lse_b) {
  MergeArgs m = prepare_merge_attention_states(out_a, lse_a, out_b, lse_b);
  Tensor a = contig(to_dtype(m.a, ScalarType::Float)), b = contig(to_dtype(m.b, ScalarType::Float));
  Tensor out = empty_as(a), lse = empty_as(m.lse_a);
  merge_attention_states_cpu(a.const_data_ptr<float>(), m.lse_a.const_data_ptr<float>(),
                             b.const_data_ptr<float>(), m.lse_b.const_data_ptr<float>(), m.rows,
                             m.head_dim, out.mutable_data_ptr<float>(),
                             lse.mutable_data_ptr<float>());
  return {to_dtype(out, out_a.scalar_type()), lse};
}

}  // namespace op
}  // namespace kvcomp
