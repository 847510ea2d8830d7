#include "kvcomp/spec.h"

#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace kvcomp {
namespace {

struct KindName {
  const char* name;
  Kind kind;
  Kind sym;  // the kind ":s" selects (kind itself where it has no symmetric variant)
};
constexpr KindName kKinds[] = {
    {"fp16", Kind::FP16, Kind::FP16},           {"bf16", Kind::BF16, Kind::BF16},
    {"fp32", Kind::FP32, Kind::FP32},           {"fp8_e4m3", Kind::FP8_E4M3, Kind::FP8_E4M3},
    {"fp8_e5m2", Kind::FP8_E5M2, Kind::FP8_E5M2}, {"int8", Kind::INT8, Kind::INT8},
    {"int4", Kind::INT4, Kind::INT4S},          {"int3", Kind::INT3, Kind::INT3S},
    {"int2", Kind::INT2, Kind::INT2S},          {"nf4", Kind::NF4, Kind::NF4},
    {"nf3", Kind::NF3, Kind::NF3},              {"nf2", Kind::NF2, Kind::NF2},
    {"int8c", Kind::INT8C, Kind::INT8C},        {"int4c", Kind::INT4C, Kind::INT4C},
    {"int2c", Kind::INT2C, Kind::INT2C},
};
constexpr int kGroups[] = {32, 64, 128, 256, 512};

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

const char* kind_name(Kind k) {
  for (const auto& kn : kKinds)
    if (kn.kind == k || kn.sym == k) return kn.name;
  return "?";
}

// The group a side has without ":gG": 32 for the integer and NF kinds (the
// contract's int4/int2 default), the whole row for fp8 and int8.
int default_group(Kind k) { return is_token_quant(k) && !is_absmax(k) ? 32 : 0; }

}  // namespace

std::string side_name(ElemFormat f) {
  std::string s = kind_name(f.kind);
  if (f.group != default_group(f.kind)) s += ":g" + std::to_string(f.group);
  if (is_int_sym(f.kind)) s += ":s";
  if (f.rotated) s += ":h";
  return s;
}

namespace {

ElemFormat parse_side(const std::string& full, std::string side) {
  side = trim(side);
  std::vector<std::string> parts;
  for (size_t start = 0;;) {
    size_t colon = side.find(':', start);
    parts.push_back(side.substr(start, colon == std::string::npos ? std::string::npos : colon - start));
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  std::string base = parts[0] == "fp8" ? "fp8_e4m3" : parts[0];
  const KindName* kn = nullptr;
  for (const auto& k : kKinds)
    if (base == k.name) kn = &k;
  if (!kn)
    throw FormatError("unknown format '" + full +
                      "': expected fp16, bf16, fp32, fp8_e4m3, fp8_e5m2, int8, int4, int3, int2, "
                      "nf4, nf3, nf2 (flags :gG, :s, :h), int8c, int4c, int2c, a '<k>/<v>' pair, "
                      "kivi2 or kivi4");
  ElemFormat f{kn->kind, default_group(kn->kind), false};
  bool grouped = false, sym = false;
  auto bad = [&](const std::string& why) { return FormatError("format '" + full + "': " + why); };
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string& flag = parts[i];
    if (flag == "h") {
      if (!is_token_quant(f.kind))
        throw bad("'" + base + "' takes no ':h' (the rotation applies to quantized per-token "
                  "formats; per-channel formats keep their channels' own outliers)");
      if (f.rotated) throw bad("':h' given twice");
      f.rotated = true;
    } else if (flag == "s") {
      if (kn->sym == kn->kind)
        throw bad("'" + base + "' takes no ':s' (symmetric variants: int4, int3, int2)");
      if (sym) throw bad("':s' given twice");
      sym = true;
      f.kind = kn->sym;
    } else if (flag.size() > 1 && flag[0] == 'g') {
      if (!is_token_quant(f.kind)) throw bad("'" + base + "' takes no group size");
      if (grouped) throw bad("the group size is given twice");
      grouped = true;
      int g = 0;
      for (int c : kGroups)
        if (flag == "g" + std::to_string(c)) g = c;
      if (!g) throw bad("group size must be g32, g64, g128, g256 or g512, got '" + flag + "'");
      f.group = g;
    } else {
      throw bad("unknown flag ':" + flag + "' (flags: :gG group size, :s symmetric, :h rotated)");
    }
  }
  return f;
}

FormatSpec parse_uncached(const std::string& spec) {
  std::string s = trim(spec);
  if (s == "kivi2") s = "int2c/int2";
  if (s == "kivi4") s = "int4c/int4";
  FormatSpec f;
  size_t slash = s.find('/');
  if (slash == std::string::npos) {
    f.k = f.v = parse_side(spec, s);
  } else {
    f.k = parse_side(spec, s.substr(0, slash));
    f.v = parse_side(spec, s.substr(slash + 1));
  }
  std::string kn = side_name(f.k), vn = side_name(f.v);
  f.name = kn == vn ? kn : kn + "/" + vn;
  return f;
}

std::string side_problem(ElemFormat f, int head_dim) {
  if (kind_bits(f.kind) < 8 && head_dim % kChunk != 0)
    return "needs a multiple of " + std::to_string(kChunk);
  if (f.group && head_dim % f.group != 0)
    return "needs a multiple of its group size " + std::to_string(f.group);
  if (f.rotated && !is_pow2(head_dim)) return "the rotation ':h' needs a power of two";
  return "";
}

// Tile sizes of one format, built in a fixed priority order: head_dim 128,
// 64, 256, then the other multiples of 16 upward; block sizes upward. An entry
// that would repeat an earlier size grows by block_size bytes (one byte per
// token) until it is unique. Later entries never move earlier ones.
struct TileTable {
  std::map<std::pair<int, int>, int> size;   // (head_dim, block_size) -> bytes
  std::map<int, Geometry> geometry;           // bytes -> geometry
};

TileTable build_table(const FormatSpec& f) {
  std::vector<int> dims = {128, 64, 256};
  for (int d = 16; d <= kMaxHeadDim; d += 16)
    if (d != 128 && d != 64 && d != 256) dims.push_back(d);
  TileTable t;
  for (int d : dims) {
    if (!head_dim_problem(f, d).empty()) continue;
    for (int bs : kBlockSizes) {
      int bytes = make_layout(f.k, f.v, d, bs).natural_bytes;
      while (t.geometry.count(bytes)) bytes += bs;
      t.size[{d, bs}] = bytes;
      t.geometry[bytes] = Geometry{d, bs};
    }
  }
  return t;
}

std::mutex g_mutex;
std::map<std::string, std::unique_ptr<FormatSpec>> g_specs;
std::map<std::string, std::unique_ptr<TileTable>> g_tables;

const TileTable& table_for(const FormatSpec& f) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& slot = g_tables[f.name];
  if (!slot) slot = std::make_unique<TileTable>(build_table(f));
  return *slot;
}

}  // namespace

