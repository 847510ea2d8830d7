// CUDA paged_decode_attention: the CPU path's checks, then the launcher of
// cuda/paged_decode_attention.h on the current stream.
#include "cuda/paged_decode_attention.h"

#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/paged_decode_attention.h"
#include "ops/prepare.h"

namespace kvcomp {
namespace cuda_op {

std::tuple<Tensor, Tensor> paged_decode_attention(
    const Tensor& query, const Tensor& pool, const Tensor& block_tables,
    const Tensor& seq_lens, const std::string& format, double scale,
    const std::optional<Tensor>& logits_out, double softcap) {
  PagedDecodeArgs a =
      prepare_paged_decode(query, pool, block_tables, seq_lens, format, scale, logits_out, softcap);
  const int64_t batch = query.size(0), heads = query.size(1);
  const int hd = a.pool.layout.head_dim;
  KVCOMP_CHECK(cuda::paged_decode_head_dim_ok(hd),
               "head_dim must be 64, 128 or 256 on CUDA, got ", hd);
  KVCOMP_CHECK(batch <= 65535, "query has a batch of ", batch,
               "; at most 65535 sequences per call on CUDA");
  const Guard guard(pool);
  const Tensor pool_a = aligned(pool);  // tiles are copied in 16-byte pieces
  a.pool.data = pool_a.mutable_data_ptr<uint8_t>();
  if (host_checks()) {
    if (a.with_logits) validate_logits_len(a.seq_lens, a.logits_len);
    validate_paged(a.pool, a.bt, a.block_tables, a.seq_lens);
  }
  Tensor q = contig(query);
  Tensor out = empty_on(query, {batch, heads, hd}, query.scalar_type());
  Tensor lse = empty_on(query, {batch, heads}, ScalarType::Float);
  cuda::DecodeParams p{q.const_data_ptr(),
                       dtype_of(query.scalar_type()),
                       (int)heads,
                       (float)scale,
                       a.pool,
                       a.bt,
                       a.seq_lens.const_data_ptr<int32_t>(),
                       out.mutable_data_ptr(),
                       lse.mutable_data_ptr<float>(),
                       a.logits,
                       a.logits_len,
                       multiprocessor_count(),
                       (float)softcap};
  const size_t ws_bytes = cuda::paged_decode_workspace_bytes(p);
  Tensor ws = empty_on(pool, {(int64_t)ws_bytes}, ScalarType::Byte);
  KVCOMP_CUDA_CHECK(cuda::paged_decode_attention(p, ws_bytes ? ws.mutable_data_ptr() : nullptr,
                                                 stream()));
  return {out, lse};
}

}  // namespace cuda_op
}  // namespace kvcomp
