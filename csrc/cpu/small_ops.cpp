// merge_attention_states, accumulate_scores and heavy_hitter_topk.
#include <math.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "kvcomp/format.h"

namespace kvcomp {

void merge_attention_states_cpu(const float* out_a, const float* lse_a, const float* out_b,
                                const float* lse_b, int64_t rows, int64_t head_dim,
                                float* out, float* lse) {
  parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float a = lse_a[r], b = lse_b[r], m = fmaxf(a, b);
      const float* oa = out_a + r * head_dim;
      const float* ob = out_b + r * head_dim;
      float* o = out + r * head_dim;
      if (m == -INFINITY) {  // neither side attended anything
        lse[r] = -INFINITY;
        for (int64_t c = 0; c < head_dim; ++c) o[c] = 0.0f;
        continue;
      }
      float wa = expf(a - m), wb = expf(b - m), sum = wa + wb;
      lse[r] = m + logf(sum);
      wa /= sum;
      wb /= sum;
      for (int64_t c = 0; c < head_dim; ++c) o[c] = wa * oa[c] + wb * ob[c];
    }
  });
}

void accumulate_scores_cpu(const float* logits, int64_t logits_len, const float* lse,
                           const int32_t* seq_lens, int64_t batch, int64_t num_heads,
                           float* scores, int64_t num_kv_heads, int64_t scores_len) {
  const int64_t group = num_heads / num_kv_heads;
  check_seq_lens(seq_lens, batch, std::min(logits_len, scores_len),
                 "the length of logits and scores");
  parallel_for(batch * num_kv_heads, grain_for(group * scores_len), [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      int64_t b = w / num_kv_heads, h = w % num_kv_heads, len = seq_lens[b];
      float* s = scores + w * scores_len;
      for (int64_t q = h * group; q < (h + 1) * group; ++q) {
        float m = lse[b * num_heads + q];
        if (m == -INFINITY) continue;  // this head attended nothing
        const float* l = logits + (b * num_heads + q) * logits_len;
        for (int64_t t = 0; t < len; ++t) s[t] += expf(l[t] - m);
      }
    }
  });
}

namespace {

// Order-preserving key of a score: larger score, larger key; -0 == +0; NaN lowest.
inline uint32_t score_key(float x) {
  if (isnan(x)) return 0;
  uint32_t u = x == 0.0f ? 0u : f2u(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The k-th largest key of keys[0..n) (1 <= k <= n) by MSB-first radix
// select, and how many keys equal to it belong to the top k.
void radix_select(const uint32_t* keys, int64_t n, int64_t k, uint32_t* threshold,
                  int64_t* take_equal) {
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = k;
  int64_t hist[2048];
  for (int shift : {21, 10, 0}) {
    const int bits = shift == 0 ? 10 : 11, buckets = 1 << bits;
    std::fill(hist, hist + buckets, 0);
    for (int64_t i = 0; i < n; ++i)
      if ((keys[i] & mask) == prefix) ++hist[(keys[i] >> shift) & (buckets - 1)];
    int64_t above = 0;
    int d = buckets - 1;
    for (; d > 0 && above + hist[d] < remaining; --d) above += hist[d];
    remaining -= above;
    prefix |= (uint32_t)d << shift;
    mask |= (uint32_t)(buckets - 1) << shift;
  }
  *threshold = prefix;
  *take_equal = remaining;
}

}  // namespace

void heavy_hitter_topk_cpu(const float* scores, int64_t rows, int64_t rows_per_batch,
                           int64_t len, const int32_t* seq_lens, int64_t k, int32_t* out) {
  check_seq_lens(seq_lens, rows / std::max<int64_t>(rows_per_batch, 1), len,
                 "the length of scores");
  parallel_for(rows, grain_for(len), [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys;
    for (int64_t r = begin; r < end; ++r) {
      const float* s = scores + r * len;
      const int64_t n = seq_lens[r / rows_per_batch];
      int32_t* o = out + r * k;
      int64_t m = 0;
      if (n <= k) {
        for (; m < n; ++m) o[m] = (int32_t)m;
      } else {
        // Positions above the threshold, then the lowest positions equal to
        // it: one scan in position order yields them ascending.
        keys.resize(n);
        for (int64_t i = 0; i < n; ++i) keys[i] = score_key(s[i]);
        uint32_t t;
        int64_t eq;
        radix_select(keys.data(), n, k, &t, &eq);
        for (int64_t i = 0; i < n && m < k; ++i)
          if (keys[i] > t || (keys[i] == t && eq-- > 0)) o[m++] = (int32_t)i;
      }
      for (; m < k; ++m) o[m] = -1;
    }
  });
}

}  // namespace kvcomp
