// Device helpers shared by the kernels of csrc/cuda/: kind/dtype dispatch,
// 8-channel ("octet") loads and stores, decoding of a tile octet, sub-byte
// packing across lanes. Element math comes from kvcomp/format.h so the CUDA
// kernels round exactly like the CPU ones.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "kvcomp/args.h"
#include "kvcomp/format.h"

namespace kvcomp {
namespace cuda {

constexpr unsigned kFull = 0xffffffffu;

template <Kind K>
using KindC = std::integral_constant<Kind, K>;
template <DType T>
using DTypeC = std::integral_constant<DType, T>;

// Calls f(KindC<K>{}) for a per-token kind (what quantize_write writes).
template <class F>
cudaError_t with_token_kind(Kind k, F&& f) {
  switch (k) {
    case Kind::FP32: return f(KindC<Kind::FP32>{});
    case Kind::FP16: return f(KindC<Kind::FP16>{});
    case Kind::BF16: return f(KindC<Kind::BF16>{});
    case Kind::FP8_E4M3: return f(KindC<Kind::FP8_E4M3>{});
    case Kind::FP8_E5M2: return f(KindC<Kind::FP8_E5M2>{});
    case Kind::INT8: return f(KindC<Kind::INT8>{});
    case Kind::INT4: return f(KindC<Kind::INT4>{});
    case Kind::INT3: return f(KindC<Kind::INT3>{});
    case Kind::INT2: return f(KindC<Kind::INT2>{});
    case Kind::INT4S: return f(KindC<Kind::INT4S>{});
    case Kind::INT3S: return f(KindC<Kind::INT3S>{});
    case Kind::INT2S: return f(KindC<Kind::INT2S>{});
    case Kind::NF4: return f(KindC<Kind::NF4>{});
    case Kind::NF3: return f(KindC<Kind::NF3>{});
    case Kind::NF2: return f(KindC<Kind::NF2>{});
    default: return cudaErrorInvalidValue;
  }
}
// Any kind, per-channel ones included.
template <class F>
cudaError_t with_kind(Kind k, F&& f) {
  switch (k) {
    case Kind::INT8C: return f(KindC<Kind::INT8C>{});
    case Kind::INT4C: return f(KindC<Kind::INT4C>{});
    case Kind::INT2C: return f(KindC<Kind::INT2C>{});
    default: return with_token_kind(k, f);
  }
}
template <class F>
cudaError_t with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(DTypeC<DType::F32>{});
    case DType::F16: return f(DTypeC<DType::F16>{});
    default: return f(DTypeC<DType::BF16>{});
  }
}

inline unsigned blocks_for(int64_t n, int per_block) {
  return (unsigned)((n + per_block - 1) / per_block);
}

