// CUDA paged_decode_attention: the CPU path's checks, then the launcher of
// cuda/paged_decode_attention.h on the current stream.
#include "cuda/paged_decode_attention.h"

#include "cuda_bind/common.h"
#include "cuda_bind/ops.h"
#include "ops/paged_decode_attention.h"
#include "ops/prepare.h"

namespace kvcomp {
namespace cuda_op {

std::tuple<at::Tensor, at::Tensor> paged_decode_attention(
    const at::Tensor& query, const at::Tensor& pool, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, const std::string& format, double scale,
    const std::optional<at::Tensor>& logits_out) {
  PagedDecodeArgs a =
      prepare_paged_decode(query, pool, block_tables, seq_lens, format, scale, logits_out);
  const int64_t batch = query.size(0), heads = query.size(1);
  const int hd = a.pool.layout.head_dim;
  TORCH_CHECK_VALUE(cuda::paged_decode_head_dim_ok(hd),
                    "head_dim must be 64, 128 or 256 on CUDA, got ", hd);
  TORCH_CHECK_VALUE(batch <= 65535, "query has a batch of ", batch,
                    "; at most 65535 sequences per call on CUDA");
  const c10::cuda::CUDAGuard guard(pool.device());
  const at::Tensor pool_a = aligned(pool);  // tiles are copied in 16-byte pieces
  a.pool.data = pool_a.data_ptr<uint8_t>();
  if (host_checks()) {
    if (a.logits) validate_logits_len(a.seq_lens, a.logits_len);
    validate_paged(a.pool, a.bt, a.block_tables, a.seq_lens);
  }
  at::Tensor q = query.contiguous();
  at::Tensor out = at::empty({batch, heads, hd}, query.options());
  at::Tensor lse = at::empty({batch, heads}, query.options().dtype(at::kFloat));
  cuda::DecodeParams p{q.data_ptr(),
                       dtype_of(query.scalar_type()),
                       (int)heads,
                       (float)scale,
                       a.pool,
                       a.bt,
                       a.seq_lens.data_ptr<int32_t>(),
                       out.data_ptr(),
                       lse.data_ptr<float>(),
                       a.logits,
                       a.logits_len,
                       at::cuda::getCurrentDeviceProperties()->multiProcessorCount};
  const size_t ws_bytes = cuda::paged_decode_workspace_bytes(p);
  at::Tensor ws = at::empty({(int64_t)ws_bytes}, pool.options());
  C10_CUDA_CHECK(cuda::paged_decode_attention(p, ws_bytes ? ws.data_ptr() : nullptr, stream()));
  return {out, lse};
}

}  // namespace cuda_op
}  // namespace kvcomp
