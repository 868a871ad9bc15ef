// Row-wise float32 CPU kernels of the packed encoder forward (PackedBertForward), which keeps its
// activations in reused buffers:
//
// ospo_fast::layer_norm_rows: LayerNorm over the last dimension, written into `out`. ATen's
//   native_layer_norm.out computes into a fresh tensor and copies it into `out`: one more pass over the
//   activations per LayerNorm, 13 of them per forward. Here each row is read once into L1, normalised with
//   a two-pass mean and variance (as accurate as ATen's), and written once.
// ospo_fast::bias_gelu_: x = gelu(x + bias) in place, the exact (erf) GELU. The FFN's first projection is
//   then a plain matmul: addmm would copy the bias into its whole output before the product.
//
// Inputs are trusted (checked once in Python, ospo_fast/evaluate.py); the TORCH_CHECKs only guard memory.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>

#include "cpu_vector.h"

namespace ospo_fast {
namespace {

// Rows [first, last) of x [*, C] -> out; C a multiple of 16 goes through vectors only, any C works.
OSPO_FAST_VECTOR_CLONES void layer_norm_rows_range(const float* x, const float* weight, const float* bias, float eps,
                                                   int64_t C, int64_t first, int64_t last, float* out) {
  const int64_t vec = C / 16 * 16;
  for (int64_t r = first; r < last; ++r) {
    const float* row = x + r * C;
    float* o = out + r * C;
    f32x16 acc = {};
    for (int64_t c = 0; c < vec; c += 16) acc += load16(row + c);
    float sum = reduce_sum(acc);
    for (int64_t c = vec; c < C; ++c) sum += row[c];
    const float mean = sum / static_cast<float>(C);
    f32x16 sq = {};
    for (int64_t c = 0; c < vec; c += 16) {
      const f32x16 d = load16(row + c) - mean;
      sq += d * d;
    }
    float var = reduce_sum(sq);
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
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == at::kFloat && out.device().is_cpu() &&
                  out.is_contiguous(),
              "layer_norm_rows: out must be a contiguous float32 CPU tensor shaped like x");
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), 64, [&](int64_t first, int64_t last) {
    layer_norm_rows_range(xp, wp, bp, static_cast<float>(eps), C, first, last, op);
  });
}

// erf(x) in float32 to about 4e-7: a rational function odd in x (Eigen's generic_fast_erf_float), clamped
// to [-4, 4], where erf is +-1 to float precision.
OSPO_FAST_INLINE f32x16 erf16(f32x16 x) {
  x = x > 4.0f ? f32x16{} + 4.0f : x;
  x = x < -4.0f ? f32x16{} - 4.0f : x;
  const f32x16 x2 = x * x;
  f32x16 p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  f32x16 q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// x = gelu(x + bias), the exact (erf) GELU, for rows [first, last) of x [*, C].
OSPO_FAST_VECTOR_CLONES void bias_gelu_rows(float* x, const float* bias, int64_t C, int64_t first, int64_t last) {
  const int64_t vec = C / 16 * 16;
  for (int64_t r = first; r < last; ++r) {
    float* row = x + r * C;
    for (int64_t c = 0; c < vec; c += 16) {
      const f32x16 v = load16(row + c) + load16(bias + c);
      store16(row + c, 0.5f * v * (1.0f + erf16(v * 0.70710678118654752f)));
    }
    for (int64_t c = vec; c < C; ++c) {
      const float v = row[c] + bias[c];
      row[c] = 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    }
  }
}

void bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous(),
              "bias_gelu_: x must be a contiguous float32 CPU matrix");
  TORCH_CHECK(bias.dim() == 1 && bias.numel() == x.size(1) && bias.scalar_type() == at::kFloat &&
                  bias.device().is_cpu() && bias.is_contiguous(),
              "bias_gelu_: bias must be a contiguous float32 CPU vector of x.size(1)");
  float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const int64_t C = x.size(1);
  at::parallel_for(0, x.size(0), 16, [&](int64_t first, int64_t last) { bias_gelu_rows(xp, bp, C, first, last); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ospo_fast, m) {
  m.def("layer_norm_rows(Tensor x, Tensor weight, Tensor bias, float eps, Tensor(a!) out) -> ()");
  m.def("bias_gelu_(Tensor(a!) x, Tensor bias) -> ()");
}

TORCH_LIBRARY_IMPL(ospo_fast, CPU, m) {
  m.impl("layer_norm_rows", &layer_norm_rows_cpu);
  m.impl("bias_gelu_", &bias_gelu_cpu);
}

}  // namespace ospo_fast
