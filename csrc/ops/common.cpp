#include "ops/common.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <sstream>

namespace kvcomp {

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  at::parallel_for(0, n, grain, f);
}
int num_threads() { return at::get_num_threads(); }

const FormatSpec& spec_arg(const std::string& format, const char* name) {
  try {
    return parse_spec(format);
  } catch (const FormatError& e) {
    TORCH_CHECK_VALUE(false, name, ": ", e.what());
  }
}

void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> ok) {
  for (auto s : ok)
    if (t.scalar_type() == s) return;
  std::ostringstream want;
  for (auto s : ok) want << (want.tellp() ? " or " : "") << s;
  TORCH_CHECK_VALUE(false, name, " must have dtype ", want.str(), ", got ", t.scalar_type());
}

void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got shape ",
                    t.sizes());
}

void check_size(const at::Tensor& t, const char* name, int64_t d, int64_t expect,
                const char* what) {
  TORCH_CHECK_VALUE(t.size(d) == expect, name, " has shape ", t.sizes(), ": dimension ", d,
                    " must be ", expect, " (", what, ")");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (it is written in place)");
}

void check_float_activation(const at::Tensor& t, const char* name) {
  check_dtype(t, name, {at::kHalf, at::kBFloat16, at::kFloat});
}

Pool pool_arg(const at::Tensor& pool, const char* name, const FormatSpec& f,
              std::optional<int64_t> head_dim) {
  check_dtype(pool, name, {at::kByte});
  check_dim(pool, name, 3, "[num_blocks, num_kv_heads, tile_bytes]");
  check_contiguous(pool, name);
  // A tensor's size: 0 must not read as "unknown" (the kernels would then
  // read head_dim elements per row of an empty tensor), nor a size past int
  // truncate to a valid head_dim.
  TORCH_CHECK_VALUE(!head_dim || (*head_dim > 0 && *head_dim <= kMaxHeadDim), name,
                    ": the activations' head_dim ", head_dim.value_or(0), " is outside [1, ",
                    kMaxHeadDim, "]");
  Geometry g{};
  try {
    g = infer_geometry(f, pool.size(2), head_dim ? (int)*head_dim : 0);
  } catch (const FormatError& e) {
    TORCH_CHECK_VALUE(false, name, ": ", e.what());
  }
  TORCH_CHECK_VALUE(pool.size(1) > 0, name, " must have at least one KV head");
  return Pool{pool.data_ptr<uint8_t>(), pool.size(0), (int)pool.size(1), pool.size(2),
              make_layout(f.k, f.v, g.head_dim, g.block_size)};
}

BlockTables block_tables_arg(const at::Tensor& bt, const at::Tensor& pool) {
  check_same_device(bt, "block_tables", pool, "pool");
  check_dtype(bt, "block_tables", {at::kInt});
  check_dim(bt, "block_tables", 2, "[batch, max_blocks]");
  return BlockTables{nullptr, bt.size(0), bt.size(1)};
}

void seq_lens_arg(const at::Tensor& seq_lens, int64_t batch, const at::Tensor& pool) {
  check_same_device(seq_lens, "seq_lens", pool, "pool");
  check_dtype(seq_lens, "seq_lens", {at::kInt});
  check_dim(seq_lens, "seq_lens", 1, "[batch]");
  check_size(seq_lens, "seq_lens", 0, batch, "the batch of block_tables");
}

namespace {
std::atomic<bool> g_cuda_validation{true};
}
bool cuda_validation() { return g_cuda_validation.load(std::memory_order_relaxed); }
void set_cuda_validation(bool enabled) { g_cuda_validation.store(enabled, std::memory_order_relaxed); }

DType dtype_of(at::ScalarType t) {
  return t == at::kFloat ? DType::F32 : t == at::kHalf ? DType::F16 : DType::BF16;
}

}  // namespace kvcomp
