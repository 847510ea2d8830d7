#include <algorithm>

#include "cuda/launch.h"
#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/prepare.h"

namespace kvcomp::cuda_op {

std::tuple<Tensor, Tensor> gather_dequant(const Tensor& pool,
                                          const Tensor& block_tables,
                                          const Tensor& seq_lens,
                                          const std::string& format,
                                          ScalarType dtype) {
  GatherArgs a = prepare_gather_dequant(pool, block_tables, seq_lens, format, dtype);
  const Guard guard(pool);
  check_aligned_pool(pool, "pool");
  const Tensor& sl = a.seq_lens;
  // The output's shape depends on seq_lens: a sync whatever the validation.
  const int64_t max_len = std::max<int64_t>(0, max_seq_len(sl));
  if (host_checks()) validate_paged(a.pool, a.bt, a.block_tables, sl);
  Tensor key = empty_on(pool, {a.bt.batch, a.pool.num_heads, max_len, a.pool.layout.head_dim},
                        dtype);
  Tensor value = empty_as(key);
  KVCOMP_CUDA_CHECK(cuda::gather_dequant(a.pool, a.bt, sl.const_data_ptr<int32_t>(), max_len,
                                         dtype_of(dtype), key.mutable_data_ptr(), value.mutable_data_ptr(),
                                         stream()));
  return {key, value};
}

}  // namespace kvcomp::cuda_op
