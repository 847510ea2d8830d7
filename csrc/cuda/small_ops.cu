// merge_attention_states, accumulate_scores and heavy_hitter_topk. The float
// math mirrors csrc/cpu/small_ops.cpp operation by operation (no FMA
// contraction); expf/logf may differ from the CPU's by an ulp.
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace kvcomp {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// One thread per output element (or per row when head_dim is 0).
template <DType T>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const void* __restrict__ out_a, const float* __restrict__ lse_a,
                 const void* __restrict__ out_b, const float* __restrict__ lse_b, int64_t rows,
                 int64_t head_dim, void* __restrict__ out, float* __restrict__ lse) {
  const int64_t width = head_dim ? head_dim : 1;
  const int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (idx >= rows * width) return;
  const int64_t r = idx / width;
  const float a = lse_a[r], b = lse_b[r], m = fmaxf(a, b);
  float o = 0.0f, l = -INFINITY;  // neither side attended anything
  if (m != -INFINITY) {
    const float wa = expf(a - m), wb = expf(b - m), sum = __fadd_rn(wa, wb);
    l = m + logf(sum);
    if (head_dim)
      o = __fadd_rn(__fmul_rn(wa / sum, load1<T>(out_a, idx)), __fmul_rn(wb / sum, load1<T>(out_b, idx)));
  }
  if (idx % width == 0) lse[r] = l;
  if (head_dim) store1<T>(out, idx, o);
}

// blockIdx.x: a (sequence, KV head) row; threads: positions. Adds the
// group's heads in order, as the CPU does.
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const float* __restrict__ logits, int64_t logits_len,
                      const float* __restrict__ lse, const int32_t* __restrict__ seq_lens,
                      int64_t num_heads, float* __restrict__ scores, int64_t num_kv_heads,
                      int64_t scores_len) {
  const int64_t w = blockIdx.x, b = w / num_kv_heads, h = w % num_kv_heads;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t len = min((int64_t)max(seq_lens[b], 0), min(logits_len, scores_len));
  const int64_t t = (int64_t)blockIdx.y * kThreads + threadIdx.x;
  if (t >= len) return;
  float acc = scores[w * scores_len + t];
  for (int64_t q = h * group; q < (h + 1) * group; ++q) {
    const float m = lse[b * num_heads + q];
    if (m == -INFINITY) continue;  // this head attended nothing
    acc = __fadd_rn(acc, expf(logits[(b * num_heads + q) * logits_len + t] - m));
  }
  scores[w * scores_len + t] = acc;
}

// ---------------------------------------------------------------- top-k
// One CTA per row: an MSB-first radix select of the k-th largest key (11, 11
// and 10 bits, as on the CPU) with shared-memory histograms. The first pass
// reads the row; if the bucket holding the k-th key then fits in kCap, the
// second pass also copies that bucket's keys to shared memory and the third
// reads only those. A last ordered pass over the row emits the positions: keys
// above the threshold, and the first `eq` keys equal to it, in position order.
constexpr int kTopkThreads = 1024;
constexpr int kPerThread = 8;
constexpr int kCap = 4096;

