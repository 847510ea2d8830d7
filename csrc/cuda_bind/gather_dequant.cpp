#include <algorithm>

#include "cuda/launch.h"
#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/prepare.h"

namespace kvcomp::cuda_op {

std::tuple<at::Tensor, at::Tensor> gather_dequant(const at::Tensor& pool,
                                                  const at::Tensor& block_tables,
                                                  const at::Tensor& seq_lens,
                                                  const std::string& format,
                                                  at::ScalarType dtype) {
  GatherArgs a = prepare_gather_dequant(pool, block_tables, seq_lens, format, dtype);
  const c10::cuda::CUDAGuard guard(pool.device());
  check_aligned_pool(pool, "pool");
  const at::Tensor& sl = a.seq_lens;
  // The output's shape depends on seq_lens: a sync whatever the validation.
  const int64_t max_len = a.bt.batch ? std::max<int64_t>(0, sl.max().item<int64_t>()) : 0;
  if (host_checks()) validate_paged(a.pool, a.bt, a.block_tables, sl);
  auto opts = pool.options().dtype(dtype);
  at::Tensor key = at::empty({a.bt.batch, a.pool.num_heads, max_len, a.pool.layout.head_dim}, opts);
  at::Tensor value = at::empty_like(key);
  C10_CUDA_CHECK(cuda::gather_dequant(a.pool, a.bt, sl.data_ptr<int32_t>(), max_len,
                                      dtype_of(dtype), key.data_ptr(), value.data_ptr(),
                                      stream()));
  return {key, value};
}

}  // namespace kvcomp::cuda_op
