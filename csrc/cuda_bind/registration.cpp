// CUDA implementations of every op (schemas: csrc/registration.cpp).
#include <torch/csrc/stable/library.h>

#include "cuda_bind/ops.h"

STABLE_TORCH_LIBRARY_IMPL(kvcomp, CUDA, m) {
  using namespace kvcomp::cuda_op;
  KVCOMP_IMPL_EVERY_OP(m);
}
