#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

CompactArgs prepare_compact(Tensor& pool, const Tensor& block_tables,
                            const Tensor& keep, const std::string& format) {
  const FormatSpec& f = spec_arg(format);
  Pool p = pool_arg(pool, "pool", f);
  BlockTables bt = block_tables_arg(block_tables, pool);
  check_same_device(keep, "keep", pool, "pool");
  check_dtype(keep, "keep", {ScalarType::Int});
  check_dim(keep, "keep", 3, "[batch, num_kv_heads, k]");
  check_size(keep, "keep", 0, bt.batch, "batch of block_tables");
  check_size(keep, "keep", 1, p.num_heads, "num_kv_heads of pool");
  Tensor bt_c = contig(block_tables);
  bt.ids = bt_c.const_data_ptr<int32_t>();
  return {p, bt, bt_c, contig(keep)};
}

namespace op {

void compact(Tensor& pool, const Tensor& block_tables, const Tensor& keep,
             const std::string& format) {
  CompactArgs a = prepare_compact(pool, block_tables, keep, format);
  compact_cpu(a.pool, a.bt, a.keep.const_data_ptr<int32_t>(), a.keep.size(2));
}

}  // namespace op
}  // namespace kvcomp
