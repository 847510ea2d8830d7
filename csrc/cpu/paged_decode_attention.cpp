// Paged decode attention on the CPU: flash-decoding over compressed tiles.
// Work items are (sequence, split of it, range of KV heads); each K/V vector
// is dequantized once into registers and used by all query heads of its KV
// group. Splits are merged exactly by log-sum-exp. The cache is never
// expanded: only one block's logits live in a small buffer.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/codec.h"

namespace kvcomp {
using namespace simd;

namespace {

constexpr int kHeadSlice = 4;       // query heads per register pass
constexpr int kPrefetchBlocks = 2;  // how far ahead tiles are prefetched

// Calls f(P, c) for every run pair of a row (see Reader::run_pair), with P
// a compile-time constant: head_dim / 16 pairs, two per 32-channel chunk.
template <class F>
inline void for_pairs(int hd, F&& f) {
  const int pairs = hd / 16;
  int i = 0;
  for (; i + 2 <= pairs; i += 2) {
    f(std::integral_constant<int, 0>{}, i / 2);
    f(std::integral_constant<int, 1>{}, i / 2);
  }
  if (i < pairs) f(std::integral_constant<int, 0>{}, i / 2);
}

// Sums NH accumulators into logits[h * ld], times the token's scale.
template <int NH>
inline void store_logits(const vf8* acc, float ts, float* logits, int ld) {
  if constexpr (NH == 4) {
    float s[4];
    hsum4(acc[0], acc[1], acc[2], acc[3], s);
    for (int h = 0; h < 4; ++h) logits[h * ld] = s[h] * ts;
  } else {
    for (int h = 0; h < NH; ++h) logits[h * ld] = hsum8(acc[h]) * ts;
  }
}

// logits[h][t] = q[h] . k[t] for NH heads and n tokens, two tokens at a time
// so each q vector load feeds two FMAs.
template <Kind K, int NH>
void qk_block(const Reader<K>& kr, int n, const float* q, int hd, float* logits, int ld) {
  for (int t = 0; t < n; t += 2) {
    const int t1 = t + 1 < n ? t + 1 : t;  // an odd last token is computed twice
    vf8 a0[NH], a1[NH];
    for (int h = 0; h < NH; ++h) a0[h] = a1[h] = zero8();
    for_pairs(hd, [&](auto P, int c) {
      vf8 k0[2], k1[2];
      kr.template run_pair<P()>(t, c, k0[0], k0[1]);
      kr.template run_pair<P()>(t1, c, k1[0], k1[1]);
      for (int i = 0; i < 2; ++i) {
        const float* qs = q + 8 * (4 * c + Reader<K>::pair_sub(P(), i));
        for (int h = 0; h < NH; ++h) {
          vf8 qv = load8_reg(qs + h * hd);
          a0[h] = fma8(qv, k0[i], a0[h]);
          a1[h] = fma8(qv, k1[i], a1[h]);
        }
      }
    });
    store_logits<NH>(a0, kr.token_scale(t), logits + t, ld);
    if (t1 != t) store_logits<NH>(a1, kr.token_scale(t1), logits + t1, ld);
  }
}

// acc[h] += sum_t p[h][t] * v[t] for NH heads over n tokens (p already holds
// the per-token scale of symmetric kinds). A run pair per pass, so each
// broadcast p feeds two FMAs and 2*NH accumulators hide the FMA latency.
template <Kind K, int NH>
void pv_block(const Reader<K>& vr, int n, const float* p, int ld, int hd, float* acc) {
  for_pairs(hd, [&](auto P, int c) {
    float* oa = acc + 8 * (4 * c + Reader<K>::pair_sub(P(), 0));
    float* ob = acc + 8 * (4 * c + Reader<K>::pair_sub(P(), 1));
    vf8 o0[NH], o1[NH];
    for (int h = 0; h < NH; ++h) o0[h] = load8(oa + h * hd), o1[h] = load8(ob + h * hd);
    for (int t = 0; t < n; ++t) {
      vf8 v0, v1;
      vr.template run_pair<P()>(t, c, v0, v1);
      for (int h = 0; h < NH; ++h) {
        vf8 ph = set8(p[h * ld + t]);
        o0[h] = fma8(ph, v0, o0[h]);
        o1[h] = fma8(ph, v1, o1[h]);
      }
    }
    for (int h = 0; h < NH; ++h) store8(oa + h * hd, o0[h]), store8(ob + h * hd, o1[h]);
  });
}

// Dispatches a head slice of 1..4 heads to the templates above.
template <template <int> class F, class... Args>
void with_slice(int nh, Args&&... args) {
  switch (nh) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    default: F<4>::run(args...); break;
  }
}

template <Kind K>
struct Side {
  template <int NH>
  struct QK {
    static void run(const Reader<K>& r, int n, const float* q, int hd, float* lg, int ld) {
      qk_block<K, NH>(r, n, q, hd, lg, ld);
    }
  };
  template <int NH>
  struct PV {
    static void run(const Reader<K>& r, int n, const float* p, int ld, int hd, float* acc) {
      pv_block<K, NH>(r, n, p, ld, hd, acc);
    }
  };
  // logits[h * bs + t] = q[h] . k[t] for the G heads of a KV head, n tokens.
  static void logits(const Section& s, const uint8_t* tile, int n, const float* q, int G, int hd,
                     int bs, float* logits) {
    Reader<K> r(s, tile, hd);
    for (int h0 = 0; h0 < G; h0 += kHeadSlice)
      with_slice<QK>(std::min(kHeadSlice, G - h0), r, n, q + h0 * hd, hd, logits + h0 * bs, bs);
  }
  // acc[h] += sum_t p[h * bs + t] * v[t]; p is scaled by a row scale in place.
  static void values(const Section& s, const uint8_t* tile, int n, float* p, int G, int hd, int bs,
                     float* acc) {
    Reader<K> r(s, tile, hd);
    if (r.row_scale())
      for (int h = 0; h < G; ++h)
        for (int t = 0; t < n; ++t) p[h * bs + t] *= r.token_scale(t);
    for (int h0 = 0; h0 < G; h0 += kHeadSlice)
      with_slice<PV>(std::min(kHeadSlice, G - h0), r, n, p + h0 * bs, bs, hd, acc + h0 * hd);
  }
};

using LogitsFn = void (*)(const Section&, const uint8_t*, int, const float*, int, int, int, float*);
using ValuesFn = void (*)(const Section&, const uint8_t*, int, float*, int, int, int, float*);
// The two sides of a format, each compiled for its own kind.
struct Sides {
  LogitsFn logits;
  ValuesFn values;
};

// Online-softmax state of query heads: running max, sum and output.
struct Partial {
  float* m;
  float* l;
  float* acc;  // [heads][hd]
};

// Tokens [start, start + n) of one tile for the G query heads of its KV head.
void tile_step(const DecodeArgs& a, Sides f, const uint8_t* tile, int n, int64_t start,
               const float* q, float* logits_row, float* logits_buf, Partial st) {
  const TileLayout& L = a.pool->layout;
  const int hd = L.head_dim, bs = L.block_size;
  const int G = a.num_heads / a.pool->num_heads;
  f.logits(L.k, tile, n, q, G, hd, bs, logits_buf);
  if (a.softcap > 0.0f)  // Gemma 2's soft-capping, before the softmax and in logits_out
    for (int h = 0; h < G; ++h)
      for (int t = 0; t < n; ++t) logits_buf[h * bs + t] = a.softcap * tanhf(logits_buf[h * bs + t] / a.softcap);
  if (logits_row)
    for (int h = 0; h < G; ++h)
      memcpy(logits_row + h * a.logits_len + start, logits_buf + h * bs, n * sizeof(float));
  for (int h = 0; h < G; ++h) {
    float* lg = logits_buf + h * bs;
    for (int t = n; t < bs; ++t) lg[t] = -INFINITY;
    vf8 mx = set8(-INFINITY);
    for (int t = 0; t < bs; t += 8) mx = max8(mx, load8(lg + t));
    float m_new = fmaxf(st.m[h], hmax8(mx));
    if (m_new > st.m[h] && st.m[h] != -INFINITY) {
      float corr = expf(st.m[h] - m_new);
      st.l[h] *= corr;
      for (int c = 0; c < hd; ++c) st.acc[h * hd + c] *= corr;
    }
    st.m[h] = m_new;
    vf8 sum = zero8(), mv = set8(m_new);
    for (int t = 0; t < bs; t += 8) {
      vf8 p = exp8(sub8(load8(lg + t), mv));
      sum = add8(sum, p);
      store8(lg + t, p);
    }
    st.l[h] += hsum8(sum);
  }
  f.values(L.v, tile, n, logits_buf, G, hd, bs, st.acc);
}

// Tokens [t0, t1) of sequence b for KV heads [h0, h1). A block's tiles of
// all heads are adjacent in the pool, so the heads are the inner loop: the
// reads stream through memory block by block.
void run_item(const DecodeArgs& a, Sides f, int64_t b, int h0, int h1, int64_t t0, int64_t t1,
              const float* q, float* logits_buf, Partial st) {
  const Pool& pool = *a.pool;
  const int hd = pool.layout.head_dim, bs = pool.layout.block_size;
  const int G = a.num_heads / pool.num_heads;
  const int32_t* ids = a.bt.ids + b * a.bt.max_blocks;
  for (int64_t start = t0; start < t1; start += bs) {
    const int n = (int)std::min<int64_t>(bs, t1 - start);
    // Blocks sit anywhere in the pool: fetch the tiles a few blocks ahead
    // while this block is computed.
    const bool ahead = start + kPrefetchBlocks * bs < t1;
    for (int kvh = h0; kvh < h1; ++kvh) {
      if (ahead) {
        const char* p = (const char*)pool.tile(ids[start / bs + kPrefetchBlocks], kvh);
        for (int64_t off = 0; off < pool.tile_bytes; off += 64) __builtin_prefetch(p + off);
      }
      const int64_t hq = (int64_t)kvh * G, j = hq - (int64_t)h0 * G;
      float* logits_row = a.logits ? a.logits + (b * a.num_heads + hq) * a.logits_len : nullptr;
      tile_step(a, f, pool.tile(ids[start / bs], kvh), n, start, q + j * hd, logits_row, logits_buf,
                Partial{st.m + j, st.l + j, st.acc + j * hd});
    }
  }
}

Sides pick(Kind kk, Kind vk) {
  Sides f;
  f.logits = KVC_DISPATCH_KIND(kk, [&]() -> LogitsFn { return &Side<K>::logits; });
  f.values = KVC_DISPATCH_KIND(vk, [&]() -> ValuesFn { return &Side<K>::values; });
  return f;
}

}  // namespace

