// Host-side format specs: parsing "<fmt>" / "<kfmt>/<vfmt>" strings and the
// table of tile sizes. No torch here; errors are thrown as FormatError.
#pragma once
#include <stdexcept>
#include <string>

#include "kvcomp/format.h"

namespace kvcomp {

struct FormatError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct FormatSpec {
  std::string name;  // canonical spelling
  ElemFormat k, v;
  bool per_channel() const { return is_per_channel(k.kind) || is_per_channel(v.kind); }
};

constexpr int kBlockSizes[] = {16, 32, 64, 128};

// The canonical spelling of one side ("int4:g64:h").
std::string side_name(ElemFormat f);

// Parses a spec (aliases kivi2, kivi4, fp8 included); cached, thread-safe.
const FormatSpec& parse_spec(const std::string& spec);

// Empty if head_dim suits the format, else why not.
std::string head_dim_problem(const FormatSpec& f, int head_dim);
bool valid_block_size(int block_size);

// Bytes of one tile: the natural layout, padded by whole tokens' worth of
// bytes (block_size) where needed so that no two (head_dim, block_size)
// pairs of one format share a tile size. The pool's last dimension then
// tells its geometry. Throws FormatError for an unsupported geometry.
int tile_bytes(const FormatSpec& f, int head_dim, int block_size);

struct Geometry {
  int head_dim;
  int block_size;
};
// The geometry whose tile is tile_bytes; head_dim > 0 restricts the search.
// Throws FormatError naming the format when none matches.
Geometry infer_geometry(const FormatSpec& f, long long tile_bytes, int head_dim = 0);

TileLayout tile_layout(const FormatSpec& f, int head_dim, int block_size);

}  // namespace kvcomp
