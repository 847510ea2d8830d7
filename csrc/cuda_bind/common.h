// Helpers of the CUDA bindings: the stream and the validation gate.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/common.h"

namespace kvcomp {
namespace cuda_op {

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// Whether to run the host-side data checks (see ops/common.h): validation is
// on and the current stream is not capturing a CUDA graph.
inline bool host_checks() {
  return cuda_validation() &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

}  // namespace cuda_op
}  // namespace kvcomp
