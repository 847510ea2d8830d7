// gather_dequant: a team of lanes per output row (as quantize_write's
// encoder: lane q holds octets q and q + team), so a rotated side turns
// back with shuffles; rows past seq_len, or in a block the table does not
// name, are zero.
#include "cuda/encode.cuh"
#include "cuda/launch.h"

namespace kvcomp {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <Kind K, DType T>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(Pool pool, BlockTables bt, const int32_t* __restrict__ seq_lens, int64_t max_len,
                  void* __restrict__ key, void* __restrict__ value, int side0, int team) {
  const int side = side0 + blockIdx.y;
  const int hd = pool.layout.head_dim, bs = pool.layout.block_size, octets = hd / 8;
  const int iters = hd > 256 ? 2 : 1;
  const int64_t row = ((int64_t)blockIdx.x * kThreads + threadIdx.x) >> (__ffs(team) - 1);  // (b, h, pos)
  const int q = threadIdx.x & (team - 1);
  const int64_t rows = bt.batch * pool.num_heads * max_len;
  const int64_t pos = row % max(max_len, (int64_t)1), bh = row / max(max_len, (int64_t)1);
  Section s = pool.layout.k;  // not `side ? ...`: that indexes the parameter struct via the stack
  if (side) s = pool.layout.v;
  float x[2][8] = {};
  if (row < rows) {
    const int64_t b = bh / pool.num_heads;
    const int h = (int)(bh % pool.num_heads);
    const int64_t len = min((int64_t)max(seq_lens[b], 0), bt.max_blocks * bs);
    const int32_t id = pos < len ? bt.ids[b * bt.max_blocks + pos / bs] : -1;
    if (id >= 0 && id < pool.num_blocks)
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        const int oct = q + it * team;
        if (it < iters && oct < octets) decode_octet<K>(s, pool.tile(id, h), (int)(pos % bs), oct, hd, x[it]);
      }
  }
  if constexpr (is_token_quant(K))
    if (s.fmt.rotated) team_unrotate(x, q, team, iters, hd);  // zeros stay zeros
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int oct = q + it * team;
    if (row < rows && it < iters && oct < octets) store8<T>(side ? value : key, row * hd + oct * 8, x[it]);
  }
}

}  // namespace

cudaError_t gather_dequant(const Pool& pool, const BlockTables& bt, const int32_t* seq_lens,
                           int64_t max_len, DType dtype, void* key, void* value,
                           cudaStream_t stream) {
  const int64_t rows = bt.batch * pool.num_heads * max_len;
  if (rows == 0) return cudaSuccess;
  const int team = team_for(pool.layout.head_dim);
  const unsigned grid = blocks_for(rows * team, kThreads);
  return with_dtype(dtype, [&](auto tc) {
    auto launch = [&](Kind kind, int side0, int sides) {
      return with_kind(kind, [&](auto kc) {
        gather_kernel<decltype(kc)::value, decltype(tc)::value>
            <<<dim3(grid, sides), kThreads, 0, stream>>>(pool, bt, seq_lens, max_len, key, value,
                                                         side0, team);
        return cudaGetLastError();
      });
    };
    const Kind kk = pool.layout.k.fmt.kind, vk = pool.layout.v.fmt.kind;
    if (kk == vk) return launch(kk, 0, 2);
    cudaError_t e = launch(kk, 0, 1);
    return e != cudaSuccess ? e : launch(vk, 1, 1);
  });
}

}  // namespace cuda
}  // namespace kvcomp
