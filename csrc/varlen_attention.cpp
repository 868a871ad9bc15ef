// ospo_fast::varlen_attention: softmax attention over packed variable-length sequences on the CPU.
//
// A coalition batch is hundreds of short sequences (tens of tokens). PyTorch's SDPA needs one call per
// run of equal-length sequences plus a copy of each result back into the packed layout, and most of its
// time goes to per-call overhead at these sizes. This kernel reads Q, K and V where they lie (strided
// views into the fused QKV activation), does one task per sequence (its heads in turn, on rows prefetched
// while the previous sequence was computed), and writes the packed output in place.
//
// Per head: K is transposed into a small local buffer so that 16 keys' scores are one vector FMA per head
// dimension, four queries at a time; softmax uses a vectorised exp; outputs accumulate p_j * V_j in registers.
// Inputs are trusted (checked once in Python, ospo_fast/evaluate.py); the TORCH_CHECKs only guard memory.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define OSPO_FAST_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define OSPO_FAST_VECTOR_CLONES
#endif

namespace ospo_fast {
namespace {

constexpr int64_t kKeys = 16;  // keys per score vector
typedef float keys_t __attribute__((vector_size(kKeys * sizeof(float))));
typedef int32_t keys_i_t __attribute__((vector_size(kKeys * sizeof(int32_t))));

// exp(x) for x <= 0 to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial, 2^n built in the exponent bits. Below -87 the result is flushed to 0.
inline __attribute__((always_inline)) keys_t exp_nonpositive(keys_t x) {
  const keys_i_t low = x < -87.0f;  // all-ones lanes where exp underflows
  x = x < -87.0f ? -87.0f : x;
  const keys_t shifter = keys_t{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const keys_t n = (x * 1.44269504088896341f + shifter) - shifter;
  const keys_t r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;  // ln2 split in two
  keys_t p = keys_t{} + (1.0f / 5040.0f);
  p = p * r + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const keys_i_t bits = (__builtin_convertvector(n, keys_i_t) + 127) << 23;
  const keys_t out = p * reinterpret_cast<const keys_t&>(bits);
  const keys_i_t kept = reinterpret_cast<const keys_i_t&>(out) & ~low;
  return reinterpret_cast<const keys_t&>(kept);
}

inline __attribute__((always_inline)) keys_t load_keys(const float* x) {
  keys_t out;
  std::memcpy(&out, x, sizeof(keys_t));  // unaligned load
  return out;
}

struct Strides {
  int64_t token, head;
};

// Horizontal max and sum of a vector in four shuffle steps (not a 15-step scalar chain).
#define OSPO_FAST_KEYS_REDUCE(x, op)                                                                        \
  x = op(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));          \
  x = op(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));          \
  x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));          \
  x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));

inline __attribute__((always_inline)) keys_t keys_max(keys_t a, keys_t b) { return a > b ? a : b; }
inline __attribute__((always_inline)) keys_t keys_add(keys_t a, keys_t b) { return a + b; }
inline __attribute__((always_inline)) float reduce_max(keys_t x) {
  OSPO_FAST_KEYS_REDUCE(x, keys_max)
  return x[0];
}
inline __attribute__((always_inline)) float reduce_sum(keys_t x) {
  OSPO_FAST_KEYS_REDUCE(x, keys_add)
  return x[0];
}

// Queries per tile: each loaded key vector (scores) and value vector (output) serves four queries, and the
// four multiply-add chains are independent.
constexpr int64_t kQueries = 4;

