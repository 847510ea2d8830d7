#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

MergeArgs prepare_merge_attention_states(const at::Tensor& out_a, const at::Tensor& lse_a,
                                         const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_float_activation(out_a, "out_a");
  TORCH_CHECK_VALUE(out_a.dim() >= 1, "out_a must have a head_dim dimension");
  TORCH_CHECK_VALUE(out_b.sizes() == out_a.sizes(), "out_b has shape ", out_b.sizes(),
                    " but out_a has shape ", out_a.sizes());
  TORCH_CHECK_VALUE(out_b.scalar_type() == out_a.scalar_type(), "out_b has dtype ",
                    out_b.scalar_type(), " but out_a has dtype ", out_a.scalar_type());
  auto rows_shape = out_a.sizes().slice(0, out_a.dim() - 1);
  for (auto [t, name] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}}) {
    check_dtype(*t, name, {at::kFloat});
    TORCH_CHECK_VALUE(t->sizes() == rows_shape, name, " has shape ", t->sizes(),
                      " but must be out_a's shape without head_dim, ", rows_shape);
  }
  for (auto [t, name] : {std::pair{&lse_a, "lse_a"}, {&out_b, "out_b"}, {&lse_b, "lse_b"}})
    check_same_device(*t, name, out_a, "out_a");
  const int64_t hd = out_a.size(-1);
  return {out_a.contiguous(), lse_a.contiguous(), out_b.contiguous(), lse_b.contiguous(),
          lse_a.numel(), hd};
}

namespace op {

std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& out_a,
                                                          const at::Tensor& lse_a,
                                                          const at::Tensor& out_b,
                                                          const at::Tensor& lse_b) {
  MergeArgs m = prepare_merge_attention_states(out_a, lse_a, out_b, lse_b);
  at::Tensor a = m.a.to(at::kFloat).contiguous(), b = m.b.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(a), lse = at::empty_like(m.lse_a);
  merge_attention_states_cpu(a.data_ptr<float>(), m.lse_a.data_ptr<float>(), b.data_ptr<float>(),
                             m.lse_b.data_ptr<float>(), m.rows, m.head_dim, out.data_ptr<float>(),
                             lse.data_ptr<float>());
  return {out.to(out_a.scalar_type()), lse};
}

}  // namespace op
}  // namespace kvcomp
