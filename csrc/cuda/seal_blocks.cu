// seal_blocks: whole hot blocks into cold blocks. Per-token cold kinds use
// quantize_write's row encoder (a team of lanes per token row); per-channel
// kinds a warp per 32-channel chunk of a block, reducing min/max over the
// block's tokens in each lane. The hot kind is read at run time (any
// per-token kind; fp16/bf16 in practice).
#include "cuda/encode.cuh"
#include "cuda/launch.h"

namespace kvcomp {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Blocks {
  Pool hot, cold;
  const int32_t* src;
  const int32_t* dst;
};

// Section of a side without indexing the parameter struct at run time.
__device__ __forceinline__ Section side_section(const TileLayout& L, int side) {
  Section s = L.k;
  if (side) s = L.v;
  return s;
}

__device__ __forceinline__ bool in_range(int32_t id, int64_t num_blocks) {
  return id >= 0 && id < num_blocks;
}

// Rows are (i, head, token) of the blocks to seal; one team of lanes each.
template <Kind K>
__global__ void __launch_bounds__(kThreads)
    seal_rows_kernel(Blocks a, int64_t rows, int side0, int team) {
  const int side = side0 + blockIdx.y;
  const int hd = a.hot.layout.head_dim, bs = a.hot.layout.block_size, iters = hd > 256 ? 2 : 1;
  const int64_t row = ((int64_t)blockIdx.x * kThreads + threadIdx.x) >> (__ffs(team) - 1);
  const int q = threadIdx.x & (team - 1);
  const int64_t i = row / ((int64_t)a.hot.num_heads * bs);
  const int h = (int)(row / bs % a.hot.num_heads), t = (int)(row % bs);
  const bool ok = row < rows && in_range(a.src[i], a.hot.num_blocks) &&
                  in_range(a.dst[i], a.cold.num_blocks);
  const Section hs = side_section(a.hot.layout, side);
  float x[2][8] = {};
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int oct = q + it * team;
    if (ok && it < iters && oct < hd / 8) decode_octet_any(hs, a.hot.tile(a.src[i], h), t, oct, hd, x[it]);
  }
  encode_row<K>(side_section(a.cold.layout, side), ok ? a.cold.tile(a.dst[i], h) : nullptr, t, q,
                team, iters, hd, x);
}

// One warp per (i, head, chunk of 32 channels).
template <Kind K>
__global__ void __launch_bounds__(kThreads) seal_channels_kernel(Blocks a, int64_t warps, int side0) {
  const int side = side0 + blockIdx.y;
  const int hd = a.hot.layout.head_dim, bs = a.hot.layout.block_size, chunks = (hd + 31) / 32;
  const int64_t w = ((int64_t)blockIdx.x * kThreads + threadIdx.x) / 32;
  if (w >= warps) return;  // whole warps leave together
  const int64_t i = w / ((int64_t)a.hot.num_heads * chunks);
  const int h = (int)(w / chunks % a.hot.num_heads), chunk = (int)(w % chunks);
  if (!in_range(a.src[i], a.hot.num_blocks) || !in_range(a.dst[i], a.cold.num_blocks)) return;
  const Section hs = side_section(a.hot.layout, side);
  const uint8_t* in = a.hot.tile(a.src[i], h);
  const int c = chunk * kChunk + (threadIdx.x & 31);
  encode_channel_block<K>(side_section(a.cold.layout, side), a.cold.tile(a.dst[i], h), chunk, bs,
                          bs, hd, [&](int t) { return decode_one(hs, in, t, c); });
}

// One thread per (i, head, side, token, octet), in the order of the code.
__global__ void __launch_bounds__(kThreads)
    find_unstorable_kernel(Blocks a, int64_t n, ElemFormat k_cold, ElemFormat v_cold,
                           unsigned long long* first_bad) {
  const int hd = a.hot.layout.head_dim, bs = a.hot.layout.block_size, octets = hd / 8;
  const int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (idx >= n * a.hot.num_heads * 2 * bs * octets) return;
  const int64_t code = idx / octets;
  const int t = (int)(code % bs), side = (int)(code / bs % 2);
  const int h = (int)(code / (2 * bs) % a.hot.num_heads);
  const int64_t i = code / (2 * bs * a.hot.num_heads);
  if (!in_range(a.src[i], a.hot.num_blocks)) return;
  float x[8];
  decode_octet_any(side_section(a.hot.layout, side), a.hot.tile(a.src[i], h), t, (int)(idx % octets),
                   hd, x);
  bool bad = false;
#pragma unroll
  for (int e = 0; e < 8; ++e) bad |= !storable(side ? v_cold : k_cold, hd, x[e]);
  if (bad) atomicMin(first_bad, (unsigned long long)code);
}

}  // namespace

cudaError_t seal_blocks(const Pool& hot, const int32_t* src, const Pool& cold, const int32_t* dst,
                        int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const Blocks a{hot, cold, src, dst};
  const int hd = hot.layout.head_dim, bs = hot.layout.block_size, team = team_for(hd);
  const int64_t rows = n * hot.num_heads * bs, warps = n * hot.num_heads * ((hd + 31) / 32);
  auto launch = [&](Kind kind, int side0, int sides) {
    return with_kind(kind, [&](auto kc) {
      constexpr Kind K = decltype(kc)::value;
      if constexpr (is_per_channel(K))
        seal_channels_kernel<K><<<dim3(blocks_for(warps * 32, kThreads), sides), kThreads, 0, stream>>>(
            a, warps, side0);
      else
        seal_rows_kernel<K><<<dim3(blocks_for(rows * team, kThreads), sides), kThreads, 0, stream>>>(
            a, rows, side0, team);
      return cudaGetLastError();
    });
  };
  const Kind kk = cold.layout.k.fmt.kind, vk = cold.layout.v.fmt.kind;
  if (kk == vk) return launch(kk, 0, 2);
  cudaError_t e = launch(kk, 0, 1);
  return e != cudaSuccess ? e : launch(vk, 1, 1);
}

cudaError_t find_unstorable_blocks(const Pool& hot, const int32_t* src, int64_t n, ElemFormat k_cold,
                                   ElemFormat v_cold, unsigned long long* first_bad,
                                   cudaStream_t stream) {
  const int64_t threads = n * hot.num_heads * 2 * hot.layout.block_size * (hot.layout.head_dim / 8);
  if (threads == 0) return cudaSuccess;
  find_unstorable_kernel<<<blocks_for(threads, kThreads), kThreads, 0, stream>>>(
      Blocks{hot, hot, src, nullptr}, n, k_cold, v_cold, first_bad);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kvcomp
