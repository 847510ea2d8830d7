#include "cuda/launch.h"
#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/prepare.h"

namespace kvcomp::cuda_op {

void compact(at::Tensor& pool, const at::Tensor& block_tables, const at::Tensor& keep,
             const std::string& format) {
  CompactArgs a = prepare_compact(pool, block_tables, keep, format);
  const c10::cuda::CUDAGuard guard(pool.device());
  check_aligned_pool(pool, "pool");
  if (host_checks()) validate_keep(a.pool, a.bt, a.block_tables, a.keep);
  at::Tensor src = at::empty_like(a.keep);  // kept positions without the -1 entries
  C10_CUDA_CHECK(cuda::compact(a.pool, a.bt, a.keep.data_ptr<int32_t>(), a.keep.size(2),
                               src.data_ptr<int32_t>(), stream()));
}

}  // namespace kvcomp::cuda_op
