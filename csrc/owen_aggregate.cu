// CUDA kernel for Owen aggregation (see owen_aggregate.h). One thread per output row: rows are
// independent and short (tens to a few hundred terms), so no reduction across threads is needed.
#include "owen_aggregate.h"

namespace ospo_fast {
namespace {

template <typename scalar_t>
__global__ void owen_aggregate_kernel(const scalar_t* __restrict__ values, const int64_t* __restrict__ row_value_base,
                                      const int64_t* __restrict__ row_term_begin,
                                      const int64_t* __restrict__ row_term_end, const int64_t* __restrict__ term_plus,
                                      const int64_t* __restrict__ term_minus, const scalar_t* __restrict__ term_weight,
                                      scalar_t* __restrict__ out, int64_t num_rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= num_rows) return;
  const scalar_t* v = values + row_value_base[r];
  const int64_t end = row_term_end[r];
  scalar_t acc = 0;
  for (int64_t t = row_term_begin[r]; t < end; ++t) {
    acc += term_weight[t] * (v[term_plus[t]] - v[term_minus[t]]);
  }
  out[r] = acc;
}

}  // namespace

template <typename scalar_t>
void launch_owen_aggregate(const scalar_t* values, const int64_t* row_value_base, const int64_t* row_term_begin,
                           const int64_t* row_term_end, const int64_t* term_plus, const int64_t* term_minus,
                           const scalar_t* term_weight, scalar_t* out, int64_t num_rows, cudaStream_t stream) {
  if (num_rows == 0) return;
  constexpr int threads = 128;
  const int64_t blocks = (num_rows + threads - 1) / threads;
  owen_aggregate_kernel<scalar_t><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
      values, row_value_base, row_term_begin, row_term_end, term_plus, term_minus, term_weight, out, num_rows);
}

template void launch_owen_aggregate<float>(const float*, const int64_t*, const int64_t*, const int64_t*,
                                           const int64_t*, const int64_t*, const float*, float*, int64_t,
                                           cudaStream_t);
template void launch_owen_aggregate<double>(const double*, const int64_t*, const int64_t*, const int64_t*,
                                            const int64_t*, const int64_t*, const double*, double*, int64_t,
                                            cudaStream_t);

}  // namespace ospo_fast
