#include "ops/paged_decode_attention.h"

#include <math.h>

#include "ops/ops.h"

namespace kvcomp {

PagedDecodeArgs prepare_paged_decode(const Tensor& query, const Tensor& pool,
                                     const Tensor& block_tables, const Tensor& seq_lens,
                                     const std::string& format, double scale,
                                     const std::optional<Tensor>& logits_out, double softcap) {
  const FormatSpec& f = spec_arg(format);
  check_float_activation(query, "query");
  check_dim(query, "query", 3, "[batch, num_heads, head_dim]");
  check_same_device(query, "query", pool, "pool");
  Pool p = pool_arg(pool, "pool", f, query.size(2));
  KVCOMP_CHECK(query.size(1) % p.num_heads == 0, "query has ", query.size(1),
               " heads, not a multiple of the pool's ", p.num_heads, " KV heads");
  KVCOMP_CHECK(isfinite(scale), "scale must be finite, got ", scale);
  KVCOMP_CHECK(isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0 (0: none), got ", softcap);
  BlockTables bt = block_tables_arg(block_tables, pool);
  check_size(block_tables, "block_tables", 0, query.size(0), "the batch of query");
  seq_lens_arg(seq_lens, bt.batch, pool);
  const int64_t batch = query.size(0), heads = query.size(1);
  Tensor bt_c = contig(block_tables);
  bt.ids = bt_c.const_data_ptr<int32_t>();
  float* logits = nullptr;
  int64_t logits_len = 0;
  if (logits_out.has_value()) {
    const Tensor& lo = *logits_out;
    check_same_device(lo, "logits_out", pool, "pool");
    check_dtype(lo, "logits_out", {ScalarType::Float});
    check_dim(lo, "logits_out", 3, "[batch, num_heads, L]");
    check_size(lo, "logits_out", 0, batch, "batch of query");
    check_size(lo, "logits_out", 1, heads, "num_heads of query");
    check_contiguous(lo, "logits_out");
    logits = lo.mutable_data_ptr<float>();
    logits_len = lo.size(2);
  }
  return {p, bt, bt_c, contig(seq_lens), logits_out.has_value(), logits, logits_len};
}

void validate_logits_len(const Tensor& seq_lens, int64_t logits_len) {
  int64_t max_len = max_seq_len(seq_lens);
  KVCOMP_CHECK(logits_len >= max_len, "logits_out has room for ", logits_len,
               " tokens but the longest sequence has ", max_len);
}

namespace op {

std::tuple<Tensor, Tensor> paged_decode_attention(
    const Tensor& query, const Tensor& pool, const Tensor& block_tables,
    const Tensor& seq_lens, const std::string& format, double scale,
    const std::optional<Tensor>& logits_out, double softcap) {
  PagedDecodeArgs a =
      prepare_paged_decode(query, pool, block_tables, seq_lens, format, scale, logits_out, softcap);
  if (a.with_logits) validate_logits_len(a.seq_lens, a.logits_len);
  const int64_t batch = query.size(0), heads = query.size(1), hd = query.size(2);
  Tensor q = contig(to_dtype(query, ScalarType::Float));
  Tensor out = empty_on(query, {batch, heads, hd}, ScalarType::Float);
  Tensor lse = empty_on(query, {batch, heads}, ScalarType::Float);
  paged_decode_attention_cpu(DecodeArgs{q.const_data_ptr<float>(), (int)heads, (float)scale,
                                        &a.pool,
                                        a.bt, a.seq_lens.const_data_ptr<int32_t>(),
                                        out.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), a.logits,
                                        a.logits_len, (float)softcap});
  return {to_dtype(out, query.scalar_type()), lse};
}

}  // namespace op
}  // namespace kvcomp
