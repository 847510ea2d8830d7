// gather_dequant: one thread per 8 channels of an output row; rows past
// seq_len, or in a block the table does not name, are zero.
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace kvcomp {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <Kind K, DType T>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(Pool pool, BlockTables bt, const int32_t* __restrict__ seq_lens, int64_t max_len,
                  void* __restrict__ key, void* __restrict__ value, int side0) {
  const int side = side0 + blockIdx.y;
  const int hd = pool.layout.head_dim, bs = pool.layout.block_size, octets = hd / 8;
  const int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x;  // (b, h, pos, octet)
  if (idx >= bt.batch * pool.num_heads * max_len * octets) return;
  const int64_t pos = idx / octets % max_len, bh = idx / octets / max_len;
  const int64_t b = bh / pool.num_heads;
  const int h = (int)(bh % pool.num_heads);
  const int64_t len = min((int64_t)max(seq_lens[b], 0), bt.max_blocks * bs);
  float x[8] = {};
  if (pos < len) {
    const int32_t id = bt.ids[b * bt.max_blocks + pos / bs];
    Section s = pool.layout.k;
    if (side) s = pool.layout.v;
    if (id >= 0 && id < pool.num_blocks)
      decode_octet<K>(s, pool.tile(id, h), (int)(pos % bs), (int)(idx % octets), hd, x);
  }
  store8<T>(side ? value : key, idx * 8, x);
}

}  // namespace

cudaError_t gather_dequant(const Pool& pool, const BlockTables& bt, const int32_t* seq_lens,
                           int64_t max_len, DType dtype, void* key, void* value,
                           cudaStream_t stream) {
  const int64_t threads = bt.batch * pool.num_heads * max_len * (pool.layout.head_dim / 8);
  if (threads == 0) return cudaSuccess;
  const unsigned grid = blocks_for(threads, kThreads);
  return with_dtype(dtype, [&](auto tc) {
    auto launch = [&](Kind kind, int side0, int sides) {
      return with_kind(kind, [&](auto kc) {
        gather_kernel<decltype(kc)::value, decltype(tc)::value>
            <<<dim3(grid, sides), kThreads, 0, stream>>>(pool, bt, seq_lens, max_len, key, value,
                                                         side0);
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
