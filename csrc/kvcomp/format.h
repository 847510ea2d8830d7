// The single source of truth for every KV storage format: element encodings,
// scale computation, rounding, bit packing and the tile byte layout.
// Used by the CPU kernels and the CUDA kernels alike (no torch, no STL).
// docs/format.md describes the same layout in prose; keep them in step.
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#define KVC_HD __host__ __device__ __forceinline__
#else
#define KVC_HD inline
#endif

namespace kvcomp {

constexpr int kLayoutVersion = 1;
constexpr int kChunk = 32;   // sub-byte codes are packed in chunks of 32 channels
constexpr int kAlign = 16;   // every region of a tile starts on 16 bytes
constexpr int kMaxHeadDim = 512;

enum class Kind : uint8_t {
  FP16, BF16, FP8_E4M3, FP8_E5M2, INT8, INT4, INT2, INT8C, INT4C, INT2C, FP32
};

// One side (K or V) of a format spec.
struct ElemFormat {
  Kind kind;
  int group;  // channels per (scale, zero) pair for INT4/INT2; 0 otherwise
};

KVC_HD constexpr int kind_bits(Kind k) {
  switch (k) {
    case Kind::FP32: return 32;
    case Kind::FP16: case Kind::BF16: return 16;
    case Kind::INT4: case Kind::INT4C: return 4;
    case Kind::INT2: case Kind::INT2C: return 2;
    default: return 8;
  }
}
// Stored as is: the hot tier's formats (fp32 keeps fp32 models lossless).
KVC_HD constexpr bool is_raw(Kind k) {
  return k == Kind::FP16 || k == Kind::BF16 || k == Kind::FP32;
}
KVC_HD constexpr bool is_fp8(Kind k) { return k == Kind::FP8_E4M3 || k == Kind::FP8_E5M2; }
KVC_HD constexpr bool is_per_channel(Kind k) {
  return k == Kind::INT8C || k == Kind::INT4C || k == Kind::INT2C;
}
KVC_HD constexpr bool is_grouped(Kind k) { return k == Kind::INT4 || k == Kind::INT2; }
// fp8 and int8 carry one symmetric fp32 scale per token.
KVC_HD constexpr bool is_symmetric_token(Kind k) { return is_fp8(k) || k == Kind::INT8; }
KVC_HD constexpr int max_code(Kind k) { return (1 << kind_bits(k)) - 1; }

// ---------------------------------------------------------------- bit casts
KVC_HD uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
KVC_HD float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// ------------------------------------------------- fp16 / bf16 (round to nearest even)
KVC_HD uint16_t float_to_half(float f) {
  uint32_t x = f2u(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x477ff000u)  // >= 65520 rounds to inf; NaN stays NaN
    return (uint16_t)(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x < 0x38800000u)  // below 2^-14: half subnormal, step 2^-24
    return (uint16_t)(sign | (uint32_t)rintf(u2f(x) * 16777216.0f));
  x += 0xfffu + ((x >> 13) & 1u);
  return (uint16_t)(sign | ((x - (112u << 23)) >> 13));
}
KVC_HD float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return u2f(sign | f2u((float)m * 5.9604644775390625e-8f));
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
KVC_HD uint16_t float_to_bf16(float f) {
  uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}
KVC_HD float bf16_to_float(uint16_t b) { return u2f((uint32_t)b << 16); }

// -------------------------------------------------------------- fp8 (OCP)
constexpr float kE4M3Max = 448.0f;
constexpr float kE5M2Max = 57344.0f;

// a: finite, 0 <= a <= 448. Round to nearest even, saturating.
KVC_HD uint8_t encode_e4m3_abs(float a) {
  if (a < 0.015625f) return (uint8_t)rintf(a * 512.0f);  // subnormal step 2^-9
  uint32_t x = f2u(a);
  x += 0x7ffffu + ((x >> 20) & 1u);
  uint32_t code = (((x >> 23) - 120u) << 3) | ((x >> 20) & 7u);
  return (uint8_t)(code > 0x7eu ? 0x7eu : code);
}
KVC_HD uint8_t encode_e5m2_abs(float a) {
  if (a < 6.103515625e-05f) return (uint8_t)rintf(a * 65536.0f);  // step 2^-16
  uint32_t x = f2u(a);
  x += 0xfffffu + ((x >> 21) & 1u);
  uint32_t code = (((x >> 23) - 112u) << 2) | ((x >> 21) & 3u);
  return (uint8_t)(code > 0x7bu ? 0x7bu : code);
}
KVC_HD float decode_e4m3(uint8_t c) {
  uint32_t sign = (uint32_t)(c & 0x80u) << 24;
  uint32_t e = (c >> 3) & 0xfu, m = c & 7u;
  if (e == 0) return u2f(sign | f2u((float)m * 0.001953125f));
  return u2f(sign | ((e + 120u) << 23) | (m << 20));
}
KVC_HD float decode_e5m2(uint8_t c) {
  uint32_t sign = (uint32_t)(c & 0x80u) << 24;
  uint32_t e = (c >> 2) & 0x1fu, m = c & 3u;
  if (e == 0) return u2f(sign | f2u((float)m * 1.52587890625e-05f));
  return u2f(sign | ((e + 112u) << 23) | (m << 21));
}

// Min/max of non-NaN values; unlike fminf/fmaxf they compile to one
// instruction everywhere (NaN is rejected before any value is encoded).
KVC_HD float min_f(float a, float b) { return a < b ? a : b; }
KVC_HD float max_f(float a, float b) { return a > b ? a : b; }

// ------------------------------------------------------------ quant params
// x_hat = code * scale + zero  (symmetric kinds: zero = 0, code signed).
struct QParams {
  float scale;
  float zero;
};

// Symmetric per-token scale from the absolute maximum (fp8, int8).
KVC_HD QParams symmetric_params(Kind k, float absmax) {
  float top = k == Kind::FP8_E4M3 ? kE4M3Max : k == Kind::FP8_E5M2 ? kE5M2Max : 127.0f;
  return QParams{absmax / top, 0.0f};
}
// Asymmetric scale and zero from the range (int4/int2 groups, per-channel kinds).
// Divided before subtracting so a range near FLT_MAX cannot overflow.
KVC_HD QParams asymmetric_params(Kind k, float lo, float hi) {
  float levels = (float)max_code(k);
  return QParams{hi / levels - lo / levels, lo};
}

// Asymmetric code from y = (x - zero) / scale: clamp(rint(y), 0, max_code).
KVC_HD uint32_t asym_round(Kind k, float y) {
  return (uint32_t)rintf(min_f(max_f(y, 0.0f), (float)max_code(k)));
}
// Asymmetric code of x when x - zero is finite (always so when the range
// hi - lo is).
KVC_HD uint32_t asym_code(Kind k, float x, QParams p) {
  return asym_round(k, p.scale > 0.0f ? (x - p.zero) / p.scale : 0.0f);
}
// int8 code of x: clamp(rint(x / scale), -127, 127) as a byte.
KVC_HD uint32_t int8_code(float x, QParams p) {
  float y = p.scale > 0.0f ? x / p.scale : 0.0f;
  return (uint32_t)(uint8_t)(int8_t)rintf(min_f(max_f(y, -127.0f), 127.0f));
}

// Element code for a finite x. Codes are raw bytes/nibbles/crumbs as stored.
KVC_HD uint32_t encode(Kind k, float x, QParams p) {
  if (k == Kind::FP32) return f2u(x);
  if (is_raw(k)) return k == Kind::FP16 ? float_to_half(x) : float_to_bf16(x);
  if (k == Kind::INT8) return int8_code(x, p);
  if (is_fp8(k)) {
    float y = p.scale > 0.0f ? x / p.scale : 0.0f;
    uint32_t sign = f2u(y) >> 31 << 7;
    float a = fabsf(y);
    return sign | (k == Kind::FP8_E4M3 ? encode_e4m3_abs(min_f(a, kE4M3Max))
                                       : encode_e5m2_abs(min_f(a, kE5M2Max)));
  }
  if (isfinite(x - p.zero)) return asym_code(k, x, p);
  // A range near FLT_MAX: divide before subtracting.
  return asym_round(k, p.scale > 0.0f ? x / p.scale - p.zero / p.scale : 0.0f);
}
// Code as a float before scaling (what the attention loops multiply by the scale).
KVC_HD float code_value(Kind k, uint32_t c) {
  switch (k) {
    case Kind::FP16: return half_to_float((uint16_t)c);
    case Kind::BF16: return bf16_to_float((uint16_t)c);
    case Kind::FP32: return u2f(c);
    case Kind::FP8_E4M3: return decode_e4m3((uint8_t)c);
    case Kind::FP8_E5M2: return decode_e5m2((uint8_t)c);
    case Kind::INT8: return (float)(int8_t)(uint8_t)c;
    default: return (float)c;
  }
}
KVC_HD float decode(Kind k, uint32_t c, QParams p) {
  float v = code_value(k, c);
  return is_raw(k) ? v : fmaf(v, p.scale, p.zero);
}

// ------------------------------------------------------------------ packing
// Within a row, channels are packed in chunks of 32. 8- and 16-bit codes are
// plain little-endian arrays. A chunk of b-bit codes (b = 4 or 2) takes 4*b
// bytes, and its channel i sits in byte i % (4*b) at bit b * (i / (4*b)):
//   int4: byte i = ch i | ch i+16 << 4               (16 bytes a chunk)
//   int2: byte i = ch i | ch i+8 << 2 | ch i+16 << 4 | ch i+24 << 6  (8 bytes)
// so one shift and mask of a chunk yields a run of consecutive channels.
struct PackPos {
  int byte;
  int shift;
};
KVC_HD PackPos pack_pos(Kind k, int c) {
  int b = kind_bits(k);
  if (b >= 8) return PackPos{c * (b / 8), 0};
  int chunk_bytes = 4 * b;
  int i = c % kChunk;
  return PackPos{(c / kChunk) * chunk_bytes + i % chunk_bytes, b * (i / chunk_bytes)};
}
KVC_HD uint32_t load_code(Kind k, const uint8_t* row, int c) {
  PackPos p = pack_pos(k, c);
  int b = kind_bits(k);
  if (b == 32) {
    uint32_t u;
    memcpy(&u, row + p.byte, 4);
    return u;
  }
  if (b == 16) return (uint32_t)row[p.byte] | ((uint32_t)row[p.byte + 1] << 8);
  return ((uint32_t)row[p.byte] >> p.shift) & (uint32_t)max_code(k);
}
// Sub-byte codes are OR-ed in: the row must be zeroed before a sub-byte store.
KVC_HD void store_code(Kind k, uint8_t* row, int c, uint32_t code) {
  PackPos p = pack_pos(k, c);
  int b = kind_bits(k);
  if (b == 32) {
    memcpy(row + p.byte, &code, 4);
  } else if (b == 16) {
    row[p.byte] = (uint8_t)code;
    row[p.byte + 1] = (uint8_t)(code >> 8);
  } else if (b == 8) {
    row[p.byte] = (uint8_t)code;
  } else {
    row[p.byte] |= (uint8_t)(code << p.shift);
  }
}

// Packs the 32 codes of one chunk (codes[i] for channel i) per the rule above.
KVC_HD void pack_chunk(Kind k, const uint8_t* codes, uint8_t* out) {
  const int b = kind_bits(k), nbytes = 4 * b;
  for (int i = 0; i < nbytes; ++i) {
    uint32_t v = 0;
    for (int j = 0; j < 8 / b; ++j) v |= (uint32_t)codes[i + j * nbytes] << (b * j);
    out[i] = (uint8_t)v;
  }
}

// ------------------------------------------------------------------- layout
KVC_HD int align_up(int x, int a) { return (x + a - 1) / a * a; }

// One side's region of a tile: packed codes for block_size tokens, then scales.
//  fp32/fp16/bf16:   data only
//  fp8_*/int8:       float scale[block_size]
//  int4/int2 (:gG):  float {scale, zero}[block_size][head_dim / G]
//  int8c/int4c/int2c float scale[head_dim], then float zero[head_dim]
struct Section {
  ElemFormat fmt;
  int offset;     // from the start of the tile
  int row_bytes;  // packed code bytes of one token
  int data_bytes;
  int meta_bytes;
  KVC_HD int meta_offset() const { return offset + data_bytes; }
  KVC_HD int end() const { return offset + align_up(data_bytes + meta_bytes, kAlign); }
};

KVC_HD Section make_section(ElemFormat f, int head_dim, int block_size, int offset) {
  Section s;
  s.fmt = f;
  s.offset = offset;
  s.row_bytes = head_dim * kind_bits(f.kind) / 8;
  s.data_bytes = align_up(block_size * s.row_bytes, kAlign);
  if (is_symmetric_token(f.kind)) s.meta_bytes = block_size * 4;
  else if (is_grouped(f.kind)) s.meta_bytes = block_size * (head_dim / f.group) * 8;
  else if (is_per_channel(f.kind)) s.meta_bytes = head_dim * 8;
  else s.meta_bytes = 0;
  return s;
}

// Where a token's (or the block's) scale and zero live.
KVC_HD QParams load_params(const Section& s, const uint8_t* tile, int token, int channel) {
  const float* meta = (const float*)(tile + s.meta_offset());
  Kind k = s.fmt.kind;
  if (is_symmetric_token(k)) return QParams{meta[token], 0.0f};
  if (is_grouped(k)) {
    int groups = s.row_bytes * 8 / kind_bits(k) / s.fmt.group;
    const float* p = meta + 2 * (token * groups + channel / s.fmt.group);
    return QParams{p[0], p[1]};
  }
  if (is_per_channel(k)) {
    int head_dim = s.row_bytes * 8 / kind_bits(k);
    return QParams{meta[channel], meta[head_dim + channel]};
  }
  return QParams{1.0f, 0.0f};
}

struct TileLayout {
  Section k, v;
  int head_dim;
  int block_size;
  int natural_bytes;  // before the padding that makes tile sizes unique (host table)
};

KVC_HD TileLayout make_layout(ElemFormat kf, ElemFormat vf, int head_dim, int block_size) {
  TileLayout t;
  t.head_dim = head_dim;
  t.block_size = block_size;
  t.k = make_section(kf, head_dim, block_size, 0);
  t.v = make_section(vf, head_dim, block_size, t.k.end());
  t.natural_bytes = t.v.end();
  return t;
}

}  // namespace kvcomp
