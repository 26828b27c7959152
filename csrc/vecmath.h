// Branch-free float math that loops vectorise (libm calls do not). GCC
// needs -fno-trapping-math for that (CMakeLists.txt sets it).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace dimoo {

// exp(x) for x in [-87, 88] to about 2 ulp, written so that loops over it
// vectorize: 2^n by exponent bits times a degree-7 Taylor polynomial of
// exp(r), |r| <= ln2/2. Inputs outside the range are clamped.
inline float exp_clamped(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
    const float r = (x - n * 0.693145751953125f) - n * 1.428606820309417232e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
    float s;
    std::memcpy(&s, &bits, 4);
    return p * s;
}

// silu(g) = g sigmoid(g), with the exp above (libm's expf would keep the
// MLP's gate loop scalar).
inline float silu(float g) { return g / (1.0f + exp_clamped(-g)); }

// The sum of x[i]^2 in double, for RMSNorm, in vector lanes (a plain loop is
// one serial chain of double adds: the compiler may not reorder them).
inline double sum_squares(const float *x, int n) {
    double ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += double(x[i]) * x[i];
    return ss;
}

}  // namespace dimoo
