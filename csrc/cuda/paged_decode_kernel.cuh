// The decode-attention kernel (CUDA cores, fp32 math). One CTA per (split,
// KV head [, head group], sequence); all query heads of the group share each
// K/V byte, which is read from memory once.
//
// Memory: whole 16-byte chunks of the tiles stream into shared memory with
// cp.async, kStages stages deep (each stage ~8 KB: a few blocks, or a part
// of one large block), so ~24 KB per CTA are in flight without registers.
//
// Compute, per warp: 4 query heads; a lane owns 16 channels of one token
// (NS = D/16 lanes per token, TPW = 32/NS tokens per step). K and V codes are
// turned into exact code values in registers; scales are folded in outside
// the channel loops (per token, per group, or per channel for int*c). The
// lane's q registers are permuted so that a 2-level reduce-scatter plus an
// all-reduce leaves each lane with one head's logit (no selects). Online
// softmax in log2 units; p reaches the V lanes by 4 shuffles.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <math_constants.h>
#include <stdint.h>

#include "kvcomp/args.h"

namespace kvcomp {
namespace cuda {
namespace pda {

constexpr int kHeads = 4;    // query heads per warp
constexpr int kCh = 16;      // channels per lane
constexpr int kStages = 4;   // cp.async pipeline depth
constexpr int kMaxWarps = 8;
constexpr int kDyn = -1;  // template kind: read from Params at run time
constexpr float kLn2 = 0.693147180559945309f;

// One side's region of a stage part in shared memory.
struct SideDesc {
  Kind kind;
  int group;      // int4/int2 group
  int code_off;   // codes [tsb][row_bytes]
  int meta_off;   // scales (/zeros) of those tokens, or the block's per-channel ones
};

// A contiguous piece of a tile copied into a part: bytes from
// tile + src + t0 * per_tok (t0: first token of the part within its block).
struct Seg {
  int src, per_tok, dst, bytes;
};

struct Params {
  const void* query;
  void* out;
  float* lse;
  float* logits;
  float* part_o;    // [batch * H][splits][D] normalized partial outputs
  float* part_lse;  // [batch * H][splits], log2 units
  const uint8_t* pool;
  const int32_t* ids;
  const int32_t* seq_lens;
  int64_t num_blocks, tile_bytes, max_blocks, logits_len;
  int H, G, kv_heads, bs;
  int splits, min_bps;  // splits per sequence; fewest blocks in a split
  int sl, wps, hg;      // head slices per CTA, warps per slice, head groups per KV head
  int tsb_log2, nb, pb; // tokens per part (power of 2), parts per stage, bytes per part
  Seg seg[4];
  SideDesc k, v;
  float qscale;  // scale * log2(e)
  float capl;    // softcap * log2(e); 0: no soft-capping
  DType qdtype, odtype;  // of query and out (fp32 scratch where a side is rotated)
};

// ------------------------------------------------------------ small helpers
__device__ __forceinline__ float load_act(const void* p, DType t, int64_t i) {
  if (t == DType::F32) return ((const float*)p)[i];
  if (t == DType::F16) return __half2float(((const __half*)p)[i]);
  return __bfloat162float(((const __nv_bfloat16*)p)[i]);
}
__device__ __forceinline__ void store_act(void* p, DType t, int64_t i, float v) {
  if (t == DType::F32) ((float*)p)[i] = v;
  else if (t == DType::F16) ((__half*)p)[i] = __float2half_rn(v);
  else ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// --------------------------------------------------------------- code values
// x = the 2^s-scaled bit field f (f < 2^23) as a float, times 2^-s: the
// exponent-bias trick, exact, one LOP3 and one FFMA.
template <int S>
__device__ __forceinline__ float field(uint32_t w, uint32_t mask) {
  return fmaf(__uint_as_float((w & (mask << S)) | 0x4B000000u), 1.0f / (1 << S),
              -8388608.0f / (1 << S));
}

__device__ __forceinline__ float2 fp8x2(uint32_t w16, Kind k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)w16,
                                             k == Kind::FP8_E4M3 ? __NV_E4M3 : __NV_E5M2);
  return __half22float2(__half2(r));
#else
  return k == Kind::FP8_E4M3 ? make_float2(decode_e4m3(w16 & 0xff), decode_e4m3(w16 >> 8))
                             : make_float2(decode_e5m2(w16 & 0xff), decode_e5m2(w16 >> 8));
#endif
}

// Element e of a lane's 16 values is channel chan(k, j, e) of lane slice j
// (docs/format.md packing: int4 byte i = ch i | ch i+16; int2 byte i =
// ch i | i+8 | i+16 | i+24, per 32-channel chunk; 3 bits as 2, plus bit 2).
// Runs of 4 are consecutive.
__device__ __forceinline__ int chan(Kind k, int j, int e) {
  const int b = kind_bits(k);
  if (b == 4) return 32 * (j >> 1) + 8 * (j & 1) + (e & 7) + 16 * (e >> 3);
  if (b == 2 || b == 3) return 32 * (j >> 1) + 4 * (j & 1) + (e & 3) + 8 * (e >> 2);
  return 16 * j + e;
}

// Integer codes of a lane's 16 channels of b-bit kinds (b = 4, 3, 2) at the
// token's row in shared memory.
template <int B>
__device__ __forceinline__ void int_codes16(const uint8_t* row, int j, uint32_t (&c)[16]) {
  if constexpr (B == 4) {  // e = byte (e % 8), nibble (e / 8)
    uint2 a = *(const uint2*)(row + 8 * j);
#pragma unroll
    for (int e = 0; e < 16; ++e) c[e] = (((e % 8) < 4 ? a.x : a.y) >> (8 * (e % 4) + 4 * (e / 8))) & 15u;
  } else {  // e = byte (e % 4), crumb (e / 4); 3 bits: bit 2 of channel 8m + i in byte 8 + m, bit i
    const uint8_t* chunk = row + (B == 3 ? 12 : 8) * (j >> 1);
    const uint32_t a = *(const uint32_t*)(chunk + 4 * (j & 1));
#pragma unroll
    for (int e = 0; e < 16; ++e) c[e] = (a >> (8 * (e & 3) + 2 * (e >> 2))) & 3u;
    if constexpr (B == 3) {
      const uint32_t h = *(const uint32_t*)(chunk + 8) >> (4 * (j & 1));
#pragma unroll
      for (int e = 0; e < 16; ++e) c[e] |= ((h >> (8 * (e >> 2) + (e & 3))) & 1u) << 2;
    }
  }
}

// Code values (before scale and zero) of a lane's 16 channels of the token
// row at `row` in shared memory: 2 * bits bytes at row + j * 2 * bits (16-byte
// aligned for >= 8 bits); 3-bit rows as int_codes16. lut: NF levels by code.
__device__ __forceinline__ void codes16(Kind k, const uint8_t* row, int j, const float* lut,
                                        float (&x)[16]) {
  const uint8_t* p = row + j * 2 * kind_bits(k);
  switch (k) {
    case Kind::FP32:
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float4 a = ((const float4*)p)[i];
        x[4 * i] = a.x, x[4 * i + 1] = a.y, x[4 * i + 2] = a.z, x[4 * i + 3] = a.w;
      }
      break;
    case Kind::FP16:
    case Kind::BF16:
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        uint4 a = ((const uint4*)p)[i];
        const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          if (k == Kind::FP16) {
            x[8 * i + 2 * m] = __half2float(__ushort_as_half((unsigned short)(w[m] & 0xffff)));
            x[8 * i + 2 * m + 1] = __half2float(__ushort_as_half((unsigned short)(w[m] >> 16)));
          } else {
            x[8 * i + 2 * m] = __uint_as_float(w[m] << 16);
            x[8 * i + 2 * m + 1] = __uint_as_float(w[m] & 0xffff0000u);
          }
        }
      }
      break;
    case Kind::FP8_E4M3:
    case Kind::FP8_E5M2: {
      uint4 a = *(const uint4*)p;
      const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        float2 lo = fp8x2(w[m] & 0xffff, k), hi = fp8x2(w[m] >> 16, k);
        x[4 * m] = lo.x, x[4 * m + 1] = lo.y, x[4 * m + 2] = hi.x, x[4 * m + 3] = hi.y;
      }
      break;
    }
    case Kind::INT8:
    case Kind::INT8C: {
      // Signed codes are offset by 128 (xor of the sign bit) and back.
      const uint32_t flip = k == Kind::INT8 ? 0x80808080u : 0u;
      const float off = k == Kind::INT8 ? 8388736.0f : 8388608.0f;
      uint4 a = *(const uint4*)p;
      const uint32_t w[4] = {a.x ^ flip, a.y ^ flip, a.z ^ flip, a.w ^ flip};
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          x[4 * m + i] = __uint_as_float(__byte_perm(w[m], 0x4B000000u, 0x7440 + i)) - off;
      break;
    }
    case Kind::INT4:
    case Kind::INT4C:
    case Kind::INT4S: {
      // e = byte (e % 8), nibble (e / 8); bytes 2-3 of a word after >> 16.
      uint2 a = *(const uint2*)p;
      const uint32_t w[4] = {a.x, a.x >> 16, a.y, a.y >> 16};
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        x[2 * m] = field<0>(w[m], 0xF);
        x[2 * m + 8] = field<4>(w[m], 0xF);
        x[2 * m + 1] = field<8>(w[m], 0xF);
        x[2 * m + 9] = field<12>(w[m], 0xF);
      }
      break;
    }
    case Kind::INT2:
    case Kind::INT2C:
    case Kind::INT2S: {  // e = byte (e % 4), crumb (e / 4)
      const uint32_t a = *(const uint32_t*)p;
      const uint32_t w[2] = {a, a >> 16};
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        x[2 * m] = field<0>(w[m], 3);
        x[2 * m + 4] = field<2>(w[m], 3);
        x[2 * m + 8] = field<4>(w[m], 3);
        x[2 * m + 12] = field<6>(w[m], 3);
        x[2 * m + 1] = field<8>(w[m], 3);
        x[2 * m + 5] = field<10>(w[m], 3);
        x[2 * m + 9] = field<12>(w[m], 3);
        x[2 * m + 13] = field<14>(w[m], 3);
      }
      break;
    }
    default: {  // 3-bit integer kinds and NF: integer codes, then values
      uint32_t c[16];
      const int b = kind_bits(k);
      if (b == 4) int_codes16<4>(row, j, c);
      else if (b == 3) int_codes16<3>(row, j, c);
      else int_codes16<2>(row, j, c);
#pragma unroll
      for (int e = 0; e < 16; ++e) x[e] = is_nf(k) ? lut[c[e]] : (float)c[e];
    }
  }
}

