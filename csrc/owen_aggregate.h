// Owen aggregation: the one kernel behind every plan (exact or sampled) and every backend.
//
// A batch holds G games. Game g owns values[value_offsets[g] : value_offsets[g+1]] (its plan's coalitions)
// and output rows row_offsets[g] .. row_offsets[g+1]-1 (its players). Its plan's terms are found through
// player_ptr starting at ptr = game_ptr_base[g]: player i of the game sums the terms
// player_ptr[ptr+i] .. player_ptr[ptr+i+1]-1, and
//
//   out[row_offsets[g] + i] = sum_t weight[t] * (v_g[plus[t]] - v_g[minus[t]]),   v_g = values + value_offsets[g]
//
// Games that share a plan point at the same player_ptr slice, so a plan is stored once per batch.
// Torch-free on purpose: nvcc compiles owen_aggregate_kernel.cu on machines without a GPU or a torch install.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#else
typedef struct CUstream_st* cudaStream_t;
#endif

namespace ospo_fast {

struct OwenBatch {
  const int64_t* value_offsets;  // [G + 1]
  const int64_t* row_offsets;    // [G + 1]
  const int64_t* game_ptr_base;  // [G]
  const int64_t* player_ptr;     // [Q]
  const int64_t* term_plus;      // [T]
  const int64_t* term_minus;     // [T]
  int64_t num_games;
  int64_t num_terms;
  int64_t num_rows;
};

// Launches the CUDA kernel on `stream`; every pointer is device memory. Inputs are trusted (checked once in Python).
template <typename scalar_t>
void launch_owen_aggregate(const scalar_t* values, const scalar_t* term_weight, OwenBatch batch, scalar_t* out,
                           cudaStream_t stream);

}  // namespace ospo_fast
