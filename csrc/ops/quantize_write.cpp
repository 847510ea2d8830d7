#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

QuantizeWriteArgs prepare_quantize_write(const at::Tensor& key, const at::Tensor& value,
                                         at::Tensor& pool, const at::Tensor& slot_mapping,
                                         const std::string& format) {
  const FormatSpec& f = spec_arg(format);
  TORCH_CHECK_VALUE(!f.per_channel(), "format '", f.name,
                    "' is per-channel: its blocks are quantized whole by seal_blocks, "
                    "quantize_write cannot write single tokens into it");
  check_float_activation(key, "key");
  check_dim(key, "key", 3, "[num_tokens, num_kv_heads, head_dim]");
  TORCH_CHECK_VALUE(value.sizes() == key.sizes(), "value has shape ", value.sizes(),
                    " but key has shape ", key.sizes());
  TORCH_CHECK_VALUE(value.scalar_type() == key.scalar_type(), "value has dtype ",
                    value.scalar_type(), " but key has dtype ", key.scalar_type());
  check_same_device(key, "key", pool, "pool");
  check_same_device(value, "value", pool, "pool");
  check_same_device(slot_mapping, "slot_mapping", pool, "pool");
  check_dtype(slot_mapping, "slot_mapping", {at::kLong});
  check_dim(slot_mapping, "slot_mapping", 1, "[num_tokens]");
  check_size(slot_mapping, "slot_mapping", 0, key.size(0), "num_tokens of key");
  Pool p = pool_arg(pool, "pool", f, key.size(2));
  check_size(key, "key", 1, p.num_heads, "num_kv_heads of pool");
  return {p, key.contiguous(), value.contiguous(), slot_mapping.contiguous(),
          dtype_of(key.scalar_type())};
}

namespace op {

void quantize_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& pool,
                    const at::Tensor& slot_mapping, const std::string& format) {
  QuantizeWriteArgs a = prepare_quantize_write(key, value, pool, slot_mapping, format);
  guarded([&] {
    quantize_write_cpu(a.key.data_ptr(), a.value.data_ptr(), a.dtype, a.key.size(0),
                       a.slots.data_ptr<int64_t>(), a.pool);
  });
}

}  // namespace op
}  // namespace kvcomp
