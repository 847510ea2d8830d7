// Tensor-facing helpers shared by every op's binding (CPU now, CUDA too):
// argument checks with messages that name the argument, and adapters from
// tensors to the raw-pointer structs of csrc/cpu/kernels.h.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <string>

#include "cpu/kernels.h"
#include "kvcomp/spec.h"

namespace kvcomp {

// Runs f, turning kvcomp's std::invalid_argument errors into ValueError.
template <class F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

const FormatSpec& spec_arg(const std::string& format, const char* name = "format");

void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> ok);
void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape);
void check_size(const at::Tensor& t, const char* name, int64_t d, int64_t expect,
                const char* what);
void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name);
void check_contiguous(const at::Tensor& t, const char* name);
void check_float_activation(const at::Tensor& t, const char* name);

// Checks a pool tensor (uint8, [num_blocks, num_kv_heads, tile_bytes],
// contiguous) and finds its geometry; head_dim when the caller knows it (the
// activations' last dimension, which must then match).
Pool pool_arg(const at::Tensor& pool, const char* name, const FormatSpec& f,
              std::optional<int64_t> head_dim = std::nullopt);
// int32 [batch, max_blocks] block tables and, if given, int32 [batch] seq_lens.
BlockTables block_tables_arg(const at::Tensor& bt, const at::Tensor& pool);
void seq_lens_arg(const at::Tensor& seq_lens, int64_t batch, const at::Tensor& pool);

DType dtype_of(at::ScalarType t);

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