// x = code * scale[c] + zero[c] for the block's per-channel parameters.
template <int D>
__device__ __forceinline__ void per_channel(Kind k, const uint8_t* meta, int j, float (&x)[16]) {
  const __half* s = (const __half*)meta;
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    const int c = chan(k, j, e);
    x[e] = fmaf(x[e], __half2float(s[c]), __half2float(s[D + c]));
  }
}

// (scale, zero) of a lane's channels of token tt: its group's (a lane's 16
// channels lie in one group of >= 32). Raw and per-channel kinds: (1, 0).
__device__ __forceinline__ float2 token_params(Kind k, const uint8_t* part, const SideDesc& s,
                                               int D, int tt, int j) {
  if (!is_token_quant(k)) return make_float2(1.0f, 0.0f);
  const uint16_t* meta = (const uint16_t*)(part + s.meta_off);
  const int G = s.group ? s.group : D, hv = meta_halves(k);
  const uint16_t* m = meta + (tt * (D / G) + chan(k, j, 0) / G) * hv;
  const QParams p = params_of(k, QMeta{m[0], hv == 2 ? m[1] : (uint16_t)0});
  return make_float2(p.scale, p.zero);
}

// ------------------------------------------------------------------- kernel
// KK, VK: a Kind's value, or kDyn.
template <int D, int KK, int VK>
__global__ void __launch_bounds__(kMaxWarps * 32) decode_kernel(const Params p) {
  constexpr int NS = D / kCh, TPW = 32 / NS;
  constexpr unsigned kAll = 0xffffffffu;
  extern __shared__ __align__(16) uint8_t smem[];
  const Kind kk = KK == kDyn ? p.k.kind : Kind(KK);
  const Kind vk = VK == kDyn ? p.v.kind : Kind(VK);
  const int rowk = D * kind_bits(kk) / 8, rowv = D * kind_bits(vk) / 8;

  const int tid = threadIdx.x, nthr = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int j = lane % NS, u = lane / NS;
  const int xl = 2 * (j & 1) + ((j >> 1) & 1);  // the head this lane's logit ends up as
  const int slice = warp / p.wps, wp = warp % p.wps;
  const int split = blockIdx.x, kvh = blockIdx.y / p.hg, hgrp = blockIdx.y % p.hg;
  const int b = blockIdx.z;
  const int rel0 = (hgrp * p.sl + slice) * kHeads;  // first head of the warp, within the group
  const bool active = rel0 < p.G;
  const int64_t head0 = (int64_t)b * p.H + (int64_t)kvh * p.G + rel0;

  // This split's tokens: a fair share of whole blocks of the actual length.
  const int64_t cap = p.max_blocks * p.bs;
  const int len = (int)min((int64_t)max(p.seq_lens[b], 0), cap);
  const int nblk = (len + p.bs - 1) / p.bs;
  const int seff = min(p.splits, max(1, (nblk + p.min_bps - 1) / p.min_bps));
  const int bps = (nblk + seff - 1) / seff;
  const int blk_lo = min(split * bps, nblk), blk_hi = split < seff ? min(nblk, blk_lo + bps) : blk_lo;
  const int tok_lo = blk_lo * p.bs, tok_hi = max(tok_lo, min(len, blk_hi * p.bs));
  const int tsb = 1 << p.tsb_log2, tst = tsb * p.nb;
  const int nst = (tok_hi - tok_lo + tst - 1) / tst;

  const int stage_bytes = p.nb * p.pb;
  int* sm_ids = (int*)(smem + kStages * stage_bytes);  // [kStages + 1][nb]
  __shared__ float lut[2][16];  // NF levels by code, K then V
  if (tid < 32) {
    const Kind sk = tid < 16 ? kk : vk;
    lut[tid / 16][tid % 16] = is_nf(sk) && tid % 16 <= max_code(sk) ? nf_level(sk, tid % 16) : 0.0f;
  }

  // Block id of part q of stage st, or -1 (past the split, or not a block of the pool).
  auto part_id = [&](int st, int q) -> int {
    const int tok = tok_lo + st * tst + q * tsb;
    if (st >= nst || tok >= tok_hi) return -1;
    const int id = p.ids[(int64_t)b * p.max_blocks + tok / p.bs];
    return id >= 0 && id < p.num_blocks ? id : -1;
  };
  auto issue = [&](int st) {
    uint8_t* buf = smem + (st % kStages) * stage_bytes;
    const int* ids = sm_ids + (st % (kStages + 1)) * p.nb;
    for (int q = 0; q < p.nb; ++q) {
      const int id = ids[q];
      if (id < 0) continue;
      const int t0 = (tok_lo + st * tst + q * tsb) % p.bs;
      const uint8_t* tile = p.pool + ((int64_t)id * p.kv_heads + kvh) * p.tile_bytes;
      uint8_t* part = buf + q * p.pb;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const Seg g = p.seg[s];
        const uint8_t* src = tile + g.src + t0 * g.per_tok;
        for (int c = tid * 16; c < g.bytes; c += nthr * 16) cp_async16(part + g.dst + c, src + c);
      }
    }
    cp_async_commit();
  };

  // q in registers, scaled to log2 units, slot i = head (i ^ xl) so the
  // reduce-scatter below needs no selects; qs: lane sums (grouped K zeros).
  float q[kHeads][kCh], qs[kHeads];
