#include <algorithm>

#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

GatherArgs prepare_gather_dequant(const Tensor& pool, const Tensor& block_tables,
                                  const Tensor& seq_lens, const std::string& format,
                                  ScalarType dtype) {
  const FormatSpec& f = spec_arg(format);
  KVCOMP_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Half || dtype == ScalarType::BFloat16,
               "dtype must be float16, bfloat16 or float32, got ", dtype);
  Pool p = pool_arg(pool, "pool", f);
  BlockTables bt = block_tables_arg(block_tables, pool);
  seq_lens_arg(seq_lens, bt.batch, pool);
  Tensor bt_c = contig(block_tables);
  bt.ids = bt_c.const_data_ptr<int32_t>();
  return {p, bt, bt_c, contig(seq_lens)};
}

namespace op {

std::tuple<Tensor, Tensor> gather_dequant(const Tensor& pool,
                                          const Tensor& block_tables,
                                          const Tensor& seq_lens,
                                          const std::string& format,
                                          ScalarType dtype) {
  GatherArgs a = prepare_gather_dequant(pool, block_tables, seq_lens, format, dtype);
  const Tensor& sl = a.seq_lens;
  int64_t max_len = std::max<int64_t>(0, max_seq_len(sl));
  validate_paged(a.pool, a.bt, a.block_tables, sl);
  Tensor key = empty_on(pool, {a.bt.batch, a.pool.num_heads, max_len, a.pool.layout.head_dim},
                        dtype);
  Tensor value = empty_as(key);
  gather_dequant_cpu(a.pool, a.bt, sl.const_data_ptr<int32_t>(), max_len, dtype_of(dtype),
                     key.mutable_data_ptr(), value.mutable_data_ptr());
  return {key, value};
}

}  // namespace op
}  // namespace kvcomp
