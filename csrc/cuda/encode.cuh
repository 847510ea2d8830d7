// Warp-level encoders shared by quantize_write, seal_blocks and compact:
// a per-token row held by a team of lanes, and a per-channel block held by a
// warp (one lane per channel of a 32-channel chunk). Same scale math, sums
// and rounding as the CPU encoder (csrc/cpu/codec.h), so the bytes match.
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

// Reduces v over each group's octets: a group of gl octets (gl a power of 2
// up to the team; wider only for a whole row of head_dim > 256) spans aligned
// lanes. Butterflies pair neighbours first, so a sum is format.h's
// octet_tree. Lanes past head_dim hold the identity of op. Every lane calls it.
template <class Op>
__device__ __forceinline__ void group_reduce(float (&v)[2], int gl, int team, Op op) {
  const int width = gl < team ? gl : team;
  for (int off = 1; off < width; off *= 2)
#pragma unroll
    for (int it = 0; it < 2; ++it) v[it] = op(v[it], __shfl_xor_sync(kFull, v[it], off));
  if (gl > team) v[0] = v[1] = op(v[0], v[1]);
}
struct Add {
  __device__ float operator()(float a, float b) const { return __fadd_rn(a, b); }
};
struct Max {
  __device__ float operator()(float a, float b) const { return max_f(a, b); }
};
struct Min {
  __device__ float operator()(float a, float b) const { return min_f(a, b); }
};

// The group metadata of each iteration's octet (format.h *_meta), from the
// values the team holds. Lanes with no octet hold zeros.
template <Kind K>
__device__ __forceinline__ void group_meta(const float (&x)[2][8], int team, int iters, int gl,
                                           QMeta (&m)[2]) {
  float a[2], b[2];
  if constexpr (is_absmax(K)) {
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      a[it] = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) a[it] = max_f(a[it], fabsf(x[it][e]));
    }
    group_reduce(a, gl, team, Max{});
#pragma unroll
    for (int it = 0; it < 2; ++it) m[it] = absmax_meta(K, a[it]);
  } else if constexpr (is_asym_token(K)) {
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      a[it] = b[it] = x[it][0];
#pragma unroll
      for (int e = 1; e < 8; ++e) a[it] = min_f(a[it], x[it][e]), b[it] = max_f(b[it], x[it][e]);
    }
    group_reduce(a, gl, team, Min{});
    group_reduce(b, gl, team, Max{});
#pragma unroll
    for (int it = 0; it < 2; ++it) m[it] = asym_meta(K, a[it], b[it]);
  } else if constexpr (is_int_sym(K)) {
    // The first element of largest magnitude: |v| larger, or equal and earlier.
    float mv[2];
    int mi[2];
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      mv[it] = x[it][0], mi[it] = 0;
#pragma unroll
      for (int e = 1; e < 8; ++e)
        if (fabsf(x[it][e]) > fabsf(mv[it])) mv[it] = x[it][e], mi[it] = e;
      mi[it] += 8 * ((lane % team) + it * team);
    }
    const int width = gl < team ? gl : team;
    for (int off = 1; off < width; off *= 2)
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        const float ov = __shfl_xor_sync(kFull, mv[it], off);
        const int oi = __shfl_xor_sync(kFull, mi[it], off);
        if (fabsf(ov) > fabsf(mv[it]) || (fabsf(ov) == fabsf(mv[it]) && oi < mi[it])) mv[it] = ov, mi[it] = oi;
      }
    if (gl > team && (fabsf(mv[1]) > fabsf(mv[0]))) mv[0] = mv[1];
    if (gl > team) mv[1] = mv[0];
#pragma unroll
    for (int it = 0; it < 2; ++it) m[it] = sym_meta(K, mv[it]);
  } else {
    static_assert(is_nf(K), "per-token quantized kinds only");
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      a[it] = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) a[it] = fmaf(x[it][e], x[it][e], a[it]);
    }
    group_reduce(a, gl, team, Add{});
    float rms[2], best[2] = {INFINITY, INFINITY};
