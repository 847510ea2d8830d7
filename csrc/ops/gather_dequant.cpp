#include "ops/common.h"
#include "ops/ops.h"

namespace kvcomp::op {

std::tuple<at::Tensor, at::Tensor> gather_dequant(const at::Tensor& pool,
                                                  const at::Tensor& block_tables,
                                                  const at::Tensor& seq_lens,
                                                  const std::string& format,
                                                  at::ScalarType dtype) {
  const FormatSpec& f = spec_arg(format);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                    "dtype must be float16, bfloat16 or float32, got ", dtype);
  Pool p = pool_arg(pool, "pool", f);
  BlockTables bt = block_tables_arg(block_tables, pool);
  seq_lens_arg(seq_lens, bt.batch, pool);
  at::Tensor bt_c = block_tables.contiguous(), sl = seq_lens.contiguous();
  bt.ids = bt_c.data_ptr<int32_t>();
  int64_t max_len = bt.batch ? std::max<int64_t>(0, sl.max().item<int64_t>()) : 0;
  guarded([&] { check_paged(p, bt, sl.data_ptr<int32_t>()); });
  auto opts = pool.options().dtype(dtype);
  at::Tensor key = at::empty({bt.batch, p.num_heads, max_len, p.layout.head_dim}, opts);
  at::Tensor value = at::empty_like(key);
  guarded([&] {
    gather_dequant_cpu(p, bt, sl.data_ptr<int32_t>(), max_len, dtype_of(dtype), key.data_ptr(),
                       value.data_ptr());
  });
  return {key, value};
}

}  // namespace kvcomp::op