void paged_decode_attention_cpu(const DecodeArgs& a) {
  const Pool& pool = *a.pool;
  check_paged(pool, a.bt, a.seq_lens);
  const int hd = pool.layout.head_dim, bs = pool.layout.block_size;
  const int hkv = pool.num_heads, G = a.num_heads / hkv;
  const int64_t batch = a.bt.batch;
  if (batch == 0) return;

  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) max_len = std::max<int64_t>(max_len, a.seq_lens[b]);
  // Work items: (sequence, split of it, range of KV heads). Long sequences
  // are split so every thread gets several items (splits hold at least 256
  // tokens, whole blocks); heads are divided only when that is not enough.
  const int64_t threads = std::max(1, num_threads());
  int64_t splits = std::max<int64_t>(1, (4 * threads + batch - 1) / batch);
  int64_t split_len = std::max<int64_t>(256, (max_len + splits - 1) / splits);
  split_len = (split_len + bs - 1) / bs * bs;
  splits = std::max<int64_t>(1, (max_len + split_len - 1) / split_len);
  const int64_t hchunks = std::min<int64_t>(hkv, std::max<int64_t>(1, (4 * threads) / (batch * splits)));
  const int hper = (int)((hkv + hchunks - 1) / hchunks);
  const int64_t H = a.num_heads;

  std::vector<float> q((size_t)batch * H * hd);
  for (size_t i = 0; i < q.size(); ++i) q[i] = a.query[i] * a.scale;
  // Rotated K: q.k = (Rq).(Rk), so the query turns once instead of every key.
  if (pool.layout.k.fmt.rotated)
    for (int64_t r = 0; r < batch * H; ++r) rotate(&q[r * hd], hd);
  // Partial states per (sequence, split): m[H], l[H], acc[H][hd].
  const int64_t parts = batch * splits;
  std::vector<float> ml((size_t)parts * H * 2), acc((size_t)parts * H * hd);
  const Sides fn = pick(pool.layout.k.fmt.kind, pool.layout.v.fmt.kind);

  parallel_for(parts * hchunks, grain_for(std::min(split_len, max_len) * hper * hd * 2), [&](int64_t begin, int64_t end) {
    std::vector<float> logits_buf((size_t)G * bs);
    for (int64_t w = begin; w < end; ++w) {
      int64_t part = w / hchunks, b = part / splits, s = part % splits;
      int h0 = (int)(w % hchunks) * hper, h1 = std::min<int>(hkv, h0 + hper);
      if (h0 >= h1) continue;
      int64_t t0 = s * split_len, t1 = std::min<int64_t>(a.seq_lens[b], t0 + split_len);
      float* m = &ml[part * H * 2 + (int64_t)h0 * G];
      float* l = m + H;
      for (int64_t j = 0; j < (int64_t)(h1 - h0) * G; ++j) m[j] = -INFINITY, l[j] = 0.0f;
      float* ac = &acc[(part * H + (int64_t)h0 * G) * hd];
      memset(ac, 0, sizeof(float) * (h1 - h0) * G * hd);
      if (t0 < t1)
        run_item(a, fn, b, h0, h1, t0, t1, &q[(b * H + (int64_t)h0 * G) * hd], logits_buf.data(),
           Partial{m, l, ac});
    }
  });

  // Exact merge of the splits: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
  parallel_for(batch * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t b = r / H, hq = r % H;
      float M = -INFINITY;
      for (int64_t s = 0; s < splits; ++s) M = fmaxf(M, ml[(b * splits + s) * H * 2 + hq]);
      float* o = a.out + r * hd;
      memset(o, 0, hd * sizeof(float));
      if (M == -INFINITY) {
        a.lse[r] = -INFINITY;
        continue;
      }
      float Lsum = 0.0f;
      for (int64_t s = 0; s < splits; ++s) {
        int64_t part = b * splits + s;
        float m = ml[part * H * 2 + hq];
        if (m == -INFINITY) continue;
        float w = expf(m - M);
        Lsum += ml[part * H * 2 + H + hq] * w;
        const float* as = &acc[(part * H + hq) * hd];
        for (int c = 0; c < hd; ++c) o[c] += as[c] * w;
      }
      for (int c = 0; c < hd; ++c) o[c] /= Lsum;
      if (pool.layout.v.fmt.rotated) unrotate(o, hd);  // the weighted sum of rotated V, once
      a.lse[r] = M + logf(Lsum);
    }
  });
}

}  // namespace kvcomp
