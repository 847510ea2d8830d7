// Paged decode attention on the CPU: flash-decoding over compressed tiles.
// Work items are (sequence, KV head, split of the sequence); every item keeps
// all query heads of its KV group, so each K/V vector is dequantized once into
// registers and used by the whole group. Splits are merged exactly by
// log-sum-exp. The cache is never expanded: only one block's logits live in a
// small buffer.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "cpu/codec.h"

namespace kvcomp {
using namespace simd;

namespace {

constexpr int kHeadSlice = 4;       // query heads per register pass
constexpr int kPrefetchBlocks = 4;  // how far ahead tiles are prefetched

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
  int t = 0;
  for (; t + 2 <= n; t += 2) {
    vf8 a0[NH], a1[NH];
    for (int h = 0; h < NH; ++h) a0[h] = a1[h] = zero8();
    for (int sub = 0; sub < hd / 8; ++sub) {
      vf8 k0 = kr.run(t, sub), k1 = kr.run(t + 1, sub);
      for (int h = 0; h < NH; ++h) {
        vf8 qv = load8_reg(q + h * hd + 8 * sub);
        a0[h] = fma8(qv, k0, a0[h]);
        a1[h] = fma8(qv, k1, a1[h]);
      }
    }
    store_logits<NH>(a0, kr.token_scale(t), logits + t, ld);
    store_logits<NH>(a1, kr.token_scale(t + 1), logits + t + 1, ld);
  }
  if (t < n) {
    vf8 a0[NH];
    for (int h = 0; h < NH; ++h) a0[h] = zero8();
    for (int sub = 0; sub < hd / 8; ++sub) {
      vf8 k0 = kr.run(t, sub);
      for (int h = 0; h < NH; ++h) a0[h] = fma8(load8(q + h * hd + 8 * sub), k0, a0[h]);
    }
    store_logits<NH>(a0, kr.token_scale(t), logits + t, ld);
  }
}

// acc[h] += sum_t p[h][t] * v[t] for NH heads over n tokens (p already holds
// the per-token scale of symmetric kinds). Two channel runs per pass, so each
// broadcast p feeds two FMAs and 2*NH accumulators hide the FMA latency.
template <Kind K, int NH>
void pv_block(const Reader<K>& vr, int n, const float* p, int ld, int hd, float* acc) {
  for (int sub = 0; sub < hd / 8; sub += 2) {
    vf8 o0[NH], o1[NH];
    for (int h = 0; h < NH; ++h) {
      o0[h] = load8(acc + h * hd + 8 * sub);
      o1[h] = load8(acc + h * hd + 8 * sub + 8);
    }
    for (int t = 0; t < n; ++t) {
      vf8 v0 = vr.run(t, sub), v1 = vr.run(t, sub + 1);
      for (int h = 0; h < NH; ++h) {
        vf8 ph = set8(p[h * ld + t]);
        o0[h] = fma8(ph, v0, o0[h]);
        o1[h] = fma8(ph, v1, o1[h]);
      }
    }
    for (int h = 0; h < NH; ++h) {
      store8(acc + h * hd + 8 * sub, o0[h]);
      store8(acc + h * hd + 8 * sub + 8, o1[h]);
    }
  }
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

// Online-softmax state of one work item: G heads' running max, sum and output.
struct Partial {
  float* m;
  float* l;
  float* acc;  // [G][hd]
};

template <Kind KK, Kind VK>
struct Item {
  template <int NH>
  struct QK {
    static void run(const Reader<KK>& r, int n, const float* q, int hd, float* lg, int ld) {
      qk_block<KK, NH>(r, n, q, hd, lg, ld);
    }
  };
  template <int NH>
  struct PV {
    static void run(const Reader<VK>& r, int n, const float* p, int ld, int hd, float* acc) {
      pv_block<VK, NH>(r, n, p, ld, hd, acc);
    }
  };

  // Attends tokens [t0, t1) of sequence b with KV head kvh for heads q[G].
  static void run(const DecodeArgs& a, int64_t b, int kvh, int64_t t0, int64_t t1,
                  const float* q, float* logits_buf, Partial st) {
    const Pool& pool = *a.pool;
    const TileLayout& L = pool.layout;
    const int hd = L.head_dim, bs = L.block_size;
    const int G = a.num_heads / pool.num_heads;
    for (int h = 0; h < G; ++h) st.m[h] = -INFINITY, st.l[h] = 0.0f;
    memset(st.acc, 0, sizeof(float) * G * hd);
    for (int64_t start = t0; start < t1; start += bs) {
      const int n = (int)std::min<int64_t>(bs, t1 - start);
      const uint8_t* tile = pool.tile(a.bt.ids[b * a.bt.max_blocks + start / bs], kvh);
      // Blocks sit anywhere in the pool, beyond the hardware prefetcher's
      // reach: fetch a tile a few blocks ahead while this one is computed.
      if (start + kPrefetchBlocks * bs < t1) {
        const char* ahead =
            (const char*)pool.tile(a.bt.ids[b * a.bt.max_blocks + start / bs + kPrefetchBlocks], kvh);
        for (int64_t off = 0; off < pool.tile_bytes; off += 64) __builtin_prefetch(ahead + off);
      }
      Reader<KK> kr(L.k, tile, hd);
      Reader<VK> vr(L.v, tile, hd);
      for (int h0 = 0; h0 < G; h0 += kHeadSlice)
        with_slice<QK>(std::min(kHeadSlice, G - h0), kr, n, q + h0 * hd, hd,
                       logits_buf + h0 * bs, bs);
      if (a.logits)
        for (int h = 0; h < G; ++h)
          memcpy(a.logits + ((b * a.num_heads) + kvh * G + h) * a.logits_len + start,
                 logits_buf + h * bs, n * sizeof(float));
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
        for (int t = 0; t < n; ++t) lg[t] *= vr.token_scale(t);
      }
      for (int h0 = 0; h0 < G; h0 += kHeadSlice)
        with_slice<PV>(std::min(kHeadSlice, G - h0), vr, n, logits_buf + h0 * bs, bs, hd,
                       st.acc + h0 * hd);
    }
  }
};

using ItemFn = void (*)(const DecodeArgs&, int64_t, int, int64_t, int64_t, const float*, float*,
                        Partial);

template <Kind KK>
ItemFn pick_v(Kind vk) {
  return KVC_DISPATCH_KIND(vk, [&]() -> ItemFn { return &Item<KK, K>::run; });
}
ItemFn pick(Kind kk, Kind vk) {
  return KVC_DISPATCH_KIND(kk, [&]() -> ItemFn { return pick_v<K>(vk); });
}

}  // namespace

