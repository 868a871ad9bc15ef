// ospo_fast::varlen_attention: softmax attention over packed variable-length sequences on the CPU.
//
// A coalition batch is hundreds of short sequences (tens of tokens). PyTorch's SDPA needs one call per
// run of equal-length sequences plus a copy of each result back into the packed layout, and most of its
// time goes to per-call overhead at these sizes. This kernel reads Q, K and V where they lie (strided
// views into the fused QKV activation), does one task per sequence (its heads in turn), and writes the
// packed output in place.
//
// With qkv_bias (the fused QKV projection's bias), q, k and v are read unbiased and the bias is added here:
// to each query as it is loaded, to K as it is transposed, and to the output (the softmax weights sum to
// one), so the projection before is a plain matmul, without addmm's copy of the bias into its output.
// Per head: K is transposed into a small local buffer so that 16 keys' scores are one vector FMA per head
// dimension, four queries at a time; softmax uses a vectorised exp; outputs accumulate p_j * V_j in registers.
// Inputs are trusted (checked once in Python, ospo_fast/evaluate.py); the TORCH_CHECKs only guard memory.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu_vector.h"

namespace ospo_fast {
namespace {

constexpr int64_t kKeys = 16;  // keys per score vector

struct Strides {
  int64_t token, head;
};

// Queries per tile: each loaded key vector (scores) and value vector (output) serves four queries, and the
// four multiply-add chains are independent.
constexpr int64_t kQueries = 4;

// One (sequence, head): rows [start, start + length) of q, k, v -> out. Scratch: kt [D][blocks * kKeys],
// scores [kQueries][blocks * kKeys].
OSPO_FAST_VECTOR_CLONES void attend_one(const float* q, const float* k, const float* v, Strides qs, Strides ks,
                                        Strides vs, const float* bq, const float* bk, const float* bv, int64_t start,
                                        int64_t length, int64_t D, float scale, float* out, int64_t out_token_stride,
                                        float* kt, float* scores, float* qb) {
  const int64_t blocks = (length + kKeys - 1) / kKeys;
  const int64_t width = blocks * kKeys;
  // K transposed, kt[d][j]: 16 keys of one head dimension are one vector. Whole 16 x 16 blocks go through
  // an in-register transpose; padding keys repeat the last key (finite values, masked out below).
  const int64_t D16 = D - D % 16;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* key[kKeys];
    for (int64_t j = 0; j < kKeys; ++j) key[j] = k + (start + std::min(b * kKeys + j, length - 1)) * ks.token;
    for (int64_t d0 = 0; d0 < D16; d0 += 16) {
      f32x16 block[16];
      for (int64_t j = 0; j < kKeys; ++j) block[j] = load16(key[j] + d0);
      transpose_in_registers(block);
      for (int64_t d = 0; d < 16; ++d) store16(kt + (d0 + d) * width + b * kKeys, block[d] + bk[d0 + d]);
    }
    for (int64_t d = D16; d < D; ++d) {  // head dimensions past the last multiple of 16
      for (int64_t j = 0; j < kKeys; ++j) kt[d * width + b * kKeys + j] = key[j][d] + bk[d];
    }
  }
  const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t i0 = 0; i0 < length; i0 += kQueries) {
    const int64_t rows = std::min(kQueries, length - i0);
    float* qr[kQueries];  // biased queries; a short last tile repeats its last query and drops the copies
    for (int64_t r = 0; r < kQueries; ++r) {
      const float* row = q + (start + i0 + std::min(r, rows - 1)) * qs.token;
      qr[r] = qb + r * D;
      for (int64_t d = 0; d < D; ++d) qr[r][d] = row[d] + bq[d];
    }
    float inv[kQueries];
    f32x16 best[kQueries], total[kQueries];
    for (int64_t r = 0; r < kQueries; ++r) best[r] = f32x16{} - INFINITY, total[r] = f32x16{};
    for (int64_t b = 0; b < blocks; ++b) {
      f32x16 s[kQueries] = {};
      const float* column = kt + b * kKeys;
      for (int64_t d = 0; d < D; ++d) {
        const f32x16 kd = load16(column + d * width);
        for (int64_t r = 0; r < kQueries; ++r) s[r] += qr[r][d] * kd;
      }
      // Padding keys (past the sequence's end) get -inf: they never win the max and get weight 0.
      const auto valid = lane < static_cast<int32_t>(length - b * kKeys);
      for (int64_t r = 0; r < kQueries; ++r) {
        s[r] = valid ? s[r] * scale : f32x16{} - INFINITY;
        store16(scores + r * width + b * kKeys, s[r]);
        best[r] = lanes_max(best[r], s[r]);
      }
    }
    for (int64_t r = 0; r < kQueries; ++r) {
      const float m = reduce_max(best[r]);
      for (int64_t b = 0; b < blocks; ++b) {
        float* sb = scores + r * width + b * kKeys;
        const f32x16 e = exp_nonpositive(load16(sb) - m);
        store16(sb, e);
        total[r] += e;
      }
      inv[r] = 1.0f / reduce_sum(total[r]);
    }
    int64_t d = 0;
    for (; d + kKeys <= D; d += kKeys) {  // sum_j p_j V_j, 16 head dimensions at a time, in registers
      f32x16 o[kQueries] = {};
      for (int64_t j = 0; j < length; ++j) {
        const f32x16 vj = load16(v + (start + j) * vs.token + d);
        for (int64_t r = 0; r < kQueries; ++r) o[r] += scores[r * width + j] * vj;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const f32x16 result = o[r] * inv[r] + load16(bv + d);  // sum_j p_j (V_j + b) = sum_j p_j V_j + b
        store16(out + (start + i0 + r) * out_token_stride + d, result);
      }
    }
    for (; d < D; ++d) {  // head dimensions past the last multiple of 16
      for (int64_t r = 0; r < rows; ++r) {
        float o = 0.0f;
        for (int64_t j = 0; j < length; ++j) o += scores[r * width + j] * v[(start + j) * vs.token + d];
        out[(start + i0 + r) * out_token_stride + d] = o * inv[r] + bv[d];
      }
    }
  }
}

void varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                          int64_t max_seqlen, double scale, const at::Tensor& out,
                          const std::optional<at::Tensor>& qkv_bias) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(2) == 1,
                "varlen_attention: q, k, v must be float32 CPU [total, heads, head_dim] with contiguous rows");
    TORCH_CHECK(t->sizes() == q.sizes(), "varlen_attention: q, k, v must have one shape");
  }
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == at::kFloat && out.device().is_cpu() && out.is_contiguous(),
              "varlen_attention: out must be a contiguous float32 CPU tensor shaped like q");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.is_contiguous() &&
                  cu_seqlens.device().is_cpu(),
              "varlen_attention: cu_seqlens must be int32 CPU [sequences + 1]");
  const int64_t H = q.size(1), D = q.size(2);
  if (qkv_bias.has_value()) {
    TORCH_CHECK(qkv_bias->dim() == 1 && qkv_bias->numel() == 3 * H * D && qkv_bias->scalar_type() == at::kFloat &&
                    qkv_bias->device().is_cpu() && qkv_bias->is_contiguous(),
                "varlen_attention: qkv_bias must be a contiguous float32 CPU vector [3 * heads * head_dim]");
  }
  const int64_t S = cu_seqlens.numel() - 1;
  if (S <= 0 || q.numel() == 0) return;
  // The biases of q, k and v, [3][H][D]; zeros without one (an add per element is cheaper than a branch).
  const at::Tensor bias = qkv_bias.has_value() ? *qkv_bias : at::zeros({3 * H * D}, q.options());
  const float* bp = bias.data_ptr<float>();
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const Strides qs{q.stride(0), q.stride(1)}, ks{k.stride(0), k.stride(1)}, vs{v.stride(0), v.stride(1)};
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Scratch is sized by the longest sequence as cu_seqlens says, whatever max_seqlen claims.
  int64_t longest = std::max<int64_t>(max_seqlen, 1);
  for (int64_t s = 0; s < S; ++s) longest = std::max<int64_t>(longest, cu[s + 1] - cu[s]);
  const int64_t blocks = (longest + kKeys - 1) / kKeys;
  // One task per sequence, its heads in turn: the sequence's rows are reused from cache by every head.
  at::parallel_for(0, S, 1, [&](int64_t first, int64_t last) {
    std::vector<float> kt(static_cast<size_t>(D * blocks * kKeys));
    std::vector<float> scores(static_cast<size_t>(kQueries * blocks * kKeys));
    std::vector<float> qb(static_cast<size_t>(kQueries * D));
    for (int64_t s = first; s < last; ++s) {
      const int64_t start = cu[s], length = cu[s + 1] - cu[s];
      if (length <= 0) continue;
      for (int64_t h = 0; h < H; ++h) {
        attend_one(qp + h * qs.head, kp + h * ks.head, vp + h * vs.head, qs, ks, vs, bp + h * D, bp + (H + h) * D,
                   bp + (2 * H + h) * D, start, length, D, static_cast<float>(scale), op + h * D, H * D, kt.data(),
                   scores.data(), qb.data());
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ospo_fast, m) {
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, "
      "Tensor(a!) out, Tensor? qkv_bias=None) -> ()");
}

TORCH_LIBRARY_IMPL(ospo_fast, CPU, m) { m.impl("varlen_attention", &varlen_attention_cpu); }

}  // namespace ospo_fast
