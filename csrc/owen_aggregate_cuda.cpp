// CUDA implementation of ospo_fast::owen_aggregate: checks, then the torch-free launcher in owen_aggregate.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "owen_aggregate.h"

namespace ospo_fast {

void check_owen_aggregate_args(const at::Tensor& values, const at::Tensor& row_value_base,
                               const at::Tensor& row_term_begin, const at::Tensor& row_term_end,
                               const at::Tensor& term_plus, const at::Tensor& term_minus,
                               const at::Tensor& term_weight);

namespace {

at::Tensor owen_aggregate_cuda(const at::Tensor& values, const at::Tensor& row_value_base,
                               const at::Tensor& row_term_begin, const at::Tensor& row_term_end,
                               const at::Tensor& term_plus, const at::Tensor& term_minus,
                               const at::Tensor& term_weight) {
  check_owen_aggregate_args(values, row_value_base, row_term_begin, row_term_end, term_plus, term_minus, term_weight);
  TORCH_CHECK(values.is_cuda(), "owen_aggregate_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t num_rows = row_value_base.numel();
  at::Tensor out = at::empty({num_rows}, values.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "owen_aggregate_cuda", [&] {
    launch_owen_aggregate<scalar_t>(values.data_ptr<scalar_t>(), row_value_base.data_ptr<int64_t>(),
                                    row_term_begin.data_ptr<int64_t>(), row_term_end.data_ptr<int64_t>(),
                                    term_plus.data_ptr<int64_t>(), term_minus.data_ptr<int64_t>(),
                                    term_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), num_rows, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ospo_fast, CUDA, m) { m.impl("owen_aggregate", &owen_aggregate_cuda); }

}  // namespace ospo_fast