// Order-preserving key of a score: larger score, larger key; -0 == +0; NaN lowest.
__device__ __forceinline__ uint32_t score_key(float x) {
  if (isnan(x)) return 0;
  const uint32_t u = x == 0.0f ? 0u : f2u(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Keys of row[base .. base+8) (0 past n).
template <bool kVec>
__device__ __forceinline__ void load_keys(const float* row, int base, int n, uint32_t (&key)[8]) {
  float x[8];
  if (kVec && base + kPerThread <= n) {
    const float4 a = reinterpret_cast<const float4*>(row + base)[0];
    const float4 b = reinterpret_cast<const float4*>(row + base)[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  } else {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) x[e] = base + e < n ? row[base + e] : 0.0f;
  }
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) key[e] = score_key(x[e]);
}

struct TopkShared {
  int hist[2048];
  uint32_t cand_key[kCap];
  int cand_pos[kCap];
  int warp_sums[2][32];
  int ncand, digit, remaining, count;
};

// Warp 0 picks the digit d of the pass: the largest with
// sum(hist[>= d]) >= remaining (d = 0 if none, as the CPU loop ends).
__device__ __forceinline__ void pick_digit(TopkShared& sh, int buckets, int remaining) {
  const int lane = threadIdx.x;
  const int per = buckets / 32, lo = lane * per;
  int sum = 0;  // rotated so the 32 lanes read 32 different banks
  for (int j = 0; j < per; ++j) sum += sh.hist[lo + (j + lane) % per];
  int incl = sum;  // sum over lanes >= this one
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int v = __shfl_down_sync(kFull, incl, off);
    if (lane + off < 32) incl += v;
  }
  const int above = incl - sum;
  const unsigned here = __ballot_sync(kFull, above < remaining && remaining <= incl);
  if (here == 0) {  // only if the scores changed under us: no crossing
    if (lane == 0) sh.digit = 0, sh.remaining = remaining, sh.count = 0;
    return;
  }
  if (lane != __ffs(here) - 1) return;
  int acc = above, d = lo;
  for (int j = per - 1; j >= 0; --j) {
    if (acc + sh.hist[lo + j] >= remaining) {
      d = lo + j;
      break;
    }
    acc += sh.hist[lo + j];
  }
  sh.digit = d;
  sh.remaining = remaining - acc;
  sh.count = sh.hist[d];
}

template <bool kVec>
__global__ void __launch_bounds__(kTopkThreads, 1)
    topk_kernel(const float* __restrict__ scores, int rows_per_batch, int len,
                const int32_t* __restrict__ seq_lens, int k, int32_t* __restrict__ out) {
  __shared__ TopkShared sh;
  const int tid = threadIdx.x, lane = tid & 31, wid = tid / 32;
  const int r = blockIdx.x;  // 32-bit: a 64-bit division is a call (and spills)
  const float* row = scores + (int64_t)r * len;
  int32_t* o = out + (int64_t)r * k;
  const int n = min(max(seq_lens[r / rows_per_batch], 0), len);
  if (n <= k) {
    for (int m = tid; m < k; m += kTopkThreads) o[m] = m < n ? m : -1;
    return;
  }
  uint32_t prefix = 0, mask = 0;
  int remaining = k, bucket = n, ncand = 0;
  bool gathered = false;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0, buckets = pass == 2 ? 1024 : 2048;
    const bool gather = pass == 1 && bucket <= kCap;  // then pass 2 reads shared memory only
    for (int i = tid; i < buckets; i += kTopkThreads) sh.hist[i] = 0;
    if (tid == 0) sh.ncand = 0;
    __syncthreads();
    auto count = [&](int pos, uint32_t key) {
      if ((key & mask) != prefix) return;
      atomicAdd(&sh.hist[(key >> shift) & (buckets - 1)], 1);
      if (gather) {
        const int slot = atomicAdd(&sh.ncand, 1);
        if (slot < kCap) sh.cand_key[slot] = key, sh.cand_pos[slot] = pos;  // < bucket <= kCap
      }
    };
    if (gathered) {
      for (int i = tid; i < ncand; i += kTopkThreads) count(sh.cand_pos[i], sh.cand_key[i]);
    } else {
      for (int base = tid * kPerThread; base < n; base += kTopkThreads * kPerThread) {
        uint32_t key[kPerThread];
        load_keys<kVec>(row, base, n, key);
#pragma unroll
        for (int e = 0; e < kPerThread; ++e)
          if (base + e < n) count(base + e, key[e]);
      }
    }
    __syncthreads();
    if (gather) gathered = true, ncand = min(sh.ncand, kCap);
    if (wid == 0) pick_digit(sh, buckets, remaining);
    __syncthreads();
    prefix |= (uint32_t)sh.digit << shift;
    mask |= (uint32_t)(buckets - 1) << shift;
    remaining = sh.remaining;
    bucket = sh.count;
  }
  // Ordered emission. Counts are packed: above-threshold << 16 | equal
  // (a tile has at most 8192 of each).
  const uint32_t thr = prefix;
  const int eq = remaining;
  int g_run = 0, e_run = 0;  // counts in the tiles before this one
  for (int tile = 0, it = 0; tile < n; tile += kTopkThreads * kPerThread, ++it) {
    const int base = tile + tid * kPerThread;
    uint32_t key[kPerThread];
    load_keys<kVec>(row, base, n, key);
    int mine = 0;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e)
      if (base + e < n) mine += key[e] > thr ? 1 << 16 : key[e] == thr ? 1 : 0;
    int incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int v = __shfl_up_sync(kFull, incl, off);
      if (lane >= off) incl += v;
    }
    int* ws = sh.warp_sums[it & 1];
    if (lane == 31) ws[wid] = incl;
    __syncthreads();
    const int v = ws[lane];  // kTopkThreads / 32 == 32 warps
    int before = lane < wid ? v : 0, total = v;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      before += __shfl_xor_sync(kFull, before, off);
      total += __shfl_xor_sync(kFull, total, off);
    }
    const int ex = before + incl - mine;
    int g = g_run + (ex >> 16), e_cnt = e_run + (ex & 0xffff);
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      if (base + e >= n) break;
      const bool above = key[e] > thr, equal = key[e] == thr;
      const int idx = g + min(e_cnt, eq);
      if ((above || (equal && e_cnt < eq)) && idx < k) o[idx] = base + e;
      g += above;
      e_cnt += equal;
    }
    g_run += total >> 16;
    e_run += total & 0xffff;
    if (g_run + min(e_run, eq) >= k) break;  // uniform: every thread has the same totals
  }
}

}  // namespace

