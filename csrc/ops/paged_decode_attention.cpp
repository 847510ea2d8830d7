#include "ops/paged_decode_attention.h"

#include <math.h>

#include "ops/ops.h"

namespace kvcomp {

PagedDecodeArgs prepare_paged_decode(const at::Tensor& query, const at::Tensor& pool,
                                     const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                     const std::string& format, double scale,
                                     const std::optional<at::Tensor>& logits_out) {
  const FormatSpec& f = spec_arg(format);
  check_float_activation(query, "query");
  check_dim(query, "query", 3, "[batch, num_heads, head_dim]");
  check_same_device(query, "query", pool, "pool");
  Pool p = pool_arg(pool, "pool", f, query.size(2));
  TORCH_CHECK_VALUE(query.size(1) % p.num_heads == 0, "query has ", query.size(1),
                    " heads, not a multiple of the pool's ", p.num_heads, " KV heads");
  TORCH_CHECK_VALUE(isfinite(scale), "scale must be finite, got ", scale);
  BlockTables bt = block_tables_arg(block_tables, pool);
  check_size(block_tables, "block_tables", 0, query.size(0), "the batch of query");
  seq_lens_arg(seq_lens, bt.batch, pool);
  const int64_t batch = query.size(0), heads = query.size(1);
  at::Tensor bt_c = block_tables.contiguous();
  bt.ids = bt_c.data_ptr<int32_t>();
  float* logits = nullptr;
  int64_t logits_len = 0;
  if (logits_out.has_value()) {
    const at::Tensor& lo = *logits_out;
    check_same_device(lo, "logits_out", pool, "pool");
    check_dtype(lo, "logits_out", {at::kFloat});
    check_dim(lo, "logits_out", 3, "[batch, num_heads, L]");
    check_size(lo, "logits_out", 0, batch, "batch of query");
    check_size(lo, "logits_out", 1, heads, "num_heads of query");
    check_contiguous(lo, "logits_out");
    logits = lo.data_ptr<float>();
    logits_len = lo.size(2);
  }
  return {p, bt, bt_c, seq_lens.contiguous(), logits, logits_len};
}

void validate_logits_len(const at::Tensor& seq_lens, int64_t logits_len) {
  int64_t max_len = seq_lens.numel() ? seq_lens.max().item<int64_t>() : 0;
  TORCH_CHECK_VALUE(logits_len >= max_len, "logits_out has room for ", logits_len,
                    " tokens but the longest sequence has ", max_len);
}

namespace op {

std::tuple<at::Tensor, at::Tensor> paged_decode_attention(
    const at::Tensor& query, const at::Tensor& pool, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, const std::string& format, double scale,
    const std::optional<at::Tensor>& logits_out) {
  PagedDecodeArgs a =
      prepare_paged_decode(query, pool, block_tables, seq_lens, format, scale, logits_out);
  if (a.logits) validate_logits_len(a.seq_lens, a.logits_len);
  const int64_t batch = query.size(0), heads = query.size(1), hd = query.size(2);
  at::Tensor q = query.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({batch, heads, hd}, query.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({batch, heads}, query.options().dtype(at::kFloat));
  guarded([&] {
    paged_decode_attention_cpu(DecodeArgs{q.data_ptr<float>(), (int)heads, (float)scale, &a.pool,
                                          a.bt, a.seq_lens.data_ptr<int32_t>(),
                                          out.data_ptr<float>(), lse.data_ptr<float>(), a.logits,
                                          a.logits_len});
  });
  return {out.to(query.scalar_type()), lse};
}

}  // namespace op
}  // namespace kvcomp