#pragma unroll
    for (int it = 0; it < 2; ++it) rms[it] = sqrtf(a[it] / (float)(8 * gl)), m[it] = QMeta{0, 0};
    for (int i = 0; i < kNFScales; ++i) {
      uint16_t h[2];
      float sc[2];
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        h[it] = half_up(min_f(rms[it] * nf_scale_factor(i), kHalfMax));
        sc[it] = half_to_float(h[it]);
        a[it] = 0.0f;
        if (sc[it] != 0.0f)
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float v = x[it][e], d = fmaf(-sc[it], nf_level(K, nf_code(K, v / sc[it])), v);
            a[it] = fmaf(d, d, a[it]);
          }
      }
      group_reduce(a, gl, team, Add{});
#pragma unroll
      for (int it = 0; it < 2; ++it)
        if (sc[it] != 0.0f && a[it] < best[it]) best[it] = a[it], m[it] = QMeta{h[it], 0};
    }
  }
}

// Encodes per-token kind K for one row: the team's lanes hold x (true
// values, zeros where a lane has no octet; rotated here for ":h");
// `tile` null for a team that writes nothing. Every lane of the warp must
// call it (shuffles); iters (1 or 2) warp-uniform.
template <Kind K>
__device__ __forceinline__ void encode_row(const Section& s, uint8_t* tile, int t, int q, int team,
                                           int iters, int hd, float (&x)[2][8]) {
  const int octets = hd / 8;
  uint8_t* row = tile ? tile + s.offset + (int64_t)t * s.row_bytes : nullptr;
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
  } else {
    static_assert(is_token_quant(K), "per-token kinds only");
    if (s.fmt.rotated) team_rotate(x, q, team, iters, hd);
    const int gl = group_size(s.fmt, hd) / 8;  // octets per group
    QMeta m[2];
    group_meta<K>(x, team, iters, gl, m);
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      if (it >= iters) break;
      const int oct = q + it * team;
      const bool has = row && oct < octets;
      if (has && oct % gl == 0) store_meta(s, tile, t, oct / gl, m[it]);
      const QParams p = params_of(K, m[it]);
#pragma unroll
      for (int e = 0; e < 8; ++e) c[e] = encode(K, x[it][e], p);
      store_octet<K>(row, oct, c, has);
    }
  }
}

// One channel of token t as the CPU decoder computes it (raw and
// per-channel kinds: what seal_blocks and compact read one channel at a time).
__device__ __forceinline__ float decode_one(const Section& s, const uint8_t* tile, int t, int c) {
  const Kind k = s.fmt.kind;
  const uint32_t code = load_code(k, tile + s.offset + (int64_t)t * s.row_bytes, c);
  const float v = code_value(k, code);
  if (is_raw(k)) return v;
  const QParams p = load_params(s, tile, t, c);
  return is_affine(k) ? fmaf(v, p.scale, p.zero) : __fmul_rn(v, p.scale);
}

// decode_octet for a kind known at run time (per-token kinds).
static __device__ __noinline__ void decode_octet_any(const Section& s, const uint8_t* tile, int t,
                                                 int oct, int hd, float (&x)[8]) {
#define KVC_DECODE(K) \
  case Kind::K: decode_octet<Kind::K>(s, tile, t, oct, hd, x); break;
  switch (s.fmt.kind) {
    KVC_DECODE(FP32) KVC_DECODE(FP16) KVC_DECODE(BF16) KVC_DECODE(FP8_E4M3) KVC_DECODE(FP8_E5M2)
    KVC_DECODE(INT8) KVC_DECODE(INT4) KVC_DECODE(INT3) KVC_DECODE(INT2) KVC_DECODE(INT4S)
    KVC_DECODE(INT3S) KVC_DECODE(INT2S) KVC_DECODE(NF4) KVC_DECODE(NF3)
    default: decode_octet<Kind::NF2>(s, tile, t, oct, hd, x); break;
  }
#undef KVC_DECODE
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
  const QMeta m = asym_meta(K, lo, hi);
  const QParams p = params_of(K, m);
  uint8_t* data = tile + s.offset + chunk * nbytes + lane;
  for (int t = 0; t < bs; ++t) {
    uint32_t v = t < n && valid ? encode(K, get(t), p) << (b * (lane / nbytes)) : 0u;
#pragma unroll
    for (int off = 16; off >= nbytes; off >>= 1) v |= __shfl_down_sync(kFull, v, off);
    __syncwarp();  // every lane has read its source before any byte of row t changes
    if (lane < nbytes && valid) data[(int64_t)t * s.row_bytes] = (uint8_t)v;
  }
  if (valid) store_channel_meta(s, tile, c, hd, m);
}

}  // namespace cuda
}  // namespace kvcomp
