// line_vector.h - std::vector on 64-byte boundaries, for the CPU kernels' buffers.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace dimoo {

// Storage that starts on a 64-byte line. std::vector's blocks start 16
// bytes past one, so every 64-byte row of an AMX tile or AVX-512 load
// straddles two lines: flash attention ran 1.5x slower on such buffers.
template <class T> struct LineAllocator {
    using value_type = T;
    LineAllocator() = default;
    template <class U> LineAllocator(const LineAllocator<U> &) {}
    T *allocate(size_t n) { return static_cast<T *>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T *p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U> bool operator==(const LineAllocator<U> &) const { return true; }
    template <class U> bool operator!=(const LineAllocator<U> &) const { return false; }
};
template <class T> using LineVector = std::vector<T, LineAllocator<T>>;

} // namespace dimoo
