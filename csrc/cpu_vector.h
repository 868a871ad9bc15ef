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

}  // namespace ospo_fast
