// Registers the ospo_fast::owen_aggregate operator and its CPU implementation.
//
// Argument checks live in Python (ospo_fast/owen.py); the TORCH_CHECKs here only guard memory safety
// against calls that bypass it (dtype, device, contiguity), never the index ranges.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_vector.h"
#include "owen_aggregate.h"

namespace ospo_fast {

namespace {

// Games per tile: one 512-bit vector of values.
template <typename scalar_t>
constexpr int64_t kLanes = 64 / sizeof(scalar_t);

// Above this many bytes of values per thread, a batch no longer sits in a core's L2 and tiles prefetch the
// next tile's values while they compute; below it the prefetches would only cost issue slots.
constexpr int64_t kPrefetchBytesPerThread = 1 << 20;

// A tile's transposed values must stay cache-resident; games with larger plans take the per-game path.
constexpr int64_t kMaxTileCoalitions = 2048;

// One game, one player at a time.
template <typename scalar_t>
OSPO_FAST_INLINE void aggregate_game(const scalar_t* values, const scalar_t* weight, const OwenBatch& b, int64_t g,
                                     scalar_t* out) {
  const scalar_t* v = values + b.value_offsets[g];
  const int64_t* ptr = b.player_ptr + b.game_ptr_base[g];
  const int64_t n = b.row_offsets[g + 1] - b.row_offsets[g];
  scalar_t* o = out + b.row_offsets[g];
  for (int64_t i = 0; i < n; ++i) {
    scalar_t acc = 0;
    for (int64_t t = ptr[i]; t < ptr[i + 1]; ++t) acc += weight[t] * (v[b.term_plus[t]] - v[b.term_minus[t]]);
    o[i] = acc;
  }
}

// Up to kLanes consecutive games that share one plan. Their values are transposed into buf[C] of vectors
// (lane l = game g0 + l), so a term costs two vector loads and one multiply-add for all the games of the
// tile at once. GCC's vector extension keeps the accumulator in one register whatever the clone's ISA.
template <typename scalar_t>
OSPO_FAST_INLINE void aggregate_tile(const scalar_t* values, const scalar_t* weight, const uint64_t* pairs,
                                     const OwenBatch& b, int64_t g0, int64_t games, int64_t C, scalar_t* buf,
                                     scalar_t* out, const char* next, const char* next_end) {
  constexpr int64_t L = kLanes<scalar_t>;
  typedef scalar_t lanes_t __attribute__((vector_size(64)));
  const scalar_t* rows[L];
  for (int64_t l = 0; l < L; ++l) rows[l] = values + b.value_offsets[g0 + std::min(l, games - 1)];  // pad lanes repeat
  lanes_t* columns = reinterpret_cast<lanes_t*>(buf);
  int64_t c0 = 0;
  for (; c0 + L <= C; c0 += L) {  // L x L blocks: L row loads, an in-register transpose, L column stores
    lanes_t block[L];
    for (int64_t l = 0; l < L; ++l) std::memcpy(&block[l], rows[l] + c0, sizeof(lanes_t));
    transpose_in_registers(block);
    for (int64_t l = 0; l < L; ++l) columns[c0 + l] = block[l];
  }
  for (int64_t c = c0; c < C; ++c) {
    for (int64_t l = 0; l < L; ++l) buf[c * L + l] = rows[l][c];
  }
  const int64_t* ptr = b.player_ptr + b.game_ptr_base[g0];
  const int64_t n = b.row_offsets[g0 + 1] - b.row_offsets[g0];
  // pairs[t] packs the byte offsets in buf of (plus, minus) in one word: one load and no index arithmetic
  // in the hottest loop.
  const char* bytes = reinterpret_cast<const char*>(buf);
  auto at = [&](uint64_t offset) { return *reinterpret_cast<const lanes_t*>(bytes + offset); };
  auto gain = [&](int64_t t) { return at(pairs[t] & 0xffffffffu) - at(pairs[t] >> 32); };
  for (int64_t i = 0; i < n; ++i) {
    // Four independent accumulators hide the multiply-add latency of one long dependency chain.
    lanes_t acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
    int64_t t = ptr[i];
    const int64_t end = ptr[i + 1];
    for (; t + 4 <= end; t += 4) {
      // The next tile's values stream into L1 while this one computes (two lines per four terms): without
      // it, a tile waits on memory, then computes; float64 values of a large batch are read from L3.
      if (next < next_end) {
        __builtin_prefetch(next, 0, 3);
        __builtin_prefetch(next + 64, 0, 3);
        next += 128;
      }
      acc0 += weight[t] * gain(t);
      acc1 += weight[t + 1] * gain(t + 1);
      acc2 += weight[t + 2] * gain(t + 2);
      acc3 += weight[t + 3] * gain(t + 3);
    }
    for (; t < end; ++t) acc0 += weight[t] * gain(t);
    const lanes_t acc = (acc0 + acc1) + (acc2 + acc3);
    for (int64_t l = 0; l < games; ++l) out[b.row_offsets[g0 + l] + i] = acc[l];
  }
}

OSPO_FAST_VECTOR_CLONES void aggregate_tile_float(const float* values, const float* weight, const uint64_t* pairs,
                                                  const OwenBatch& b, int64_t g0, int64_t games, int64_t C, float* buf,
                                                  float* out, const char* next, const char* next_end) {
  aggregate_tile<float>(values, weight, pairs, b, g0, games, C, buf, out, next, next_end);
}

OSPO_FAST_VECTOR_CLONES void aggregate_tile_double(const double* values, const double* weight, const uint64_t* pairs,
                                                   const OwenBatch& b, int64_t g0, int64_t games, int64_t C,
                                                   double* buf, double* out, const char* next, const char* next_end) {
  aggregate_tile<double>(values, weight, pairs, b, g0, games, C, buf, out, next, next_end);
}

// Overloads so the dispatch lambda below can stay generic over the dtype.
void aggregate_tile_any(const float* v, const float* w, const uint64_t* pairs, const OwenBatch& b, int64_t g0,
                        int64_t games, int64_t C, float* buf, float* out, const char* next, const char* next_end) {
  aggregate_tile_float(v, w, pairs, b, g0, games, C, buf, out, next, next_end);
}
void aggregate_tile_any(const double* v, const double* w, const uint64_t* pairs, const OwenBatch& b, int64_t g0,
                        int64_t games, int64_t C, double* buf, double* out, const char* next, const char* next_end) {
  aggregate_tile_double(v, w, pairs, b, g0, games, C, buf, out, next, next_end);
}

// The end of the tile that starts at game g: a run of at most `lanes` consecutive games before `limit` with
// the same plan (same player_ptr slice and sizes).
int64_t tile_end(const OwenBatch& b, int64_t g, int64_t limit, int64_t lanes) {
  const int64_t C = b.value_offsets[g + 1] - b.value_offsets[g];
  const int64_t n = b.row_offsets[g + 1] - b.row_offsets[g];
  int64_t e = g + 1;
  while (e < limit && e - g < lanes && b.game_ptr_base[e] == b.game_ptr_base[g] &&
         b.value_offsets[e + 1] - b.value_offsets[e] == C && b.row_offsets[e + 1] - b.row_offsets[e] == n) {
    ++e;
  }
  return e;
}

template <typename scalar_t>
void aggregate_cpu(const scalar_t* values, const scalar_t* weight, const OwenBatch& b, scalar_t* out) {
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t num_terms = b.num_terms;
  // Byte offsets of a term's coalitions in a tile buffer (64 bytes a coalition); only tiled plans, of at
  // most kMaxTileCoalitions coalitions, read them, so they fit in 32 bits.
  std::vector<uint64_t> pairs(static_cast<size_t>(num_terms));
  for (int64_t t = 0; t < num_terms; ++t) {
    pairs[t] = static_cast<uint64_t>(b.term_plus[t]) * 64 | (static_cast<uint64_t>(b.term_minus[t]) * 64 << 32);
  }
  const bool prefetch =
      b.value_offsets[b.num_games] * int64_t(sizeof(scalar_t)) > kPrefetchBytesPerThread * at::get_num_threads();
  // Parallel over blocks of games; each block cuts its own tiles (a tile never crosses a block's edge),
  // so no serial pass over the batch precedes the parallel one.
  constexpr int64_t kBlockGames = 16 * L;
  const int64_t num_blocks = (b.num_games + kBlockGames - 1) / kBlockGames;
  at::parallel_for(0, num_blocks, 1, [&](int64_t first, int64_t last) {
    // 64-byte aligned: buf is read as whole vectors.
    std::unique_ptr<scalar_t[], decltype(&std::free)> buf(nullptr, &std::free);
    int64_t capacity = 0;
    const int64_t limit = std::min(last * kBlockGames, b.num_games);
    for (int64_t g0 = first * kBlockGames; g0 < limit;) {
      const int64_t block_end = std::min((g0 / kBlockGames + 1) * kBlockGames, limit);
      const int64_t g1 = tile_end(b, g0, block_end, L), games = g1 - g0;
      const int64_t C = b.value_offsets[g0 + 1] - b.value_offsets[g0];
      if (games == 1 || C > kMaxTileCoalitions) {
        for (int64_t g = g0; g < g1; ++g) aggregate_game<scalar_t>(values, weight, b, g, out);
      } else {
        if (C > capacity) {
          capacity = C;
          buf.reset(static_cast<scalar_t*>(std::aligned_alloc(64, static_cast<size_t>(C) * 64)));
          TORCH_CHECK(buf != nullptr, "owen_aggregate_cpu: out of memory");
        }
        const char* next = reinterpret_cast<const char*>(values + b.value_offsets[g1]);  // the next L games
        const char* next_end =
            prefetch ? reinterpret_cast<const char*>(values + b.value_offsets[std::min(g1 + L, b.num_games)]) : next;
        aggregate_tile_any(values, weight, pairs.data(), b, g0, games, C, buf.get(), out, next, next_end);
      }
      g0 = g1;
    }
  });
}

}  // namespace

void check_owen_aggregate_args(const at::Tensor& values, const at::Tensor& value_offsets,
                               const at::Tensor& row_offsets, const at::Tensor& game_ptr_base,
                               const at::Tensor& player_ptr, const at::Tensor& term_plus,
                               const at::Tensor& term_minus, const at::Tensor& term_weight, int64_t num_rows) {
  TORCH_CHECK(values.dim() == 1, "owen_aggregate: values must be 1-D");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "owen_aggregate: values must be float32 or float64");
  TORCH_CHECK(term_weight.scalar_type() == values.scalar_type(), "owen_aggregate: term_weight dtype must match values");
  for (const at::Tensor* t : {&value_offsets, &row_offsets, &game_ptr_base, &player_ptr, &term_plus, &term_minus}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1, "owen_aggregate: index tensors must be 1-D int64");
  }
  const int64_t G = game_ptr_base.numel();
  TORCH_CHECK(value_offsets.numel() == G + 1 && row_offsets.numel() == G + 1,
              "owen_aggregate: value_offsets and row_offsets need num_games + 1 entries");
  TORCH_CHECK(term_minus.numel() == term_plus.numel() && term_weight.numel() == term_plus.numel(),
              "owen_aggregate: term tensors must have the same length");
  TORCH_CHECK(num_rows >= 0, "owen_aggregate: num_rows must be >= 0");
  for (const at::Tensor* t :
       {&values, &value_offsets, &row_offsets, &game_ptr_base, &player_ptr, &term_plus, &term_minus, &term_weight}) {
    TORCH_CHECK(t->device() == values.device(), "owen_aggregate: all tensors must be on one device");
    TORCH_CHECK(t->is_contiguous(), "owen_aggregate: all tensors must be contiguous");
  }
}