void paged_decode_attention_cpu(const DecodeArgs& a) {
  const Pool& pool = *a.pool;
  check_paged(pool, a.bt, a.seq_lens);
  const int hd = pool.layout.head_dim, bs = pool.layout.block_size;
  const int hkv = pool.num_heads, G = a.num_heads / hkv;
  const int64_t batch = a.bt.batch;

  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) max_len = std::max<int64_t>(max_len, a.seq_lens[b]);
  // Split long sequences so every thread gets several items; splits hold at
  // least 256 tokens and whole blocks.
  const int64_t threads = std::max(1, num_threads());
  int64_t splits = std::max<int64_t>(1, (4 * threads + batch * hkv - 1) / (batch * hkv));
  int64_t split_len = std::max<int64_t>(256, (max_len + splits - 1) / splits);
  split_len = (split_len + bs - 1) / bs * bs;
  splits = std::max<int64_t>(1, (max_len + split_len - 1) / split_len);

  std::vector<float> q((size_t)batch * a.num_heads * hd);
  for (size_t i = 0; i < q.size(); ++i) q[i] = a.query[i] * a.scale;
  // Partial states: [batch, hkv, splits] items, each G heads.
  const int64_t items = batch * hkv * splits;
  std::vector<float> ml((size_t)items * G * 2), acc((size_t)items * G * hd);
  ItemFn fn = pick(pool.layout.k.fmt.kind, pool.layout.v.fmt.kind);

  parallel_for(items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits_buf((size_t)G * bs);
    for (int64_t w = begin; w < end; ++w) {
      int64_t b = w / (hkv * splits), s = w % splits;
      int kvh = (int)(w / splits % hkv);
      int64_t t0 = s * split_len, t1 = std::min<int64_t>(a.seq_lens[b], t0 + split_len);
      Partial st{&ml[w * G * 2], &ml[w * G * 2 + G], &acc[w * G * hd]};
      if (t0 >= t1) {
        for (int h = 0; h < G; ++h) st.m[h] = -INFINITY, st.l[h] = 0.0f;
        continue;
      }
      fn(a, b, kvh, t0, t1, &q[(b * a.num_heads + kvh * G) * hd], logits_buf.data(), st);
    }
  });

  // Exact merge of the splits: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
  parallel_for(batch * a.num_heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t b = r / a.num_heads;
      int hq = (int)(r % a.num_heads), kvh = hq / G, h = hq % G;
      int64_t first = (b * hkv + kvh) * splits;
      float M = -INFINITY;
      for (int64_t s = 0; s < splits; ++s) M = fmaxf(M, ml[(first + s) * G * 2 + h]);
      float* o = a.out + r * hd;
      if (M == -INFINITY) {
        memset(o, 0, hd * sizeof(float));
        a.lse[r] = -INFINITY;
        continue;
      }
      float Lsum = 0.0f;
      memset(o, 0, hd * sizeof(float));
      for (int64_t s = 0; s < splits; ++s) {
        float m = ml[(first + s) * G * 2 + h];
        if (m == -INFINITY) continue;
        float w = expf(m - M);
        Lsum += ml[(first + s) * G * 2 + G + h] * w;
        const float* as = &acc[((first + s) * G + h) * hd];
        for (int c = 0; c < hd; ++c) o[c] += as[c] * w;
      }
      for (int c = 0; c < hd; ++c) o[c] /= Lsum;
      a.lse[r] = M + logf(Lsum);
    }
  });
}

}  // namespace kvcomp
