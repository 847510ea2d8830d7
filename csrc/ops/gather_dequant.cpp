#include <algorithm>

#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

GatherArgs prepare_gather_dequant(const at::Tensor& pool, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, const std::string& format,
                                  at::ScalarType dtype) {
  const FormatSpec& f = spec_arg(format);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                    "dtype must be float16, bfloat16 or float32, got ", dtype);
  Pool p = pool_arg(pool, "pool", f);
  BlockTables bt = block_tables_arg(block_tables, pool);
  seq_lens_arg(seq_lens, bt.batch, pool);
  at::Tensor bt_c = block_tables.contiguous();
  bt.ids = bt_c.data_ptr<int32_t>();
  return {p, bt, bt_c, seq_lens.contiguous()};
}

namespace op {

std::tuple<at::Tensor, at::Tensor> gather_dequant(const at::Tensor& pool,
                                                  const at::Tensor& block_tables,
                                                  const at::Tensor& seq_lens,
                                                  const std::string& format,
                                                  at::ScalarType dtype) {
  GatherArgs a = prepare_gather_dequant(pool, block_tables, seq_lens, format, dtype);
  const at::Tensor& sl = a.seq_lens;
  int64_t max_len = a.bt.batch ? std::max<int64_t>(0, sl.max().item<int64_t>()) : 0;
  validate_paged(a.pool, a.bt, a.block_tables, sl);
  auto opts = pool.options().dtype(dtype);
  at::Tensor key = at::empty({a.bt.batch, a.pool.num_heads, max_len, a.pool.layout.head_dim}, opts);
  at::Tensor value = at::empty_like(key);
  guarded([&] {
    gather_dequant_cpu(a.pool, a.bt, sl.data_ptr<int32_t>(), max_len, dtype_of(dtype),
                       key.data_ptr(), value.data_ptr());
  });
  return {key, value};
}

}  // namespace op
}  // namespace kvcomp
