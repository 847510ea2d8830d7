#include "cuda/launch.h"
#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/prepare.h"

namespace kvcomp::cuda_op {

void seal_blocks(const Tensor& hot_pool, const Tensor& src_blocks, Tensor& cold_pool,
                 const Tensor& dst_blocks, const std::string& hot_format,
                 const std::string& cold_format) {
  SealArgs a = prepare_seal_blocks(hot_pool, src_blocks, cold_pool, dst_blocks, hot_format,
                                   cold_format);
  const Guard guard(hot_pool);
  check_aligned_pool(hot_pool, "hot_pool");
  check_aligned_pool(cold_pool, "cold_pool");
  const int32_t* src = a.src.const_data_ptr<int32_t>();
  const int64_t n = a.src.size(0);
  if (host_checks()) {
    validate_block_ids(a.src, a.hot.num_blocks, "src_blocks");
    validate_block_ids(a.dst, a.cold.num_blocks, "dst_blocks");
    Tensor bad = first_bad_word(hot_pool);
    KVCOMP_CUDA_CHECK(cuda::find_unstorable_blocks(a.hot, src, n, a.cold.layout.k.fmt,
                                                   a.cold.layout.v.fmt, word_ptr(bad),
                                                   stream()));
    const int64_t first = read_word(bad);
    if (first != -1) {  // first = ((i * num_heads + head) * 2 + side) * block_size + token
      const int64_t bs = a.hot.layout.block_size, i = first / bs / 2 / a.hot.num_heads;
      value_error("hot_pool block src_blocks[", i, "] = ",
                  to_host(a.src).const_data_ptr<int32_t>()[i],
                  " holds NaN or Inf, or a value beyond what its format stores (token ", first % bs, ")");
    }
  }
  KVCOMP_CUDA_CHECK(cuda::seal_blocks(a.hot, src, a.cold, a.dst.const_data_ptr<int32_t>(), n,
                                      stream()));
}

}  // namespace kvcomp::cuda_op