#pragma unroll
  for (int i = 0; i < kHeads; ++i) {
    const int h = i ^ xl;
    const bool ok = rel0 + h < p.G;
    qs[i] = 0.0f;
#pragma unroll
    for (int e = 0; e < kCh; ++e) {
      q[i][e] = ok ? load_act(p.query, p.qdtype, (head0 + h) * D + chan(kk, j, e)) * p.qscale : 0.0f;
      qs[i] += q[i][e];
    }
  }
  float acc[kHeads][kCh], zacc[kHeads];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    zacc[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < kCh; ++e) acc[h][e] = 0.0f;
  }
  float m_own = -CUDART_INF_F, l_own = 0.0f;  // running max and sum of head xl

  // Pipeline: ids of stages 0..kStages-1, then kStages-1 stages in flight.
  if (tid < p.nb)
    for (int st = 0; st < kStages; ++st) sm_ids[st * p.nb + tid] = part_id(st, tid);
  __syncthreads();
  for (int st = 0; st < kStages - 1; ++st) issue(st);

  for (int st = 0; st < nst; ++st) {
    const int next_id = tid < p.nb ? part_id(st + kStages, tid) : -1;  // load early
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage st landed for all; buffer of st-1 free
    issue(st + kStages - 1);
    const uint8_t* buf = smem + (st % kStages) * stage_bytes;
    const int* ids = sm_ids + (st % (kStages + 1)) * p.nb;
    const int stage_tok = tok_lo + st * tst;
    for (int t0 = wp * TPW; active && t0 < tst && stage_tok + t0 < tok_hi; t0 += p.wps * TPW) {
      const int tau = t0 + u, pos = stage_tok + tau;
      const bool valid = tau < tst && pos < tok_hi && ids[tau >> p.tsb_log2] >= 0;
      const int qp = valid ? tau >> p.tsb_log2 : 0, tt = valid ? tau & (tsb - 1) : 0;
      const uint8_t* part = buf + qp * p.pb;

      // ---- logits: lane partial dots, reduce to one head per lane
      float x[kCh];
      codes16(kk, part + p.k.code_off + tt * rowk, j, lut[0], x);
      if (is_per_channel(kk)) per_channel<D>(kk, part + p.k.meta_off, j, x);
      float v[kHeads];
#pragma unroll
      for (int i = 0; i < kHeads; ++i) {
        float d0 = 0.0f, d1 = 0.0f;  // two chains for FMA latency
#pragma unroll
        for (int e = 0; e < kCh; e += 2) {
          d0 = fmaf(q[i][e], x[e], d0);
          d1 = fmaf(q[i][e + 1], x[e + 1], d1);
        }
        v[i] = d0 + d1;
      }
      const float2 kp = token_params(kk, part, p.k, D, tt, j);
      if (is_token_quant(kk))  // this lane's group: zero * sum(q) (0 for symmetric kinds)
#pragma unroll
        for (int i = 0; i < kHeads; ++i) v[i] = fmaf(v[i], kp.x, kp.y * qs[i]);
      // Slots {2,3} of lane j^1 hold the heads of slots {0,1} here, and slot
      // 1 of lane j^2 the head of slot 0: after both, head xl, 4 lanes summed.
      float a0 = v[0] + __shfl_xor_sync(kAll, v[2], 1);
      float a1 = v[1] + __shfl_xor_sync(kAll, v[3], 1);
      float lg = a0 + __shfl_xor_sync(kAll, a1, 2);
#pragma unroll
      for (int off = 4; off < NS; off <<= 1) lg += __shfl_xor_sync(kAll, lg, off);
      if (p.capl > 0.0f) lg = p.capl * tanhf(lg / p.capl);  // soft-capping, in log2 units
      lg = valid ? lg : -CUDART_INF_F;
      if (p.logits && j < 4 && rel0 + xl < p.G && tau < tst && pos < tok_hi && pos < p.logits_len)
        p.logits[(head0 + xl) * p.logits_len + pos] = lg * kLn2;

      // ---- online softmax of head xl over the step's TPW tokens
      float mx = lg;
#pragma unroll
      for (int off = NS; off < 32; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(kAll, mx, off));
      const float m_new = fmaxf(m_own, mx);
      const bool grow = m_new > m_own;
      if (__any_sync(kAll, grow)) {
        const float corr = grow ? exp2f(m_own - m_new) : 1.0f;
        l_own *= corr;
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          const float c = __shfl_sync(kAll, corr, (h >> 1) + 2 * (h & 1));
          zacc[h] *= c;
#pragma unroll
          for (int e = 0; e < kCh; ++e) acc[h][e] *= c;
        }
        m_own = m_new;
      }
      const float pr = m_own == -CUDART_INF_F ? 0.0f : exp2f(lg - m_own);
      l_own += pr;
      float ph[kHeads];
#pragma unroll
      for (int h = 0; h < kHeads; ++h)
        ph[h] = __shfl_sync(kAll, pr, (lane & ~(NS - 1)) + (h >> 1) + 2 * (h & 1));

      // ---- values
      codes16(vk, part + p.v.code_off + tt * rowv, j, lut[1], x);
      if (is_per_channel(vk)) per_channel<D>(vk, part + p.v.meta_off, j, x);
      float2 vp = token_params(vk, part, p.v, D, tt, j);
      if (!valid) {  // stale or unwritten slots may hold NaN: keep them out of acc
        vp = make_float2(0.0f, 0.0f);
#pragma unroll
        for (int e = 0; e < kCh; ++e) x[e] = 0.0f;
      }
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        const float w = ph[h] * vp.x;
        if (is_asym_token(vk) || is_int_sym(vk)) zacc[h] = fmaf(ph[h], vp.y, zacc[h]);
#pragma unroll
        for (int e = 0; e < kCh; ++e) acc[h][e] = fmaf(w, x[e], acc[h][e]);
      }
    }
    if (tid < p.nb) sm_ids[((st + kStages) % (kStages + 1)) * p.nb + tid] = next_id;
  }
  cp_async_wait<0>();
  __syncthreads();  // stage buffers are reused below

  // ---- combine: lanes of a warp share m; warps of a slice are rescaled.
