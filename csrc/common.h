// common.h - internal helpers shared by the runtime and the backends:
// the exception that carries a dimoo_status to the C boundary, and the
// half-precision conversions.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dimoo.h"

namespace dimoo {

// Thrown anywhere inside the library; api.cpp turns it into a status plus a
// message on the handle. Nothing else may escape an extern "C" function.
class Error : public std::runtime_error {
public:
    Error(dimoo_status s, const std::string &msg) : std::runtime_error(msg), status_(s) {}
    dimoo_status status() const { return status_; }

private:
    dimoo_status status_;
};

[[noreturn]] inline void fail(dimoo_status s, const std::string &msg) { throw Error(s, msg); }

#define DIMOO_CHECK_ARG(cond, msg)                                                                 \
    do {                                                                                           \
        if (!(cond)) ::dimoo::fail(DIMOO_ERR_INVALID_ARGUMENT, (msg));                             \
    } while (0)

inline size_t dtype_size(int32_t dt) {
    switch (dt) {
    case DIMOO_F32: return 4;
    case DIMOO_F16:
    case DIMOO_BF16: return 2;
    }
    return 0;
}

inline const char *dtype_name(int32_t dt) {
    switch (dt) {
    case DIMOO_F32: return "F32";
    case DIMOO_F16: return "F16";
    case DIMOO_BF16: return "BF16";
    }
    return "unknown";
}

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, NaN kept quiet.
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { // subnormal: normalise
            exp = 127 - 15 + 1;
            while ((man & 0x400u) == 0) {
                man <<= 1;
                exp--;
            }
            man &= 0x3ffu;
            u = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = int32_t((u >> 23) & 0xffu) - 127 + 15;
    uint32_t man = u & 0x7fffffu;
    if (((u >> 23) & 0xffu) == 0xffu) return uint16_t(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 31) return uint16_t(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return uint16_t(sign);
        man |= 0x800000u;
        uint32_t shift = uint32_t(14 - exp);
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return uint16_t(sign | half);
    }
    uint32_t half = sign | (uint32_t(exp) << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++;
    return uint16_t(half);
}

// Element i of a buffer of dtype dt, as float.
inline float load_as_f32(const void *p, int32_t dt, size_t i) {
    switch (dt) {
    case DIMOO_F32: return static_cast<const float *>(p)[i];
    case DIMOO_F16: return f16_to_f32(static_cast<const uint16_t *>(p)[i]);
    default: return bf16_to_f32(static_cast<const uint16_t *>(p)[i]);
    }
}

} // namespace dimoo
