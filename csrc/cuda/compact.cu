// compact: one CTA per (sequence, KV head). It first lists the kept
// positions (keep without its -1 entries) in the workspace, then moves each
// side in place. Kept positions ascend, so token j's source src[j] >= j:
// a destination never holds a source still to be read, provided each step
// reads all its sources before writing.
//  - per-token kinds: rounds of tokens, copied 16-bit word by word (codes
//    and scales, bit for bit) through registers, a barrier between reads and writes;
//  - per-channel kinds: a warp per 32-channel chunk re-quantizes each changed
//    destination block (encode_channel_block reads each source right before
//    writing its row, and the scales last).
#include "cuda/encode.cuh"
#include "cuda/launch.h"

namespace kvcomp {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWords = 4;  // 16-bit words per thread per round

struct Seq {
  Pool pool;
  BlockTables bt;
  int64_t b;
  int h;
  // The tile holding position p of the sequence, or null if none does.
  // Positions are int32 (keep's dtype); 32-bit division avoids a call.
  __device__ __forceinline__ uint8_t* tile(int p) const {
    const int bs = pool.layout.block_size;
    if (p < 0 || p >= bt.max_blocks * bs) return nullptr;
    const int32_t id = bt.ids[b * bt.max_blocks + p / bs];
    return id >= 0 && id < pool.num_blocks ? pool.tile(id, h) : nullptr;
  }
};

// Lists keep[0..k) without its negative entries into src; returns the count.
__device__ __forceinline__ int list_kept(const int32_t* keep, int64_t k, int32_t* src) {
  __shared__ int warp_count[kThreads / 32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x / 32;
  int n = 0;
  for (int64_t base = 0; base < k; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const int32_t p = j < k ? keep[j] : -1;
    const unsigned ballot = __ballot_sync(kFull, p >= 0);
    if (lane == 0) warp_count[wid] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      before += w < wid ? warp_count[w] : 0;
      total += warp_count[w];
    }
    if (p >= 0) src[n + before + __popc(ballot & ((1u << lane) - 1))] = p;
    n += total;
    __syncthreads();  // warp_count is rewritten next round; src is visible to the CTA
  }
  return n;
}

// Per-token side: the 16-bit words of token j are its row_bytes / 2 code
// words, then its meta halves.
__device__ __forceinline__ void move_tokens(const Seq& q, const Section& s, const int32_t* src, int n) {
  const int bs = q.pool.layout.block_size;
  const int rw = s.row_bytes / 2, mw = s.token_halves();
  const int words = rw + mw, per_round = max(1, kThreads * kWords / words);
  auto word = [&](uint8_t* tile, int p, int w) -> uint16_t* {
    const int t = p % bs;
    return w < rw ? reinterpret_cast<uint16_t*>(tile + s.offset + (int64_t)t * s.row_bytes) + w
                  : reinterpret_cast<uint16_t*>(tile + s.meta_offset()) + t * mw + (w - rw);
  };
  for (int j0 = 0; j0 < n; j0 += per_round) {
    uint16_t val[kWords] = {};
    uint16_t* dst[kWords];
#pragma unroll
    for (int r = 0; r < kWords; ++r) {
      const int i = threadIdx.x + r * kThreads, j = j0 + i / words, w = i % words;
      dst[r] = nullptr;
      if (i >= per_round * words || j >= n || src[j] == j) continue;
      uint8_t *from = q.tile(src[j]), *to = q.tile(j);
      if (!from || !to) continue;
      val[r] = *word(from, src[j], w);
      dst[r] = word(to, j, w);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kWords; ++r)
      if (dst[r]) *dst[r] = val[r];
    __syncthreads();
  }
}

template <Kind K>
__device__ __forceinline__ void requantize_blocks(const Seq& q, const Section& s, const int32_t* src, int n) {
  const int hd = q.pool.layout.head_dim, bs = q.pool.layout.block_size, chunks = (hd + 31) / 32;
  const int lane = threadIdx.x & 31;
  for (int chunk = threadIdx.x / 32; chunk < chunks; chunk += kThreads / 32) {
    const int c = chunk * kChunk + lane;
    for (int first = 0; first < n; first += bs) {
      const int cnt = min(bs, n - first);
      bool moved = false;
      for (int t = lane; t < cnt; t += 32) moved |= src[first + t] != first + t;
      uint8_t* out = q.tile(first);
      if (!__any_sync(kFull, moved) || !out) continue;
      encode_channel_block<K>(s, out, chunk, cnt, bs, hd, [&](int t) {
        const int p = src[first + t];
        const uint8_t* in = q.tile(p);
        return in ? decode_one(s, in, p % bs, c) : 0.0f;
      });
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    compact_kernel(Pool pool, BlockTables bt, const int32_t* __restrict__ keep, int64_t k,
                   int32_t* __restrict__ workspace) {
  const int64_t w = blockIdx.x;  // b * num_heads + h
  const Seq q{pool, bt, w / pool.num_heads, (int)(w % pool.num_heads)};
  int32_t* src = workspace + w * k;
  const int n = list_kept(keep + w * k, k, src);
  for (int side = 0; side < 2; ++side) {
    Section s = pool.layout.k;
    if (side) s = pool.layout.v;
    switch (s.fmt.kind) {
      case Kind::INT8C: requantize_blocks<Kind::INT8C>(q, s, src, n); break;
      case Kind::INT4C: requantize_blocks<Kind::INT4C>(q, s, src, n); break;
      case Kind::INT2C: requantize_blocks<Kind::INT2C>(q, s, src, n); break;
      default: move_tokens(q, s, src, n);
    }
  }
}

}  // namespace

cudaError_t compact(const Pool& pool, const BlockTables& bt, const int32_t* keep, int64_t k,
                    int32_t* workspace, cudaStream_t stream) {
  const int64_t rows = bt.batch * pool.num_heads;
  if (rows == 0 || k == 0) return cudaSuccess;
  if (k > INT32_MAX) return cudaErrorInvalidValue;
  compact_kernel<<<(unsigned)rows, kThreads, 0, stream>>>(pool, bt, keep, k, workspace);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kvcomp
