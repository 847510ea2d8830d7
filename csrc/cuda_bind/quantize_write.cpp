#include "cuda/launch.h"
#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/prepare.h"

namespace kvcomp::cuda_op {

void quantize_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& pool,
                    const at::Tensor& slot_mapping, const std::string& format) {
  QuantizeWriteArgs a = prepare_quantize_write(key, value, pool, slot_mapping, format);
  const c10::cuda::CUDAGuard guard(pool.device());
  check_aligned_pool(pool, "pool");
  const at::Tensor k = aligned(a.key), v = aligned(a.value);
  const Pool& p = a.pool;
  const int64_t* slots = a.slots.data_ptr<int64_t>();
  if (host_checks()) {
    validate_slots(a.slots, p.num_blocks * p.layout.block_size);
    at::Tensor bad = first_bad_word(pool);
    C10_CUDA_CHECK(cuda::find_unstorable_tokens(k.data_ptr(), v.data_ptr(), a.dtype, k.size(0),
                                                p.num_heads, p.layout.head_dim, slots,
                                                p.layout.k.fmt, p.layout.v.fmt,
                                                word_ptr(bad), stream()));
    const int64_t first = bad.item<int64_t>();
    TORCH_CHECK_VALUE(first == -1, first % 2 ? "value" : "key", "[", first / 2,
                      "] holds NaN or Inf, or a value beyond what its format stores");
  }
  C10_CUDA_CHECK(cuda::quantize_write(k.data_ptr(), v.data_ptr(), a.dtype, k.size(0), slots, p,
                                      stream()));
}

}  // namespace kvcomp::cuda_op
