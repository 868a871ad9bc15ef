// CUDA implementation of ospo_fast::owen_aggregate: checks, then the torch-free launcher in owen_aggregate_kernel.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "owen_aggregate.h"

namespace ospo_fast {

// Defined in owen_aggregate.cpp, shared by both devices.
void check_owen_aggregate_args(const at::Tensor& values, const at::Tensor& value_offsets,
                               const at::Tensor& row_offsets, const at::Tensor& game_ptr_base,
                               const at::Tensor& player_ptr, const at::Tensor& term_plus,
                               const at::Tensor& term_minus, const at::Tensor& term_weight, int64_t num_rows);
OwenBatch owen_batch_view(const at::Tensor& value_offsets, const at::Tensor& row_offsets,
                          const at::Tensor& game_ptr_base, const at::Tensor& player_ptr, const at::Tensor& term_plus,
                          const at::Tensor& term_minus, int64_t num_rows);

namespace {

at::Tensor owen_aggregate_cuda(const at::Tensor& values, const at::Tensor& value_offsets,
                               const at::Tensor& row_offsets, const at::Tensor& game_ptr_base,
                               const at::Tensor& player_ptr, const at::Tensor& term_plus,
                               const at::Tensor& term_minus, const at::Tensor& term_weight, int64_t num_rows) {
  check_owen_aggregate_args(values, value_offsets, row_offsets, game_ptr_base, player_ptr, term_plus, term_minus,
                            term_weight, num_rows);
  TORCH_CHECK(values.is_cuda(), "owen_aggregate_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({num_rows}, values.options());
  const OwenBatch batch =
      owen_batch_view(value_offsets, row_offsets, game_ptr_base, player_ptr, term_plus, term_minus, num_rows);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "owen_aggregate_cuda", [&] {
    launch_owen_aggregate<scalar_t>(values.data_ptr<scalar_t>(), term_weight.data_ptr<scalar_t>(), batch,
                                    out.data_ptr<scalar_t>(), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ospo_fast, CUDA, m) { m.impl("owen_aggregate", &owen_aggregate_cuda); }

}  // namespace ospo_fast
