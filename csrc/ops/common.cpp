#include "ops/common.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>

namespace kvcomp {

// torch's intra-op thread pool through the stable ABI (torch_parallel_for).
// An exception must not cross the C shim (it would come back as a bare
// "API call failed"): the first one thrown in a chunk is rethrown here.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  std::exception_ptr error;
  std::mutex mutex;
  torch::stable::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    try {
      f(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}
int num_threads() { return (int)torch::stable::get_num_threads(); }

std::ostream& operator<<(std::ostream& os, Shape s) {
  os << "[";
  for (int64_t d = 0; d < s.t.dim(); ++d) os << (d ? ", " : "") << s.t.size(d);
  return os << "]";
}

std::string device_name(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  std::string kind = t.is_cuda() ? "cuda" : "device";
  return kind + ":" + std::to_string(t.get_device_index());
}

bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

Tensor to_host(const Tensor& t) {
  if (t.is_cpu()) return t;
  return torch::stable::to(t, torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

Tensor empty_as(const Tensor& t) { return torch::stable::new_empty(t, t.sizes()); }

Tensor empty_on(const Tensor& t, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_empty(t, torch::headeronly::IntHeaderOnlyArrayRef(sizes), dtype);
}

int64_t max_seq_len(const Tensor& seq_lens) {
  const Tensor h = to_host(seq_lens);
  const int32_t* p = h.const_data_ptr<int32_t>();
  return h.numel() ? *std::max_element(p, p + h.numel()) : 0;
}

const FormatSpec& spec_arg(const std::string& format, const char* name) {
  try {
    return parse_spec(format);
  } catch (const FormatError& e) {
    value_error(name, ": ", e.what());
  }
}

void check_dtype(const Tensor& t, const char* name, std::initializer_list<ScalarType> ok) {
  for (auto s : ok)
    if (t.scalar_type() == s) return;
  std::ostringstream want;
  for (auto s : ok) want << (want.tellp() ? " or " : "") << s;
  value_error(name, " must have dtype ", want.str(), ", got ", t.scalar_type());
}

void check_dim(const Tensor& t, const char* name, int64_t dim, const char* shape) {
  KVCOMP_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got shape ",
               Shape{t});
}

void check_size(const Tensor& t, const char* name, int64_t d, int64_t expect,
                const char* what) {
  KVCOMP_CHECK(t.size(d) == expect, name, " has shape ", Shape{t}, ": dimension ", d,
               " must be ", expect, " (", what, ")");
}

void check_same_device(const Tensor& t, const char* name, const Tensor& ref,
                       const char* ref_name) {
  KVCOMP_CHECK(t.is_cpu() == ref.is_cpu() && t.get_device_index() == ref.get_device_index(),
               name, " is on ", device_name(t), " but ", ref_name, " is on ", device_name(ref));
}

void check_contiguous(const Tensor& t, const char* name) {
  KVCOMP_CHECK(t.is_contiguous(), name, " must be contiguous (it is written in place)");
}

void check_float_activation(const Tensor& t, const char* name) {
  check_dtype(t, name, {ScalarType::Half, ScalarType::BFloat16, ScalarType::Float});
}

Pool pool_arg(const Tensor& pool, const char* name, const FormatSpec& f,
              std::optional<int64_t> head_dim) {
  check_dtype(pool, name, {ScalarType::Byte});
  check_dim(pool, name, 3, "[num_blocks, num_kv_heads, tile_bytes]");
  check_contiguous(pool, name);
  // A tensor's size: 0 must not read as "unknown" (the kernels would then
  // read head_dim elements per row of an empty tensor), nor a size past int
  // truncate to a valid head_dim.
  KVCOMP_CHECK(!head_dim || (*head_dim > 0 && *head_dim <= kMaxHeadDim), name,
               ": the activations' head_dim ", head_dim.value_or(0), " is outside [1, ",
               kMaxHeadDim, "]");
  Geometry g{};
  try {
    g = infer_geometry(f, pool.size(2), head_dim ? (int)*head_dim : 0);
  } catch (const FormatError& e) {
    value_error(name, ": ", e.what());
  }
  KVCOMP_CHECK(pool.size(1) > 0, name, " must have at least one KV head");
  return Pool{pool.mutable_data_ptr<uint8_t>(), pool.size(0), (int)pool.size(1), pool.size(2),
              make_layout(f.k, f.v, g.head_dim, g.block_size)};
}

BlockTables block_tables_arg(const Tensor& bt, const Tensor& pool) {
  check_same_device(bt, "block_tables", pool, "pool");
  check_dtype(bt, "block_tables", {ScalarType::Int});
  check_dim(bt, "block_tables", 2, "[batch, max_blocks]");
  return BlockTables{nullptr, bt.size(0), bt.size(1)};
}

void seq_lens_arg(const Tensor& seq_lens, int64_t batch, const Tensor& pool) {
  check_same_device(seq_lens, "seq_lens", pool, "pool");
  check_dtype(seq_lens, "seq_lens", {ScalarType::Int});
  check_dim(seq_lens, "seq_lens", 1, "[batch]");
  check_size(seq_lens, "seq_lens", 0, batch, "the batch of block_tables");
}

namespace {
std::atomic<bool> g_cuda_validation{true};
}
bool cuda_validation() { return g_cuda_validation.load(std::memory_order_relaxed); }
void set_cuda_validation(bool enabled) {
  g_cuda_validation.store(enabled, std::memory_order_relaxed);
}

DType dtype_of(ScalarType t) {
  return t == ScalarType::Float ? DType::F32 : t == ScalarType::Half ? DType::F16 : DType::BF16;
}

}  // namespace kvcomp