#pragma unroll
  for (int off = NS; off < 32; off <<= 1) l_own += __shfl_xor_sync(kAll, l_own, off);
#pragma unroll
  for (int h = 0; h < kHeads; ++h)
#pragma unroll
    for (int e = 0; e < kCh; ++e) {
      float a = acc[h][e] + zacc[h];
#pragma unroll
      for (int off = NS; off < 32; off <<= 1) a += __shfl_xor_sync(kAll, a, off);
      acc[h][e] = a;
    }
  const int nwarps = nthr >> 5;
  float* cm = (float*)smem;               // [warps][4] max
  float* cl = cm + nwarps * kHeads;       // [warps][4] sum
  float* ca = cl + nwarps * kHeads;       // [warps][4][D] unnormalized output
  if (u == 0) {
#pragma unroll
    for (int h = 0; h < kHeads; ++h)
#pragma unroll
      for (int e = 0; e < kCh; ++e) ca[(warp * kHeads + h) * D + chan(vk, j, e)] = acc[h][e];
    if (j < 4) {
      cm[warp * kHeads + xl] = m_own;
      cl[warp * kHeads + xl] = l_own;
    }
  }
  __syncthreads();
  for (int idx = tid; idx < p.sl * kHeads * D; idx += nthr) {
    const int sl = idx / (kHeads * D), h = idx / D % kHeads, c = idx % D;
    const int rel = (hgrp * p.sl + sl) * kHeads + h;
    if (rel >= p.G) continue;
    const int w0 = sl * p.wps;
    float M = -CUDART_INF_F;
    for (int w = w0; w < w0 + p.wps; ++w) M = fmaxf(M, cm[w * kHeads + h]);
    float L = 0.0f, o = 0.0f;
    if (M != -CUDART_INF_F)
      for (int w = w0; w < w0 + p.wps; ++w) {
        const float m = cm[w * kHeads + h];
        if (m == -CUDART_INF_F) continue;
        const float f = exp2f(m - M);
        L = fmaf(cl[w * kHeads + h], f, L);
        o = fmaf(ca[(w * kHeads + h) * D + c], f, o);
      }
    const int64_t row = (int64_t)b * p.H + (int64_t)kvh * p.G + rel;
    const float out = L > 0.0f ? o / L : 0.0f;
    const float lse2 = L > 0.0f ? M + log2f(L) : -CUDART_INF_F;
    if (p.splits == 1) {
      store_act(p.out, p.odtype, row * D + c, out);
      if (c == 0) p.lse[row] = lse2 * kLn2;
    } else {
      p.part_o[(row * p.splits + split) * D + c] = out;
      if (c == 0) p.part_lse[row * p.splits + split] = lse2;
    }
  }
}

