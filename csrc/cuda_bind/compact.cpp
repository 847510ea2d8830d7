#include "cuda/launch.h"
#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/prepare.h"

namespace kvcomp::cuda_op {

void compact(Tensor& pool, const Tensor& block_tables, const Tensor& keep,
             const std::string& format) {
  CompactArgs a = prepare_compact(pool, block_tables, keep, format);
  const Guard guard(pool);
  check_aligned_pool(pool, "pool");
  if (host_checks()) validate_keep(a.pool, a.bt, a.block_tables, a.keep);
  Tensor src = empty_as(a.keep);  // kept positions without the -1 entries
  KVCOMP_CUDA_CHECK(cuda::compact(a.pool, a.bt, a.keep.const_data_ptr<int32_t>(), a.keep.size(2),
                                  src.mutable_data_ptr<int32_t>(), stream()));
}

}  // namespace kvcomp::cuda_op
