// Warp-level encoders shared by quantize_write, seal_blocks and compact:
// a per-token row held by a team of lanes, and a per-channel block held by a
// warp (one lane per channel of a 32-channel chunk). Same scale math and
// rounding as the CPU encoder (csrc/cpu/codec.h), so the bytes match.
#pragma once
#include "cuda/common.cuh"

namespace kvcomp {
namespace cuda {

// Rows of head_dim channels are split over a team of `team` lanes (a power
// of 2 with team >= head_dim / 8, at most 32, aligned in the warp): lane q
// holds octets q and, when head_dim > 256, q + 32 (x[0], x[1]).
inline int team_for(int head_dim) {
  int team = 1;
  while (team < 32 && team < head_dim / 8) team *= 2;
  return team;
}

// Encodes per-token kind K for one row: the team's lanes hold x (zeros where
// `has` is false); `row`/`meta` null for a team that writes nothing. Every
// lane of the warp must call it (shuffles); iters (1 or 2) warp-uniform.
template <Kind K>
__device__ __forceinline__ void encode_row(const Section& s, uint8_t* tile, int t, int q, int team,
                                           int iters, int hd, const float (&x)[2][8]) {
  const int octets = hd / 8;
  uint8_t* row = tile ? tile + s.offset + (int64_t)t * s.row_bytes : nullptr;
  float* meta = tile ? reinterpret_cast<float*>(tile + s.meta_offset()) : nullptr;
  uint32_t c[8];
  if constexpr (is_raw(K)) {
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      if (it >= iters) break;
      const int oct = q + it * team;
#pragma unroll
      for (int e = 0; e < 8; ++e) c[e] = encode(K, x[it][e], QParams{1.0f, 0.0f});
      store_octet<K>(row, oct, c, row && oct < octets);
    }
  } else if constexpr (is_symmetric_token(K)) {
    float amax = 0.0f;
#pragma unroll
    for (int it = 0; it < 2; ++it)
#pragma unroll
      for (int e = 0; e < 8; ++e) amax = max_f(amax, fabsf(x[it][e]));
    const QParams p = symmetric_params(K, group_max(amax, team));
    if (meta && q == 0) meta[t] = p.scale;
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      if (it >= iters) break;
      const int oct = q + it * team;
#pragma unroll
      for (int e = 0; e < 8; ++e) c[e] = encode(K, x[it][e], p);
      store_octet<K>(row, oct, c, row && oct < octets);
    }
  } else {
    static_assert(is_grouped(K), "per-token kinds only");
    const int lanes = s.fmt.group / 8, groups = hd / s.fmt.group;  // lanes per group: 4, 8, 16
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      if (it >= iters) break;
      const int oct = q + it * team;
      float lo = x[it][0], hi = x[it][0];
#pragma unroll
      for (int e = 1; e < 8; ++e) lo = min_f(lo, x[it][e]), hi = max_f(hi, x[it][e]);
      const QParams p = asymmetric_params(K, group_min(lo, lanes), group_max(hi, lanes));
      const bool has = row && oct < octets;
      if (has && oct % lanes == 0)
        reinterpret_cast<float2*>(meta)[t * groups + oct / lanes] = make_float2(p.scale, p.zero);
#pragma unroll
      for (int e = 0; e < 8; ++e) c[e] = encode(K, x[it][e], p);
      store_octet<K>(row, oct, c, has);
    }
  }
}

// One channel of token t as the CPU decoder computes it (any kind).
__device__ __forceinline__ float decode_one(const Section& s, const uint8_t* tile, int t, int c) {
  const Kind k = s.fmt.kind;
  const uint32_t code = load_code(k, tile + s.offset + (int64_t)t * s.row_bytes, c);
  const float v = code_value(k, code);
  if (is_raw(k)) return v;
  const QParams p = load_params(s, tile, t, c);
  return is_symmetric_token(k) ? __fmul_rn(v, p.scale) : fmaf(v, p.scale, p.zero);
}

// decode_octet for a kind known at run time (per-token kinds).
__device__ __forceinline__ void decode_octet_any(const Section& s, const uint8_t* tile, int t,
                                                 int oct, int hd, float (&x)[8]) {
  switch (s.fmt.kind) {
    case Kind::FP32: decode_octet<Kind::FP32>(s, tile, t, oct, hd, x); break;
    case Kind::FP16: decode_octet<Kind::FP16>(s, tile, t, oct, hd, x); break;
    case Kind::BF16: decode_octet<Kind::BF16>(s, tile, t, oct, hd, x); break;
    case Kind::FP8_E4M3: decode_octet<Kind::FP8_E4M3>(s, tile, t, oct, hd, x); break;
    case Kind::FP8_E5M2: decode_octet<Kind::FP8_E5M2>(s, tile, t, oct, hd, x); break;
    case Kind::INT8: decode_octet<Kind::INT8>(s, tile, t, oct, hd, x); break;
    case Kind::INT4: decode_octet<Kind::INT4>(s, tile, t, oct, hd, x); break;
    default: decode_octet<Kind::INT2>(s, tile, t, oct, hd, x); break;
  }
}

// Per-channel kind K: encodes the first n tokens of a block (rows n.. are
// cleared) for the 32 channels of chunk `chunk`, lane = channel; get(t) is
// this lane's value of token t. Rows are written in ascending order, each
// right after its value is read, and the scales last, so a source may live
// in the block being written at or after the row being written (compact).
// The whole warp calls it.
template <Kind K, class Get>
__device__ __forceinline__ void encode_channel_block(const Section& s, uint8_t* tile, int chunk,
                                                     int n, int bs, int hd, Get get) {
  constexpr int b = kind_bits(K), nbytes = 4 * b;
  const int lane = threadIdx.x & 31, c = chunk * kChunk + lane;
  const bool valid = c < hd;  // int8c allows head_dim % 32 == 16
  float lo = n && valid ? get(0) : 0.0f, hi = lo;
  for (int t = 1; t < n; ++t) {
    const float v = valid ? get(t) : 0.0f;
    lo = min_f(lo, v), hi = max_f(hi, v);
  }
  const QParams p = asymmetric_params(K, lo, hi);
  uint8_t* data = tile + s.offset + chunk * nbytes + lane;
  for (int t = 0; t < bs; ++t) {
    uint32_t v = t < n && valid ? encode(K, get(t), p) << (b * (lane / nbytes)) : 0u;
#pragma unroll
    for (int off = 16; off >= nbytes; off >>= 1) v |= __shfl_down_sync(kFull, v, off);
    __syncwarp();  // every lane has read its source before any byte of row t changes
    if (lane < nbytes && valid) data[(int64_t)t * s.row_bytes] = (uint8_t)v;
  }
  if (valid) {
    float* meta = reinterpret_cast<float*>(tile + s.meta_offset());
    meta[c] = p.scale;
    meta[hd + c] = p.zero;
  }
}

}  // namespace cuda
}  // namespace kvcomp