const FormatSpec& parse_spec(const std::string& spec) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_specs.find(spec);
    if (it != g_specs.end()) return *it->second;
  }
  auto parsed = std::make_unique<FormatSpec>(parse_uncached(spec));
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& slot = g_specs[spec];
  if (!slot) slot = std::move(parsed);
  return *slot;
}

std::string head_dim_problem(const FormatSpec& f, int head_dim) {
  if (head_dim <= 0 || head_dim % 16 != 0 || head_dim > kMaxHeadDim)
    return "head_dim must be a positive multiple of 16 up to " + std::to_string(kMaxHeadDim) +
           ", got " + std::to_string(head_dim);
  for (ElemFormat side : {f.k, f.v}) {
    std::string p = side_problem(side, head_dim);
    if (!p.empty())
      return "head_dim " + std::to_string(head_dim) + " does not suit format '" + f.name +
             "' (" + side_name(side) + " " + p + ")";
  }
  return "";
}

bool valid_block_size(int block_size) {
  for (int bs : kBlockSizes)
    if (bs == block_size) return true;
  return false;
}

int tile_bytes(const FormatSpec& f, int head_dim, int block_size) {
  std::string p = head_dim_problem(f, head_dim);
  if (!p.empty()) throw FormatError(p);
  if (!valid_block_size(block_size))
    throw FormatError("block_size must be 16, 32, 64 or 128, got " + std::to_string(block_size));
  return table_for(f).size.at({head_dim, block_size});
}

Geometry infer_geometry(const FormatSpec& f, long long bytes, int head_dim) {
  const TileTable& t = table_for(f);
  auto it = bytes > 0 && bytes < (1LL << 31) ? t.geometry.find((int)bytes) : t.geometry.end();
  if (it != t.geometry.end() && (head_dim == 0 || it->second.head_dim == head_dim))
    return it->second;
  std::string what = "pool tile_bytes " + std::to_string(bytes) + " matches no tile of format '" +
                     f.name + "'";
  if (head_dim) {
    what += " with head_dim " + std::to_string(head_dim) + " (";
    std::string p = head_dim_problem(f, head_dim);
    if (!p.empty()) throw FormatError(what + p + ")");
    for (int bs : kBlockSizes)
      what += (bs == 16 ? "expected " : ", ") + std::to_string(t.size.at({head_dim, bs})) +
              " for block_size " + std::to_string(bs);
    what += ")";
  }
  throw FormatError(what + ": was the pool allocated for another format or geometry?");
}

TileLayout tile_layout(const FormatSpec& f, int head_dim, int block_size) {
  tile_bytes(f, head_dim, block_size);  // validates
  return make_layout(f.k, f.v, head_dim, block_size);
}

}  // namespace kvcomp
