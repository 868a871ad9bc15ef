// Portable 16-float vectors (GCC/Clang vector extension) for the CPU kernels, and the math they share.
//
// Kernels using these are compiled for several instruction sets (OSPO_FAST_VECTOR_CLONES) and the best is
// picked at load time: one wheel runs with AVX-512 where the CPU has it and with SSE2 where it has nothing
// better; a 16-float vector is one AVX-512 register, two AVX2 registers or four SSE registers.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define OSPO_FAST_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define OSPO_FAST_VECTOR_CLONES
#endif
#define OSPO_FAST_INLINE inline __attribute__((always_inline))

namespace ospo_fast {

typedef float f32x16 __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t i32x16 __attribute__((vector_size(16 * sizeof(int32_t))));

OSPO_FAST_INLINE f32x16 load16(const float* x) {
  f32x16 out;
  std::memcpy(&out, x, sizeof(f32x16));  // unaligned load
  return out;
}

OSPO_FAST_INLINE void store16(float* x, f32x16 value) { std::memcpy(x, &value, sizeof(f32x16)); }

OSPO_FAST_INLINE f32x16 bits_as_float(i32x16 x) {
  f32x16 out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}

OSPO_FAST_INLINE i32x16 float_as_bits(f32x16 x) {
  i32x16 out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}

// exp(x) for x <= 0 to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial, 2^n built in the exponent bits. Below -87 the result is flushed to 0.
OSPO_FAST_INLINE f32x16 exp_nonpositive(f32x16 x) {
  const i32x16 low = x < -87.0f;  // all-ones lanes where exp underflows
  x = x < -87.0f ? -87.0f : x;
  const f32x16 shifter = f32x16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const f32x16 n = (x * 1.44269504088896341f + shifter) - shifter;
  const f32x16 r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;  // ln2 split in two
  f32x16 p = f32x16{} + (1.0f / 5040.0f);
  p = p * r + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const f32x16 out = p * bits_as_float((__builtin_convertvector(n, i32x16) + 127) << 23);
  return bits_as_float(float_as_bits(out) & ~low);
}

// Horizontal max and sum of a vector in four shuffle steps (not a 15-step scalar chain).
#define OSPO_FAST_LANES_REDUCE(x, op)                                                                       \
  x = op(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));          \
  x = op(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));          \
  x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));          \
  x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));

OSPO_FAST_INLINE f32x16 lanes_max(f32x16 a, f32x16 b) { return a > b ? a : b; }
OSPO_FAST_INLINE f32x16 lanes_add(f32x16 a, f32x16 b) { return a + b; }
OSPO_FAST_INLINE float reduce_max(f32x16 x) {
  OSPO_FAST_LANES_REDUCE(x, lanes_max)
  return x[0];
}
OSPO_FAST_INLINE float reduce_sum(f32x16 x) {
  OSPO_FAST_LANES_REDUCE(x, lanes_add)
  return x[0];
}

// Two-source shuffle patterns for an in-register transpose: stage s swaps bit s of the row and column
// index, so four stages (three for doubles) turn 16 rows of 16 floats (8 of 8 doubles) into columns.
#define OSPO_FAST_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#define OSPO_FAST_F32_LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define OSPO_FAST_F32_HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define OSPO_FAST_F32_LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define OSPO_FAST_F32_HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define OSPO_FAST_F32_LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define OSPO_FAST_F32_HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define OSPO_FAST_F32_LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define OSPO_FAST_F32_HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define OSPO_FAST_F64_LO1 0, 8, 2, 10, 4, 12, 6, 14
#define OSPO_FAST_F64_HI1 1, 9, 3, 11, 5, 13, 7, 15
#define OSPO_FAST_F64_LO2 0, 1, 8, 9, 4, 5, 12, 13
#define OSPO_FAST_F64_HI2 2, 3, 10, 11, 6, 7, 14, 15
#define OSPO_FAST_F64_LO4 0, 1, 2, 3, 8, 9, 10, 11
#define OSPO_FAST_F64_HI4 4, 5, 6, 7, 12, 13, 14, 15
#define OSPO_FAST_TRANSPOSE_STAGE(x, lanes, s, LO, HI)            \
  for (int r = 0; r < lanes; ++r) {                              \
    if (r & s) continue;                                         \
    const auto a = x[r], b = x[r | s];                           \
    x[r] = OSPO_FAST_SHUFFLE(a, b, LO);                          \
    x[r | s] = OSPO_FAST_SHUFFLE(a, b, HI);                      \
  }

template <typename lanes_t>
OSPO_FAST_INLINE void transpose_in_registers(lanes_t* x);

template <>
OSPO_FAST_INLINE void transpose_in_registers(f32x16* x) {
  OSPO_FAST_TRANSPOSE_STAGE(x, 16, 1, OSPO_FAST_F32_LO1, OSPO_FAST_F32_HI1)
  OSPO_FAST_TRANSPOSE_STAGE(x, 16, 2, OSPO_FAST_F32_LO2, OSPO_FAST_F32_HI2)
  OSPO_FAST_TRANSPOSE_STAGE(x, 16, 4, OSPO_FAST_F32_LO4, OSPO_FAST_F32_HI4)
  OSPO_FAST_TRANSPOSE_STAGE(x, 16, 8, OSPO_FAST_F32_LO8, OSPO_FAST_F32_HI8)
}

template <>
OSPO_FAST_INLINE void transpose_in_registers(double __attribute__((vector_size(64)))* x) {
  OSPO_FAST_TRANSPOSE_STAGE(x, 8, 1, OSPO_FAST_F64_LO1, OSPO_FAST_F64_HI1)
  OSPO_FAST_TRANSPOSE_STAGE(x, 8, 2, OSPO_FAST_F64_LO2, OSPO_FAST_F64_HI2)
  OSPO_FAST_TRANSPOSE_STAGE(x, 8, 4, OSPO_FAST_F64_LO4, OSPO_FAST_F64_HI4)
}

}  // namespace ospo_fast