// Exact merge of the splits: one warp per (sequence, head).
__global__ void __launch_bounds__(128) merge_kernel(const float* part_o, const float* part_lse,
                                                    int64_t rows, int splits, int D, DType dtype,
                                                    void* out, float* lse) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * 4 + (threadIdx.x >> 5);
  if (row >= rows) return;
  const float* pl = part_lse + row * splits;
  float M = -CUDART_INF_F;
  for (int s = lane; s < splits; s += 32) M = fmaxf(M, pl[s]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
  float L = 0.0f;
  if (M != -CUDART_INF_F)
    for (int s = lane; s < splits; s += 32) L += exp2f(pl[s] - M);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
  for (int c = lane; c < D; c += 32) {
    float o = 0.0f;
    if (M != -CUDART_INF_F) {
      for (int s = 0; s < splits; ++s)
        if (pl[s] != -CUDART_INF_F) o = fmaf(exp2f(pl[s] - M), part_o[(row * splits + s) * D + c], o);
      o /= L;
    }
    store_act(out, dtype, row * D + c, o);
  }
  if (lane == 0) lse[row] = M == -CUDART_INF_F ? -CUDART_INF_F : (M + log2f(L)) * kLn2;
}

}  // namespace pda
}  // namespace cuda
}  // namespace kvcomp