// One (sequence, head): rows [start, start + length) of q, k, v -> out. Scratch: kt [D][blocks * kKeys],
// scores [kQueries][blocks * kKeys].
OSPO_FAST_VECTOR_CLONES void attend_one(const float* q, const float* k, const float* v, Strides qs, Strides ks,
                                        Strides vs, int64_t start, int64_t length, int64_t D, float scale, float* out,
                                        int64_t out_token_stride, float* kt, float* scores) {
  const int64_t blocks = (length + kKeys - 1) / kKeys;
  const int64_t width = blocks * kKeys;
  for (int64_t d = 0; d < D; ++d) {  // K transposed: 16 keys of one head dimension are one vector
    float* row = kt + d * width;
    for (int64_t j = 0; j < length; ++j) row[j] = k[(start + j) * ks.token + d];
    for (int64_t j = length; j < width; ++j) row[j] = 0.0f;
  }
  const keys_i_t lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t i0 = 0; i0 < length; i0 += kQueries) {
    const int64_t rows = std::min(kQueries, length - i0);
    const float* qr[kQueries];  // a short last tile repeats its last query and drops the copies
    for (int64_t r = 0; r < kQueries; ++r) qr[r] = q + (start + i0 + std::min(r, rows - 1)) * qs.token;
    float inv[kQueries];
    keys_t best[kQueries], total[kQueries];
    for (int64_t r = 0; r < kQueries; ++r) best[r] = keys_t{} - INFINITY, total[r] = keys_t{};
    for (int64_t b = 0; b < blocks; ++b) {
      keys_t s[kQueries] = {};
      const float* column = kt + b * kKeys;
      for (int64_t d = 0; d < D; ++d) {
        const keys_t kd = load_keys(column + d * width);
        for (int64_t r = 0; r < kQueries; ++r) s[r] += qr[r][d] * kd;
      }
      // Padding keys (past the sequence's end) get -inf: they never win the max and get weight 0.
      const auto valid = lane < static_cast<int32_t>(length - b * kKeys);
      for (int64_t r = 0; r < kQueries; ++r) {
        s[r] = valid ? s[r] * scale : keys_t{} - INFINITY;
        std::memcpy(scores + r * width + b * kKeys, &s[r], sizeof(keys_t));  // scratch is not 64-byte aligned
        best[r] = keys_max(best[r], s[r]);
      }
    }
    for (int64_t r = 0; r < kQueries; ++r) {
      const float m = reduce_max(best[r]);
      for (int64_t b = 0; b < blocks; ++b) {
        float* sb = scores + r * width + b * kKeys;
        const keys_t e = exp_nonpositive(load_keys(sb) - m);
        std::memcpy(sb, &e, sizeof(keys_t));
        total[r] += e;
      }
      inv[r] = 1.0f / reduce_sum(total[r]);
    }
    int64_t d = 0;
    for (; d + kKeys <= D; d += kKeys) {  // sum_j p_j V_j, 16 head dimensions at a time, in registers
      keys_t o[kQueries] = {};
      for (int64_t j = 0; j < length; ++j) {
        const keys_t vj = load_keys(v + (start + j) * vs.token + d);
        for (int64_t r = 0; r < kQueries; ++r) o[r] += scores[r * width + j] * vj;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const keys_t result = o[r] * inv[r];
        std::memcpy(out + (start + i0 + r) * out_token_stride + d, &result, sizeof(keys_t));
      }
    }
    for (; d < D; ++d) {  // head dimensions past the last multiple of 16
      for (int64_t r = 0; r < rows; ++r) {
        float o = 0.0f;
        for (int64_t j = 0; j < length; ++j) o += scores[r * width + j] * v[(start + j) * vs.token + d];
        out[(start + i0 + r) * out_token_stride + d] = o * inv[r];
      }
    }
  }
}

void varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                          int64_t max_seqlen, double scale, const at::Tensor& out) {
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
  const int64_t S = cu_seqlens.numel() - 1;
  if (S <= 0 || q.numel() == 0) return;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const Strides qs{q.stride(0), q.stride(1)}, ks{k.stride(0), k.stride(1)}, vs{v.stride(0), v.stride(1)};
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (std::max<int64_t>(max_seqlen, 1) + kKeys - 1) / kKeys;
  // One task per sequence, its heads in turn: the sequence's rows are read while the previous one is
  // computed (prefetched), and reused from cache by every head.
  auto prefetch_rows = [&](int64_t s) {
    for (int64_t t = cu[s]; t < cu[s + 1]; ++t) {
      for (const auto& [base, stride] : {std::pair{qp, qs}, std::pair{kp, ks}, std::pair{vp, vs}}) {
        const char* row = reinterpret_cast<const char*>(base + t * stride.token);
        const int64_t bytes = ((H - 1) * stride.head + D) * static_cast<int64_t>(sizeof(float));
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
      }
    }
  };
  at::parallel_for(0, S, 1, [&](int64_t first, int64_t last) {
    std::vector<float> kt(static_cast<size_t>(D * blocks * kKeys));
    std::vector<float> scores(static_cast<size_t>(kQueries * blocks * kKeys));
    for (int64_t s = first; s < last; ++s) {
      if (s + 1 < last) prefetch_rows(s + 1);
      const int64_t start = cu[s], length = cu[s + 1] - cu[s];
      if (length <= 0) continue;
      for (int64_t h = 0; h < H; ++h) {
        attend_one(qp + h * qs.head, kp + h * ks.head, vp + h * vs.head, qs, ks, vs, start, length, D,
                   static_cast<float>(scale), op + h * D, H * D, kt.data(), scores.data());
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ospo_fast, m) {
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(ospo_fast, CPU, m) { m.impl("varlen_attention", &varlen_attention_cpu); }

}  // namespace ospo_fast
