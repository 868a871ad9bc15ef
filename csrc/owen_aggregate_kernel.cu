// CUDA kernel for Owen aggregation (see owen_aggregate.h). One thread per output row: rows are
// independent and short (tens to a few hundred terms), so no reduction across threads is needed.
// A thread finds its game by binary search over row_offsets (a few cached loads), which keeps the
// batch description per game rather than per row.
#include "owen_aggregate.h"

namespace ospo_fast {
namespace {

template <typename scalar_t>
__global__ void owen_aggregate_kernel(const scalar_t* __restrict__ values, const scalar_t* __restrict__ term_weight,
                                      OwenBatch batch, scalar_t* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= batch.num_rows) return;
  // The game g with row_offsets[g] <= r < row_offsets[g + 1].
  int64_t lo = 0, hi = batch.num_games - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (__ldg(batch.row_offsets + mid) <= r) lo = mid; else hi = mid - 1;
  }
  const scalar_t* v = values + __ldg(batch.value_offsets + lo);
  const int64_t ptr = __ldg(batch.game_ptr_base + lo) + (r - __ldg(batch.row_offsets + lo));
  const int64_t end = __ldg(batch.player_ptr + ptr + 1);
  scalar_t acc = 0;
  for (int64_t t = __ldg(batch.player_ptr + ptr); t < end; ++t) {
    acc += term_weight[t] * (v[__ldg(batch.term_plus + t)] - v[__ldg(batch.term_minus + t)]);
  }
  out[r] = acc;
}

}  // namespace

template <typename scalar_t>
void launch_owen_aggregate(const scalar_t* values, const scalar_t* term_weight, OwenBatch batch, scalar_t* out,
                           cudaStream_t stream) {
  if (batch.num_rows == 0) return;
  constexpr int threads = 128;
  const int64_t blocks = (batch.num_rows + threads - 1) / threads;
  owen_aggregate_kernel<scalar_t><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(values, term_weight,
                                                                                            batch, out);
}

template void launch_owen_aggregate<float>(const float*, const float*, OwenBatch, float*, cudaStream_t);
template void launch_owen_aggregate<double>(const double*, const double*, OwenBatch, double*, cudaStream_t);

}  // namespace ospo_fast