// ------------------------------------------------------ activations (dtype)
// x = src[i .. i+8) as floats; i a multiple of 8, src 16-byte aligned.
template <DType T>
__device__ __forceinline__ void load8(const void* src, int64_t i, float (&x)[8]) {
  if constexpr (T == DType::F32) {
    const float4* p = reinterpret_cast<const float4*>((const float*)src + i);
    float4 a = p[0], b = p[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  } else {
    uint4 u = *reinterpret_cast<const uint4*>((const uint16_t*)src + i);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      uint16_t h = (uint16_t)(w[e / 2] >> (16 * (e % 2)));
      x[e] = T == DType::F16 ? __half2float(__ushort_as_half(h)) : bf16_to_float(h);
    }
  }
}
// dst[i .. i+8) = x rounded to the dtype (nearest even, as the CPU stores).
template <DType T>
__device__ __forceinline__ void store8(void* dst, int64_t i, const float (&x)[8]) {
  if constexpr (T == DType::F32) {
    float4* p = reinterpret_cast<float4*>((float*)dst + i);
    p[0] = make_float4(x[0], x[1], x[2], x[3]);
    p[1] = make_float4(x[4], x[5], x[6], x[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t lo = T == DType::F16 ? float_to_half(x[2 * j]) : float_to_bf16(x[2 * j]);
      uint32_t hi = T == DType::F16 ? float_to_half(x[2 * j + 1]) : float_to_bf16(x[2 * j + 1]);
      w[j] = lo | hi << 16;
    }
    *reinterpret_cast<uint4*>((uint16_t*)dst + i) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// One element src[i] / dst[i] of the dtype.
template <DType T>
__device__ __forceinline__ float load1(const void* src, int64_t i) {
  if constexpr (T == DType::F32) return ((const float*)src)[i];
  const uint16_t h = ((const uint16_t*)src)[i];
  return T == DType::F16 ? __half2float(__ushort_as_half(h)) : bf16_to_float(h);
}
template <DType T>
__device__ __forceinline__ void store1(void* dst, int64_t i, float x) {
  if constexpr (T == DType::F32) ((float*)dst)[i] = x;
  else ((uint16_t*)dst)[i] = T == DType::F16 ? float_to_half(x) : float_to_bf16(x);
}

// ------------------------------------------------------------ tile octets
// Packed sub-byte octets: octet `oct` (channels 8*oct .. 8*oct+7) of a row
// lies in chunk oct/4; its 8 codes sit in the 8 bytes at
// chunk * 4b + 8 * (q % per), shifted by b * (q / per), with q = oct % 4 and
// per = 4b/8 (format.h's packing rule for channels 8q .. 8q+7 of a chunk).
// 3-bit codes: their low two bits as int2's (at chunk * 12), bit 2 in byte
// chunk * 12 + 8 + q.
template <Kind K>
__device__ __forceinline__ int octet_byte(int oct) {
  constexpr int b = kind_bits(K);
  if constexpr (b >= 8) return oct * b;
  if constexpr (b == 3) return oct / 4 * 12;
  constexpr int per = 4 * b / 8;
  return oct / 4 * (4 * b) + 8 * (oct % 4 % per);
}
template <Kind K>
__device__ __forceinline__ int octet_shift(int oct) {
  constexpr int b = kind_bits(K);
  if constexpr (b >= 8) return 0;
  if constexpr (b == 3) return 2 * (oct % 4);
  return b * (oct % 4 / (4 * b / 8));
}

// The 8 codes of octet `oct` of a row.
template <Kind K>
__device__ __forceinline__ void load_octet_codes(const uint8_t* row, int oct, uint32_t (&c)[8]) {
  constexpr int b = kind_bits(K);
  const uint8_t* p = row + octet_byte<K>(oct);
  if constexpr (b == 32) {
    uint4 u = reinterpret_cast<const uint4*>(p)[0], v = reinterpret_cast<const uint4*>(p)[1];
    c[0] = u.x, c[1] = u.y, c[2] = u.z, c[3] = u.w, c[4] = v.x, c[5] = v.y, c[6] = v.z, c[7] = v.w;
  } else if constexpr (b == 16) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = (w[e / 2] >> (16 * (e % 2))) & 0xffffu;
  } else {
    // 3-bit chunks are 12 bytes: 4-byte loads (8-byte ones may be misaligned).
    const uint32_t lo = reinterpret_cast<const uint32_t*>(p)[0], hi = reinterpret_cast<const uint32_t*>(p)[1];
    const int shift = octet_shift<K>(oct);
    const uint32_t mask = b == 8 ? 0xffu : b == 3 ? 3u : (uint32_t)max_code(K);
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = (((e < 4 ? lo : hi) >> (8 * (e % 4))) >> shift) & mask;
    if constexpr (b == 3) {
      const uint32_t bits = p[8 + oct % 4];
#pragma unroll
      for (int e = 0; e < 8; ++e) c[e] |= (bits >> e & 1u) << 2;
    }
  }
}

// x = the channels 8*oct .. 8*oct+7 of token t in section s of a tile,
// dequantized as the CPU decoder does (in the stored space: rotated sides
// are turned back by the caller, see team_unrotate).
template <Kind K>
__device__ __forceinline__ void decode_octet(const Section& s, const uint8_t* tile, int t, int oct,
                                             int hd, float (&x)[8]) {
  const uint8_t* row = tile + s.offset + (int64_t)t * s.row_bytes;
  uint32_t c[8];
  load_octet_codes<K>(row, oct, c);
  if constexpr (K == Kind::FP32) {
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = __uint_as_float(c[e]);
  } else if constexpr (is_raw(K)) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      x[e] = K == Kind::FP16 ? __half2float(__ushort_as_half((uint16_t)c[e])) : bf16_to_float((uint16_t)c[e]);
  } else if constexpr (is_per_channel(K)) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const QParams p = params_of(K, load_channel_meta(s, tile, 8 * oct + e, hd));
      x[e] = fmaf((float)c[e], p.scale, p.zero);
    }
  } else {
    const QParams p = params_of(K, load_meta(s, tile, t, 8 * oct / group_size(s.fmt, hd)));
#pragma unroll
    for (int e = 0; e < 8; ++e)
      x[e] = is_affine(K) ? fmaf((float)c[e], p.scale, p.zero) : __fmul_rn(code_value(K, c[e]), p.scale);
  }
}

