// Helpers of the CUDA bindings on the stable ABI: the device guard, the
// current stream, the validation gate, CUDA errors as exceptions.
#pragma once
#include <cuda_runtime_api.h>
#ifndef USE_CUDA
#define USE_CUDA  // declares the shim's CUDA part (aoti_torch_get_current_cuda_stream)
#endif
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <stdexcept>
#include <string>

#include "ops/common.h"

namespace kvcomp {
namespace cuda_op {

// Makes t's device current for the op (torch::stable's DeviceGuard).
struct Guard {
  explicit Guard(const Tensor& t) : guard(t.get_device_index()) {}
  torch::stable::accelerator::DeviceGuard guard;
};

// A launcher's error as an exception (RuntimeError in Python).
inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}
#define KVCOMP_CUDA_CHECK(expr) ::kvcomp::cuda_op::cuda_check((expr), #expr)

// torch's current stream on the current device (the stable C shim; its C++
// Stream::native_handle needs torch 2.13, our target is older).
inline cudaStream_t stream() {
  int device = 0;
  KVCOMP_CUDA_CHECK(cudaGetDevice(&device));
  void* s = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &s));
  return static_cast<cudaStream_t>(s);
}

// Whether to run the host-side data checks (see ops/common.h): validation is
// on and the current stream is not capturing a CUDA graph (the CUDA runtime's
// cudaStreamIsCapturing, for c10's currentStreamCaptureStatus).
inline bool host_checks() {
  if (!cuda_validation()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  KVCOMP_CUDA_CHECK(cudaStreamIsCapturing(stream(), &status));
  return status == cudaStreamCaptureStatusNone;
}

// The SM count (at::cuda::getCurrentDeviceProperties has no stable
// equivalent: the CUDA runtime directly; cudaDeviceGetAttribute is cheap).
inline int multiprocessor_count() {
  int device = 0, n = 0;
  KVCOMP_CUDA_CHECK(cudaGetDevice(&device));
  KVCOMP_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

// t itself if its data is 16-byte aligned (the kernels' vector loads),
// else an aligned copy (a view at an odd offset).
inline Tensor aligned(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 ? torch::stable::clone(t) : t;
}

// Pools are read with 16-byte vector loads: their data must be 16-byte
// aligned (always so for allocate_pool and views at tile boundaries).
inline void check_aligned_pool(const Tensor& pool, const char* name) {
  KVCOMP_CHECK(reinterpret_cast<uintptr_t>(pool.const_data_ptr()) % 16 == 0, name,
               " must start on a 16-byte boundary on CUDA");
}

// A device word for the check kernels' atomicMin, preset to "none" (all ones).
inline Tensor first_bad_word(const Tensor& like) {
  Tensor w = empty_on(like, {1}, ScalarType::Long);
  torch::stable::fill_(w, -1);
  return w;
}
inline unsigned long long* word_ptr(Tensor& w) {
  return reinterpret_cast<unsigned long long*>(w.mutable_data_ptr<int64_t>());
}
// The word on the host (a copy and a sync).
inline int64_t read_word(const Tensor& w) { return to_host(w).const_data_ptr<int64_t>()[0]; }

}  // namespace cuda_op
}  // namespace kvcomp