OwenBatch owen_batch_view(const at::Tensor& value_offsets, const at::Tensor& row_offsets,
                          const at::Tensor& game_ptr_base, const at::Tensor& player_ptr, const at::Tensor& term_plus,
                          const at::Tensor& term_minus, int64_t num_rows) {
  return OwenBatch{value_offsets.data_ptr<int64_t>(), row_offsets.data_ptr<int64_t>(),
                   game_ptr_base.data_ptr<int64_t>(), player_ptr.data_ptr<int64_t>(),
                   term_plus.data_ptr<int64_t>(),     term_minus.data_ptr<int64_t>(),
                   game_ptr_base.numel(),             term_plus.numel(),
                   num_rows};
}

namespace {

at::Tensor owen_aggregate_cpu(const at::Tensor& values, const at::Tensor& value_offsets, const at::Tensor& row_offsets,
                              const at::Tensor& game_ptr_base, const at::Tensor& player_ptr,
                              const at::Tensor& term_plus, const at::Tensor& term_minus,
                              const at::Tensor& term_weight, int64_t num_rows) {
  check_owen_aggregate_args(values, value_offsets, row_offsets, game_ptr_base, player_ptr, term_plus, term_minus,
                            term_weight, num_rows);
  TORCH_CHECK(values.device().is_cpu(), "owen_aggregate_cpu: tensors must be on the CPU");
  at::Tensor out = at::empty({num_rows}, values.options());
  const OwenBatch batch =
      owen_batch_view(value_offsets, row_offsets, game_ptr_base, player_ptr, term_plus, term_minus, num_rows);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "owen_aggregate_cpu", [&] {
    aggregate_cpu<scalar_t>(values.data_ptr<scalar_t>(), term_weight.data_ptr<scalar_t>(), batch,
                            out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ospo_fast, m) {
  m.def(
      "owen_aggregate(Tensor values, Tensor value_offsets, Tensor row_offsets, Tensor game_ptr_base, "
      "Tensor player_ptr, Tensor term_plus, Tensor term_minus, Tensor term_weight, int num_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(ospo_fast, CPU, m) { m.impl("owen_aggregate", &owen_aggregate_cpu); }

}  // namespace ospo_fast

// A bare module: importing ospo_fast._C runs the registrations above. Whether CUDA kernels were built
// is exposed as the attribute `with_cuda`.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ospo_fast operators", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef OSPO_FAST_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
}
