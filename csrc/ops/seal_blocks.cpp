#include "ops/ops.h"
#include "ops/prepare.h"

namespace kvcomp {

SealArgs prepare_seal_blocks(const Tensor& hot_pool, const Tensor& src_blocks,
                             Tensor& cold_pool, const Tensor& dst_blocks,
                             const std::string& hot_format, const std::string& cold_format) {
  const FormatSpec& hf = spec_arg(hot_format, "hot_format");
  const FormatSpec& cf = spec_arg(cold_format, "cold_format");
  KVCOMP_CHECK(!hf.per_channel(), "hot_format '", hf.name,
               "' is per-channel; the hot tier holds per-token formats");
  KVCOMP_CHECK(!hf.k.rotated && !hf.v.rotated, "hot_format '", hf.name,
               "' is rotated (:h); the hot tier holds its tokens as they are");
  check_same_device(cold_pool, "cold_pool", hot_pool, "hot_pool");
  check_same_device(src_blocks, "src_blocks", hot_pool, "hot_pool");
  check_same_device(dst_blocks, "dst_blocks", hot_pool, "hot_pool");
  Pool hot = pool_arg(hot_pool, "hot_pool", hf);
  int hd = hot.layout.head_dim, bs = hot.layout.block_size;
  check_dtype(cold_pool, "cold_pool", {ScalarType::Byte});
  check_dim(cold_pool, "cold_pool", 3, "[num_blocks, num_kv_heads, tile_bytes]");
  int64_t want = 0;
  try {
    want = tile_bytes(cf, hd, bs);
  } catch (const FormatError& e) {  // e.g. a group size that does not divide head_dim
    value_error("cold_format: ", e.what(), " (the hot pool's head_dim)");
  }
  KVCOMP_CHECK(cold_pool.size(2) == want, "cold_pool has tile_bytes ", cold_pool.size(2),
               " but format '", cf.name, "' with the hot pool's head_dim ", hd,
               " and block_size ", bs, " needs ", want);
  Pool cold = pool_arg(cold_pool, "cold_pool", cf, hd);
  check_size(cold_pool, "cold_pool", 1, hot.num_heads, "num_kv_heads of hot_pool");
  for (auto [t, name] : {std::pair{&src_blocks, "src_blocks"}, {&dst_blocks, "dst_blocks"}}) {
    check_dtype(*t, name, {ScalarType::Int});
    check_dim(*t, name, 1, "[num_blocks_to_seal]");
  }
  check_size(dst_blocks, "dst_blocks", 0, src_blocks.size(0), "the length of src_blocks");
  return {hot, cold, contig(src_blocks), contig(dst_blocks)};
}

namespace op {

void seal_blocks(const Tensor& hot_pool, const Tensor& src_blocks, Tensor& cold_pool,
                 const Tensor& dst_blocks, const std::string& hot_format,
                 const std::string& cold_format) {
  SealArgs a = prepare_seal_blocks(hot_pool, src_blocks, cold_pool, dst_blocks, hot_format,
                                   cold_format);
  seal_blocks_cpu(a.hot, a.src.const_data_ptr<int32_t>(), a.cold, a.dst.const_data_ptr<int32_t>(),
                  a.src.size(0));
}

}  // namespace op
}  // namespace kvcomp
