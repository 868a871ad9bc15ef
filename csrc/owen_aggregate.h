// Owen aggregation: the one kernel behind every plan (exact or sampled) and every backend.
//
// For each output row r (one player of one game):
//   out[r] = sum_{t in [term_begin[r], term_end[r])} weight[t] * (values[base[r] + plus[t]] - values[base[r] + minus[t]])
//
// Torch-free on purpose: nvcc compiles owen_aggregate.cu on machines without a GPU or a torch install.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#else
typedef struct CUstream_st* cudaStream_t;
#endif

namespace ospo_fast {

// Launches the CUDA kernel on `stream`; every pointer is device memory. Inputs are trusted (checked once in Python).
template <typename scalar_t>
void launch_owen_aggregate(const scalar_t* values, const int64_t* row_value_base, const int64_t* row_term_begin,
                           const int64_t* row_term_end, const int64_t* term_plus, const int64_t* term_minus,
                           const scalar_t* term_weight, scalar_t* out, int64_t num_rows, cudaStream_t stream);

}  // namespace ospo_fast
