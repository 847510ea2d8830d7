#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

QuantizeWriteArgs prepare_quantize_write(const Tensor& key, const Tensor& value,
                                         Tensor& pool, const Tensor& slot_mapping,
                                         const std::string& format) {
  const FormatSpec& f = spec_arg(format);
  KVCOMP_CHECK(!f.per_channel(), "format '", f.name,
               "' is per-channel: its blocks are quantized whole by seal_blocks, "
               "quantize_write cannot write single tokens into it");
  check_float_activation(key, "key");
  check_dim(key, "key", 3, "[num_tokens, num_kv_heads, head_dim]");
  KVCOMP_CHECK(same_shape(value, key), "value has shape ", Shape{value},
               " but key has shape ", Shape{key});
  KVCOMP_CHECK(value.scalar_type() == key.scalar_type(), "value has dtype ",
               value.scalar_type(), " but key has dtype ", key.scalar_type());
  check_same_device(key, "key", pool, "pool");
  check_same_device(value, "value", pool, "pool");
  check_same_device(slot_mapping, "slot_mapping", pool, "pool");
  check_dtype(slot_mapping, "slot_mapping", {ScalarType::Long});
  check_dim(slot_mapping, "slot_mapping", 1, "[num_tokens]");
  check_size(slot_mapping, "slot_mapping", 0, key.size(0), "num_tokens of key");
  Pool p = pool_arg(pool, "pool", f, key.size(2));
  check_size(key, "key", 1, p.num_heads, "num_kv_heads of pool");
  return {p, contig(key), contig(value), contig(slot_mapping),
          dtype_of(key.scalar_type())};
}

namespace op {

void quantize_write(const Tensor& key, const Tensor& value, Tensor& pool,
                    const Tensor& slot_mapping, const std::string& format) {
  QuantizeWriteArgs a = prepare_quantize_write(key, value, pool, slot_mapping, format);
  quantize_write_cpu(a.key.const_data_ptr(), a.value.const_data_ptr(), a.dtype, a.key.size(0),
                     a.slots.const_data_ptr<int64_t>(), a.pool);
}

}  // namespace op
}  // namespace kvcomp
