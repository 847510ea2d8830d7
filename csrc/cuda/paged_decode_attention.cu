// Host side of paged decode attention: the launch plan (stage sizes, head
// slices, splits) from host-known sizes only, and the launches.
#include "cuda/paged_decode_attention.h"
#include "cuda/encode.cuh"
#include "cuda/paged_decode_kernel.cuh"

#include <algorithm>

namespace kvcomp {
namespace cuda {

using namespace pda;

namespace {

constexpr int kStageTarget = 8192;    // bytes per pipeline stage (whole blocks if they fit)
constexpr int kMinSplitTokens = 256;  // below this a split costs more than it hides

using Kernel = void (*)(Params);

// The kernel for (D, K kind, V kind): equal kinds and kivi pairs are compiled
// for their kinds; other pairs read the kinds at run time.
template <int D>
Kernel pick_kinds(Kind kk, Kind vk) {
#define KVC_SAME(K) \
  case Kind::K: return &decode_kernel<D, (int)Kind::K, (int)Kind::K>;
  if (kk == vk) {
    switch (kk) {
      KVC_SAME(FP32) KVC_SAME(FP16) KVC_SAME(BF16) KVC_SAME(FP8_E4M3) KVC_SAME(FP8_E5M2)
      KVC_SAME(INT8) KVC_SAME(INT4) KVC_SAME(INT2) KVC_SAME(INT8C) KVC_SAME(INT4C) KVC_SAME(INT2C)
      KVC_SAME(INT3) KVC_SAME(NF4) KVC_SAME(NF3) KVC_SAME(NF2)
      default: break;
    }
  }
#undef KVC_SAME
  if (kk == Kind::INT4C && vk == Kind::INT4)
    return &decode_kernel<D, (int)Kind::INT4C, (int)Kind::INT4>;
  if (kk == Kind::INT2C && vk == Kind::INT2)
    return &decode_kernel<D, (int)Kind::INT2C, (int)Kind::INT2>;
  return &decode_kernel<D, kDyn, kDyn>;
}

Kernel pick(int D, Kind kk, Kind vk) {
  switch (D) {
    case 64: return pick_kinds<64>(kk, vk);
    case 128: return pick_kinds<128>(kk, vk);
    default: return pick_kinds<256>(kk, vk);
  }
}

int meta_per_token(const Section& s) {
  return is_token_quant(s.fmt.kind) ? 2 * s.token_halves() : 0;
}
int meta_bytes(const Section& s, int D, int n) {
  return is_per_channel(s.fmt.kind) ? 4 * D : n * meta_per_token(s);
}
int part_bytes(const TileLayout& L, int n) {
  const int D = L.head_dim;
  return n * (L.k.row_bytes + L.v.row_bytes) + meta_bytes(L.k, D, n) + meta_bytes(L.v, D, n);
}

// Rotated sides (":h"): the query turns once before the kernel, the output
// once after it (format.h rotate / unrotate), a team of lanes per row.
constexpr int kRotThreads = 256;
// Rows of D values read as In, rotated (Forward) or turned back, written as Out.
template <DType In, DType Out, bool Forward>
__global__ void __launch_bounds__(kRotThreads)
    rotate_rows_kernel(const void* __restrict__ src, void* __restrict__ dst, int64_t rows, int D, int team) {
  const int64_t row = ((int64_t)blockIdx.x * kRotThreads + threadIdx.x) >> (__ffs(team) - 1);
  const int lane = threadIdx.x & (team - 1), iters = D > 256 ? 2 : 1;
  float x[2][8] = {};
#pragma unroll
  for (int it = 0; it < 2; ++it)
    if (row < rows && it < iters) load8<In>(src, row * D + (lane + it * team) * 8, x[it]);
  if constexpr (Forward) team_rotate(x, lane, team, iters, D);
  else team_unrotate(x, lane, team, iters, D);
#pragma unroll
  for (int it = 0; it < 2; ++it)
    if (row < rows && it < iters) store8<Out>(dst, row * D + (lane + it * team) * 8, x[it]);
}

struct Plan {
  Params k;
  Kernel kernel;
  int warps;
  size_t smem;
  int64_t rows;
};

// Everything but the device pointers of the outputs and the workspace.
Plan make_plan(const DecodeParams& p) {
  const TileLayout& L = p.pool.layout;
  const int D = L.head_dim, bs = L.block_size;
  Plan pl{};
  Params& k = pl.k;
  k.query = p.query;
  k.pool = p.pool.data;
  k.ids = p.bt.ids;
  k.seq_lens = p.seq_lens;
  k.num_blocks = p.pool.num_blocks;
  k.tile_bytes = p.pool.tile_bytes;
  k.max_blocks = p.bt.max_blocks;
  k.logits = p.logits;
  k.logits_len = p.logits_len;
  k.H = p.num_heads;
  k.kv_heads = p.pool.num_heads;
  k.G = p.num_heads / p.pool.num_heads;
  k.bs = bs;
  k.qscale = p.scale * 1.44269504088896341f;
  k.capl = p.softcap * 1.44269504088896341f;
  k.qdtype = L.k.fmt.rotated ? DType::F32 : p.dtype;
  k.odtype = L.v.fmt.rotated ? DType::F32 : p.dtype;

  // Stage parts: a whole block when it fits kStageTarget, else a power-of-2
  // share of one (>= 8 tokens keeps every piece a multiple of 16 bytes: a
  // token's metadata can be one 2-byte scale).
  int tsb = bs;
  while (tsb > 8 && part_bytes(L, tsb) > kStageTarget) tsb /= 2;
  k.tsb_log2 = __builtin_ctz(tsb);
  k.pb = part_bytes(L, tsb);
  k.nb = tsb == bs ? std::min(16, std::max(1, kStageTarget / k.pb)) : 1;
  int dst = 0;
  auto side = [&](const Section& s, SideDesc& d, Seg* seg) {
    d.kind = s.fmt.kind;
    d.group = s.fmt.group;
    d.code_off = dst;
    seg[0] = Seg{s.offset, s.row_bytes, dst, tsb * s.row_bytes};
    dst += seg[0].bytes;
    d.meta_off = dst;
    seg[1] = Seg{s.meta_offset(), meta_per_token(s), dst, meta_bytes(s, D, tsb)};
    dst += seg[1].bytes;
  };
  side(L.k, k.k, k.seg);
  side(L.v, k.v, k.seg + 2);

  // Head slices of 4 per warp; up to 8 slices per CTA, else head groups.
  const int slices = (k.G + kHeads - 1) / kHeads;
  k.sl = std::min(slices, kMaxWarps);
  k.wps = k.sl >= 4 ? 1 : 4 / k.sl;
  k.hg = (slices + k.sl - 1) / k.sl;
  pl.warps = k.sl * k.wps;
  const size_t combine = (size_t)pl.warps * kHeads * (2 + D) * sizeof(float);
  pl.smem = std::max((size_t)kStages * k.nb * k.pb, combine) + (kStages + 1) * k.nb * sizeof(int);
  pl.kernel = pick(D, L.k.fmt.kind, L.v.fmt.kind);
  pl.rows = p.bt.batch * p.num_heads;

  // Splits: at least two waves of CTAs, then the count within 2x of that
  // whose last wave is fullest (ranges adapt to seq_lens on the device).
  k.min_bps = std::max(1, kMinSplitTokens / bs);
  int per_sm = 1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, pl.kernel, pl.warps * 32, pl.smem) !=
          cudaSuccess ||
      per_sm < 1) {
    (void)cudaGetLastError();
    per_sm = 1;
  }
  const int64_t slots = (int64_t)per_sm * std::max(1, p.num_sms);
  const int64_t units = std::max<int64_t>(1, p.bt.batch * k.kv_heads * k.hg);
  const int64_t s_max = std::max<int64_t>(1, (p.bt.max_blocks + k.min_bps - 1) / k.min_bps);
  const int64_t s_lo = std::min(s_max, std::max<int64_t>(1, (2 * slots + units - 1) / units));
  auto fill = [&](int64_t s) {
    const int64_t ctas = units * s;
    return (double)ctas / (double)(((ctas + slots - 1) / slots) * slots);
  };
  int64_t best = s_lo;
  for (int64_t s = s_lo + 1; s <= std::min(s_max, 2 * s_lo); ++s)
    if (fill(s) > fill(best) + 0.02) best = s;
  k.splits = (int)std::min<int64_t>(best, 65535);
  return pl;
}

}  // namespace

