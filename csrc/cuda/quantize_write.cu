// quantize_write: one pass over the activations. A team of lanes per
// (token, head) row of one side (K or V; gridDim.y covers both when they
// share a kind) loads the row with 16-byte loads, reduces its scales with
// shuffles and stores packed codes 8 or 16 bytes at a time.
#include "cuda/encode.cuh"
#include "cuda/launch.h"

namespace kvcomp {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <DType T, Kind K>
__global__ void __launch_bounds__(kThreads)
    quantize_write_kernel(const void* __restrict__ key, const void* __restrict__ value,
                          int64_t rows, const int64_t* __restrict__ slots, Pool pool, int side0,
                          int team) {
  const int side = side0 + blockIdx.y;
  const TileLayout& L = pool.layout;
  const int hd = L.head_dim, iters = hd > 256 ? 2 : 1;
  const int64_t row = ((int64_t)blockIdx.x * kThreads + threadIdx.x) >> (__ffs(team) - 1);
  const int q = threadIdx.x & (team - 1);
  const int64_t slot = row < rows ? slots[row / pool.num_heads] : -1;
  const bool ok = slot >= 0 && slot < pool.num_blocks * L.block_size;  // else skipped
  const void* src = side ? value : key;
  float x[2][8] = {};
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int oct = q + it * team;
    if (ok && it < iters && oct < hd / 8) load8<T>(src, row * hd + oct * 8, x[it]);
  }
  uint8_t* tile = ok ? pool.tile(slot / L.block_size, (int)(row % pool.num_heads)) : nullptr;
  Section s = L.k;  // not `side ? L.v : L.k`: that indexes the parameter struct via the stack
  if (side) s = L.v;
  encode_row<K>(s, tile, (int)(slot % L.block_size), q, team, iters, hd, x);
}

template <DType T>
__global__ void __launch_bounds__(kThreads)
    find_unstorable_kernel(const void* __restrict__ key, const void* __restrict__ value,
                           int64_t octets_per_side, int64_t octets_per_token,
                           const int64_t* __restrict__ slots, ElemFormat k_fmt, ElemFormat v_fmt,
                           int head_dim, unsigned long long* first_bad) {
  const int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (i >= 2 * octets_per_side) return;
  const int side = i >= octets_per_side;
  const int64_t o = i - side * octets_per_side, token = o / octets_per_token;
  if (slots[token] < 0) return;
  float x[8];
  load8<T>(side ? value : key, o * 8, x);
  bool bad = false;
#pragma unroll
  for (int e = 0; e < 8; ++e) bad |= !storable(side ? v_fmt : k_fmt, head_dim, x[e]);
  if (bad) atomicMin(first_bad, (unsigned long long)(2 * token + side));
}

}  // namespace

cudaError_t quantize_write(const void* key, const void* value, DType dtype, int64_t num_tokens,
                           const int64_t* slots, const Pool& pool, cudaStream_t stream) {
  const int64_t rows = num_tokens * pool.num_heads;
  if (rows == 0) return cudaSuccess;
  const int team = team_for(pool.layout.head_dim);
  const unsigned grid = blocks_for(rows * team, kThreads);
  const Kind kk = pool.layout.k.fmt.kind, vk = pool.layout.v.fmt.kind;
  return with_dtype(dtype, [&](auto tc) {
    constexpr DType T = decltype(tc)::value;
    auto launch = [&](Kind kind, int side0, int sides) {
      return with_token_kind(kind, [&](auto kc) {
        quantize_write_kernel<T, decltype(kc)::value><<<dim3(grid, sides), kThreads, 0, stream>>>(
            key, value, rows, slots, pool, side0, team);
        return cudaGetLastError();
      });
    };
    if (kk == vk) return launch(kk, 0, 2);
    cudaError_t e = launch(kk, 0, 1);
    return e != cudaSuccess ? e : launch(vk, 1, 1);
  });
}

cudaError_t find_unstorable_tokens(const void* key, const void* value, DType dtype,
                                   int64_t num_tokens, int num_heads, int head_dim,
                                   const int64_t* slots, ElemFormat k_fmt, ElemFormat v_fmt,
                                   unsigned long long* first_bad, cudaStream_t stream) {
  const int64_t per_token = (int64_t)num_heads * head_dim / 8, per_side = num_tokens * per_token;
  if (per_side == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tc) {
    find_unstorable_kernel<decltype(tc)::value>
        <<<blocks_for(2 * per_side, kThreads), kThreads, 0, stream>>>(
            key, value, per_side, per_token, slots, k_fmt, v_fmt, head_dim, first_bad);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kvcomp
