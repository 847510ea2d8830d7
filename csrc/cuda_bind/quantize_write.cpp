#include "cuda/launch.h"
#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/prepare.h"

namespace kvcomp::cuda_op {

void quantize_write(const Tensor& key, const Tensor& value, Tensor& pool,
                    const Tensor& slot_mapping, const std::string& format) {
  QuantizeWriteArgs a = prepare_quantize_write(key, value, pool, slot_mapping, format);
  const Guard guard(pool);
  check_aligned_pool(pool, "pool");
  const Tensor k = aligned(a.key), v = aligned(a.value);
  const Pool& p = a.pool;
  const int64_t* slots = a.slots.const_data_ptr<int64_t>();
  if (host_checks()) {
    validate_slots(a.slots, p.num_blocks * p.layout.block_size);
    Tensor bad = first_bad_word(pool);
    KVCOMP_CUDA_CHECK(cuda::find_unstorable_tokens(k.const_data_ptr(), v.const_data_ptr(), a.dtype,
                                                   k.size(0), p.num_heads, p.layout.head_dim, slots,
                                                   p.layout.k.fmt, p.layout.v.fmt,
                                                   word_ptr(bad), stream()));
    const int64_t first = read_word(bad);
    KVCOMP_CHECK(first == -1, first % 2 ? "value" : "key", "[", first / 2,
                 "] holds NaN or Inf, or a value beyond what its format stores");
  }
  KVCOMP_CUDA_CHECK(cuda::quantize_write(k.const_data_ptr(), v.const_data_ptr(), a.dtype, k.size(0),
                                         slots, p, stream()));
}

}  // namespace kvcomp::cuda_op