// Stores the 8 codes of octet `oct` of a row (codes as format.h's encode
// returns them). Sub-byte kinds combine the octets of a chunk across lanes:
// every lane of the warp must call it, octets of one chunk in lanes 4j..4j+3
// (lane % 4 == oct % 4); `store` says whether this lane's octet is written.
template <Kind K>
__device__ __forceinline__ void store_octet(uint8_t* row, int oct, const uint32_t (&c)[8],
                                            bool store) {
  constexpr int b = kind_bits(K);
  uint8_t* p = row + octet_byte<K>(oct);
  if constexpr (b == 32) {
    if (store) {
      reinterpret_cast<uint4*>(p)[0] = make_uint4(c[0], c[1], c[2], c[3]);
      reinterpret_cast<uint4*>(p)[1] = make_uint4(c[4], c[5], c[6], c[7]);
    }
  } else if constexpr (b == 16) {
    if (store)
      *reinterpret_cast<uint4*>(p) = make_uint4(c[0] | c[1] << 16, c[2] | c[3] << 16,
                                                c[4] | c[5] << 16, c[6] | c[7] << 16);
  } else {
    constexpr int lb = b == 3 ? 2 : b;  // bits in the low bytes
    constexpr uint32_t lmask = (1u << lb) - 1u;
    const int shift = octet_shift<K>(oct);
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      lo |= ((c[e] & lmask) << shift) << (8 * e);
      hi |= ((c[e + 4] & lmask) << shift) << (8 * e);
    }
    if constexpr (b == 3) {  // each octet owns its high-bit byte
      uint32_t bits = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) bits |= (c[e] >> 2 & 1u) << e;
      if (store) p[8 + oct % 4] = (uint8_t)bits;
    }
    if constexpr (lb < 8) {
      // OR in the octets that share these bytes: lanes q + per, q + 2 per, ...
#pragma unroll
      for (int off = 2; off >= 4 * lb / 8; off >>= 1) {
        lo |= __shfl_down_sync(kFull, lo, off);
        hi |= __shfl_down_sync(kFull, hi, off);
      }
      store = store && oct % 4 < 4 * lb / 8;
    }
    if (store) {
      reinterpret_cast<uint32_t*>(p)[0] = lo;
      reinterpret_cast<uint32_t*>(p)[1] = hi;
    }
  }
}

// ---------------------------------------------------------- the rotation
// A row of head_dim channels held by a team of lanes (format.h: lane q holds
// octets q and q + team, x[0] and x[1]; iters = 1 or 2): the Walsh-Hadamard
// butterflies in format.h's order, stage w = 1, 2, 4 in registers, then
// across lanes, then (iters 2) across x[0] and x[1]. Every lane of the warp
// calls it. Exactly the CPU's fp32 operations, so the bits match.
__device__ __forceinline__ void team_fwht(float (&x)[2][8], int q, int team, int iters) {
#pragma unroll
  for (int it = 0; it < 2; ++it)
#pragma unroll
    for (int w = 1; w < 8; w *= 2)
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (!(e & w)) {
          const float a = x[it][e], b = x[it][e + w];
          x[it][e] = __fadd_rn(a, b);
          x[it][e + w] = __fsub_rn(a, b);
        }
  for (int m = 1; m < team; m *= 2)
#pragma unroll
    for (int it = 0; it < 2; ++it)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float o = __shfl_xor_sync(kFull, x[it][e], m);
        x[it][e] = (q & m) ? __fsub_rn(o, x[it][e]) : __fadd_rn(x[it][e], o);
      }
  if (iters == 2)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float a = x[0][e], b = x[1][e];
      x[0][e] = __fadd_rn(a, b);
      x[1][e] = __fsub_rn(a, b);
    }
}
// format.h rotate / unrotate of a team's row (hd = 8 * team * iters).
__device__ __forceinline__ void team_rotate(float (&x)[2][8], int q, int team, int iters, int hd) {
#pragma unroll
  for (int it = 0; it < 2; ++it)
#pragma unroll
    for (int e = 0; e < 8; ++e) x[it][e] = __fmul_rn(x[it][e], hadamard_sign(8 * (q + it * team) + e));
  team_fwht(x, q, team, iters);
  const float r = hadamard_norm(hd);
#pragma unroll
  for (int it = 0; it < 2; ++it)
#pragma unroll
    for (int e = 0; e < 8; ++e) x[it][e] = __fmul_rn(x[it][e], r);
}
__device__ __forceinline__ void team_unrotate(float (&x)[2][8], int q, int team, int iters, int hd) {
  team_fwht(x, q, team, iters);
  const float r = hadamard_norm(hd);
#pragma unroll
  for (int it = 0; it < 2; ++it)
#pragma unroll
    for (int e = 0; e < 8; ++e)
      x[it][e] = __fmul_rn(__fmul_rn(x[it][e], r), hadamard_sign(8 * (q + it * team) + e));
}

// Butterfly reductions over aligned groups of `width` lanes (a power of 2).
__device__ __forceinline__ float group_max(float v, int width) {
  for (int off = width / 2; off > 0; off >>= 1) v = max_f(v, __shfl_xor_sync(kFull, v, off));
  return v;
}
__device__ __forceinline__ float group_min(float v, int width) {
  for (int off = width / 2; off > 0; off >>= 1) v = min_f(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

}  // namespace cuda
}  // namespace kvcomp
