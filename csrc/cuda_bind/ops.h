// CUDA implementations of the ops of csrc/ops/ops.h, same signatures
// (ops/signatures.inc), registered for the CUDA dispatch key in
// registration.cpp. Compiled only when torch has CUDA. Each checks its arguments with csrc/ops/prepare.h
// and launches a kernel of csrc/cuda/ on the current stream.
#pragma once
#include "ops/ops.h"

namespace kvcomp {
namespace cuda_op {
#include "ops/signatures.inc"
}  // namespace cuda_op
}  // namespace kvcomp
