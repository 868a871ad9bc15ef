// ospo_fast::layer_norm_rows: LayerNorm over the last dimension of a float32 CPU matrix, written into `out`.
//
// The packed encoder forward keeps its activations in reused buffers (see PackedBertForward). ATen's
// native_layer_norm.out computes into a fresh tensor and copies it into `out`: one more pass over the
// activations per LayerNorm, 13 of them per forward. Here each row is read once into L1, normalised with
// a two-pass mean and variance (as accurate as ATen's), and written once.
// Inputs are trusted (checked once in Python, ospo_fast/evaluate.py); the TORCH_CHECKs only guard memory.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>

#include "cpu_vector.h"

namespace ospo_fast {
namespace {

OSPO_FAST_INLINE float sum16(f32x16 x) {
  float s = 0;
  for (int i = 0; i < 16; ++i) s += x[i];
  return s;
}

// Rows [first, last) of x [*, C] -> out; C a multiple of 16 goes through vectors only, any C works.
OSPO_FAST_VECTOR_CLONES void layer_norm_rows_range(const float* x, const float* weight, const float* bias, float eps,
                                                   int64_t C, int64_t first, int64_t last, float* out) {
  const int64_t vec = C / 16 * 16;
  for (int64_t r = first; r < last; ++r) {
    const float* row = x + r * C;
    float* o = out + r * C;
    f32x16 acc = {};
    for (int64_t c = 0; c < vec; c += 16) acc += load16(row + c);
    float sum = sum16(acc);
    for (int64_t c = vec; c < C; ++c) sum += row[c];
    const float mean = sum / static_cast<float>(C);
    f32x16 sq = {};
    for (int64_t c = 0; c < vec; c += 16) {
      const f32x16 d = load16(row + c) - mean;
      sq += d * d;
    }
    float var = sum16(sq);
    for (int64_t c = vec; c < C; ++c) var += (row[c] - mean) * (row[c] - mean);
    const float rstd = 1.0f / std::sqrt(var / static_cast<float>(C) + eps);
    for (int64_t c = 0; c < vec; c += 16) {
      store16(o + c, (load16(row + c) - mean) * rstd * load16(weight + c) + load16(bias + c));
    }
    for (int64_t c = vec; c < C; ++c) o[c] = (row[c] - mean) * rstd * weight[c] + bias[c];
  }
}

void layer_norm_rows_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                         const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous(),
              "layer_norm_rows: x must be a contiguous float32 CPU matrix");
  const int64_t C = x.size(1);
  for (const at::Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == C && t->scalar_type() == at::kFloat && t->device().is_cpu() &&
                    t->is_contiguous(),
                "layer_norm_rows: weight and bias must be contiguous float32 CPU vectors of x.size(1)");
  }
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == at::kFloat && out.device().is_cpu() && out.is_contiguous(),
              "layer_norm_rows: out must be a contiguous float32 CPU tensor shaped like x");
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), 64, [&](int64_t first, int64_t last) {
    layer_norm_rows_range(xp, wp, bp, static_cast<float>(eps), C, first, last, op);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ospo_fast, m) {
  m.def("layer_norm_rows(Tensor x, Tensor weight, Tensor bias, float eps, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(ospo_fast, CPU, m) { m.impl("layer_norm_rows", &layer_norm_rows_cpu); }

}  // namespace ospo_fast