bool paged_decode_head_dim_ok(int head_dim) {
  return head_dim == 64 || head_dim == 128 || head_dim == 256;
}

// Workspace: split partials (part_o, part_lse), then the rotated query and
// the rotated output (fp32 [rows, D] each) where a side is rotated.
struct Workspace {
  size_t part, q32, o32;
  size_t total() const { return part + q32 + o32; }
};
Workspace workspace_of(const DecodeParams& p, const Plan& pl) {
  const TileLayout& L = p.pool.layout;
  const size_t row_floats = (size_t)pl.rows * L.head_dim * sizeof(float);
  const size_t part = pl.k.splits == 1 ? 0 : (size_t)pl.rows * pl.k.splits * (L.head_dim + 1) * sizeof(float);
  return Workspace{(part + 15) / 16 * 16,  // the fp32 rows after it are read 16 bytes at a time
                   L.k.fmt.rotated ? row_floats : 0, L.v.fmt.rotated ? row_floats : 0};
}

size_t paged_decode_workspace_bytes(const DecodeParams& p) {
  if (p.bt.batch == 0 || p.num_heads == 0 || !paged_decode_head_dim_ok(p.pool.layout.head_dim))
    return 0;
  return workspace_of(p, make_plan(p)).total();
}

cudaError_t paged_decode_attention(const DecodeParams& p, void* workspace, cudaStream_t stream) {
  if (p.bt.batch == 0 || p.num_heads == 0) return cudaSuccess;
  if (!paged_decode_head_dim_ok(p.pool.layout.head_dim) || p.pool.num_heads <= 0 ||
      p.num_heads % p.pool.num_heads != 0 || p.bt.batch > 65535)
    return cudaErrorInvalidValue;
  Plan pl = make_plan(p);
  Params& k = pl.k;
  const int D = p.pool.layout.head_dim, team = team_for(D);
  const Workspace ws = workspace_of(p, pl);
  uint8_t* w = (uint8_t*)workspace;
  float* q32 = (float*)(w + ws.part);
  float* o32 = (float*)(w + ws.part + ws.q32);
  const unsigned rot_grid = blocks_for(pl.rows * team, kRotThreads);
  if (ws.q32) {
    cudaError_t e = with_dtype(p.dtype, [&](auto tc) {
      rotate_rows_kernel<decltype(tc)::value, DType::F32, true>
          <<<rot_grid, kRotThreads, 0, stream>>>(p.query, q32, pl.rows, D, team);
      return cudaGetLastError();
    });
    if (e != cudaSuccess) return e;
    k.query = q32;
  }
  k.out = ws.o32 ? (void*)o32 : p.out;
  k.lse = p.lse;
  if (k.splits > 1) {
    k.part_o = (float*)w;
    k.part_lse = k.part_o + pl.rows * k.splits * D;
  }
  dim3 grid(k.splits, k.kv_heads * k.hg, (unsigned)p.bt.batch);
  pl.kernel<<<grid, pl.warps * 32, pl.smem, stream>>>(k);
  if (k.splits > 1)
    merge_kernel<<<(unsigned)((pl.rows + 3) / 4), 128, 0, stream>>>(
        k.part_o, k.part_lse, pl.rows, k.splits, D, k.odtype, k.out, p.lse);
  if (ws.o32)
    return with_dtype(p.dtype, [&](auto tc) {
      rotate_rows_kernel<DType::F32, decltype(tc)::value, false>
          <<<rot_grid, kRotThreads, 0, stream>>>(o32, p.out, pl.rows, D, team);
      return cudaGetLastError();
    });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kvcomp
