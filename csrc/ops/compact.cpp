#include "ops/common.h"
#include "ops/ops.h"

namespace kvcomp::op {

void compact(at::Tensor& pool, const at::Tensor& block_tables, const at::Tensor& keep,
             const std::string& format) {
  const FormatSpec& f = spec_arg(format);
  Pool p = pool_arg(pool, "pool", f);
  BlockTables bt = block_tables_arg(block_tables, pool);
  check_same_device(keep, "keep", pool, "pool");
  check_dtype(keep, "keep", {at::kInt});
  check_dim(keep, "keep", 3, "[batch, num_kv_heads, k]");
  check_size(keep, "keep", 0, bt.batch, "batch of block_tables");
  check_size(keep, "keep", 1, p.num_heads, "num_kv_heads of pool");
  at::Tensor bt_c = block_tables.contiguous(), kp = keep.contiguous();
  bt.ids = bt_c.data_ptr<int32_t>();
  guarded([&] { compact_cpu(p, bt, kp.data_ptr<int32_t>(), kp.size(2)); });
}

}  // namespace kvcomp::op
