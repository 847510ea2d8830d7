// Helpers of the CUDA bindings: the stream and the validation gate.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops/common.h"

namespace kvcomp {
namespace cuda_op {

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Whether to run the host-side data checks (see ops/common.h): validation is
// on and the current stream is not capturing a CUDA graph.
inline bool host_checks() {
  return cuda_validation() &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

// t itself if its data is 16-byte aligned (the kernels' vector loads),
// else an aligned copy (a view at an odd offset).
inline at::Tensor aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 ? t.clone() : t;
}

// Pools are read with 16-byte vector loads: their data must be 16-byte
// aligned (always so for allocate_pool and views at tile boundaries).
inline void check_aligned_pool(const at::Tensor& pool, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(pool.data_ptr()) % 16 == 0, name,
                    " must start on a 16-byte boundary on CUDA");
}

// A device word for the check kernels' atomicMin, preset to "none" (all ones).
inline at::Tensor first_bad_word(const at::Tensor& like) {
  return at::full({1}, -1, like.options().dtype(at::kLong));
}
inline unsigned long long* word_ptr(at::Tensor& w) {
  return reinterpret_cast<unsigned long long*>(w.data_ptr<int64_t>());
}

}  // namespace cuda_op
}  // namespace kvcomp