cudaError_t merge_attention_states(const void* out_a, const float* lse_a, const void* out_b,
                                   const float* lse_b, int64_t rows, int64_t head_dim,
                                   DType dtype, void* out, float* lse, cudaStream_t stream) {
  const int64_t n = rows * (head_dim ? head_dim : 1);
  if (n == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tc) {
    merge_kernel<decltype(tc)::value><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        out_a, lse_a, out_b, lse_b, rows, head_dim, out, lse);
    return cudaGetLastError();
  });
}

cudaError_t accumulate_scores(const float* logits, int64_t logits_len, const float* lse,
                              const int32_t* seq_lens, int64_t batch, int64_t num_heads,
                              float* scores, int64_t num_kv_heads, int64_t scores_len,
                              cudaStream_t stream) {
  const int64_t len = logits_len < scores_len ? logits_len : scores_len;
  if (batch * num_kv_heads == 0 || len == 0) return cudaSuccess;
  const unsigned ty = blocks_for(len, kThreads);
  if (ty > 65535) return cudaErrorInvalidValue;
  accumulate_kernel<<<dim3((unsigned)(batch * num_kv_heads), ty), kThreads, 0, stream>>>(
      logits, logits_len, lse, seq_lens, num_heads, scores, num_kv_heads, scores_len);
  return cudaGetLastError();
}

cudaError_t heavy_hitter_topk(const float* scores, int64_t rows, int64_t rows_per_batch,
                              int64_t len, const int32_t* seq_lens, int64_t k, int32_t* out,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (len > INT32_MAX || k > INT32_MAX || rows > INT32_MAX) return cudaErrorInvalidValue;
  const bool vec = reinterpret_cast<uintptr_t>(scores) % 16 == 0 && len % 4 == 0;
  if (vec)
    topk_kernel<true><<<(unsigned)rows, kTopkThreads, 0, stream>>>(scores, (int)rows_per_batch, (int)len,
                                                                    seq_lens, (int)k, out);
  else
    topk_kernel<false><<<(unsigned)rows, kTopkThreads, 0, stream>>>(scores, (int)rows_per_batch, (int)len,
                                                                     seq_lens, (int)k, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kvcomp
