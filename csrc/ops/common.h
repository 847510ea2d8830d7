// Tensor-facing helpers shared by every op's binding (CPU and CUDA): the
// LibTorch stable-ABI types, argument checks with messages that name the
// argument, and adapters from tensors to the raw-pointer structs of
// csrc/cpu/kernels.h. Only torch::stable / torch::headeronly here, so one
// binary serves every torch from TORCH_TARGET_VERSION (setup.py) on.
#pragma once
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <initializer_list>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#include "kvcomp/spec.h"

namespace kvcomp {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// Bad arguments throw std::invalid_argument, which torch's dispatcher turns
// into a Python ValueError (the stable ABI has no TORCH_CHECK_VALUE). The
// kernels' own errors (ArgError, FormatError) are invalid_arguments too.
template <class... A>
[[noreturn]] void value_error(const A&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw std::invalid_argument(s.str());
}
#define KVCOMP_CHECK(cond, ...) \
  do {                          \
    if (!(cond)) ::kvcomp::value_error(__VA_ARGS__); \
  } while (0)

// Printable facts of a tensor for messages: "[2, 8, 128]", "cuda:0".
struct Shape {
  const Tensor& t;
};
std::ostream& operator<<(std::ostream& os, Shape s);
std::string device_name(const Tensor& t);
bool same_shape(const Tensor& a, const Tensor& b);

// t itself when contiguous (a dispatcher call saved), else a contiguous copy.
Tensor contig(const Tensor& t);
// t itself when of dtype, else a copy converted to it.
Tensor to_dtype(const Tensor& t, ScalarType dtype);
// t's data on the host: t itself on the CPU, else a copy (and a sync).
Tensor to_host(const Tensor& t);
// A new uninitialized tensor of t's shape, dtype and device (the shim's
// new_empty: stable's empty_like is a by-name dispatcher call, slower per op).
Tensor empty_as(const Tensor& t);
// A new uninitialized tensor on t's device.
Tensor empty_on(const Tensor& t, std::initializer_list<int64_t> sizes, ScalarType dtype);
// The largest of contiguous int32 [n] seq_lens (0 when empty), read on the
// host (a copy and a sync for a GPU tensor).
int64_t max_seq_len(const Tensor& seq_lens);

const FormatSpec& spec_arg(const std::string& format, const char* name = "format");

void check_dtype(const Tensor& t, const char* name, std::initializer_list<ScalarType> ok);
void check_dim(const Tensor& t, const char* name, int64_t dim, const char* shape);
void check_size(const Tensor& t, const char* name, int64_t d, int64_t expect, const char* what);
void check_same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name);
void check_contiguous(const Tensor& t, const char* name);
void check_float_activation(const Tensor& t, const char* name);

// Checks a pool tensor (uint8, [num_blocks, num_kv_heads, tile_bytes],
// contiguous) and finds its geometry; head_dim when the caller knows it (the
// activations' last dimension, which must then match).
Pool pool_arg(const Tensor& pool, const char* name, const FormatSpec& f,
              std::optional<int64_t> head_dim = std::nullopt);
// int32 [batch, max_blocks] block tables and, if given, int32 [batch] seq_lens.
BlockTables block_tables_arg(const Tensor& bt, const Tensor& pool);
void seq_lens_arg(const Tensor& seq_lens, int64_t batch, const Tensor& pool);

DType dtype_of(ScalarType t);

// CUDA validation. The CUDA bindings run the data-dependent checks of the CPU
// path (ids and lengths in range, keep positions, NaN/Inf in data to be
// stored) with the same messages; that reads data on the host, a sync per
// call. They run while this switch is on (the default) and the current stream
// is not capturing a CUDA graph. Without them a bad id or length is not
// reported, but every kernel stays bounds-safe: an out-of-range slot, block id
// or position is skipped, never read or written (outputs it would have fed
// are zero), and NaN/Inf may be stored.
bool cuda_validation();
void set_cuda_validation(bool enabled);

}  // namespace kvcomp
