// line_vector.h - std::vector on 64-byte boundaries, for the CPU kernels' buffers.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dimoo {

// Storage that starts on a 64-byte line. std::vector's blocks start 16
// bytes past one, so every 64-byte row of an AMX tile or AVX-512 load
// straddles two lines: flash attention ran 1.5x slower on such buffers.
// Blocks of 2 MiB and more (the weights, the activations) start on a 2 MiB
// boundary and ask Linux for transparent huge pages: one fault and one TLB
// entry per 2 MiB instead of per 4 KiB.
// DIMOO_CPU_HUGEPAGES=0: no huge-page advice (where the kernel's
// compaction for them stalls a busy host more than 4 KiB faults would).
inline bool huge_pages_wanted() {
    static const bool on = [] {
        const char *e = std::getenv("DIMOO_CPU_HUGEPAGES");
        return !(e && std::strcmp(e, "0") == 0);
    }();
    return on;
}

template <class T> struct LineAllocator {
    using value_type = T;
    static constexpr size_t kHuge = size_t(2) << 20;
    LineAllocator() = default;
    template <class U> LineAllocator(const LineAllocator<U> &) {}
    T *allocate(size_t n) {
        const size_t bytes = n * sizeof(T);
        if (bytes < kHuge) return static_cast<T *>(::operator new(bytes, std::align_val_t(64)));
        void *p = ::operator new(bytes, std::align_val_t(kHuge));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (huge_pages_wanted()) madvise(p, bytes, MADV_HUGEPAGE); // advice: where refused, 4 KiB pages
#endif
        return static_cast<T *>(p);
    }
    void deallocate(T *p, size_t n) {
        ::operator delete(p, std::align_val_t(n * sizeof(T) < kHuge ? 64 : kHuge));
    }
    template <class U> bool operator==(const LineAllocator<U> &) const { return true; }
    template <class U> bool operator!=(const LineAllocator<U> &) const { return false; }
};
template <class T> using LineVector = std::vector<T, LineAllocator<T>>;

// The same storage, but resize() leaves new elements of trivial types
// unwritten: for buffers whose filler writes every element anyway (the
// packed weights), so their pages are first touched by the parallel loop
// that fills them, not by a serial zero fill before it.
template <class T> struct RawLineAllocator : LineAllocator<T> {
    using value_type = T;
    RawLineAllocator() = default;
    template <class U> RawLineAllocator(const RawLineAllocator<U> &) {}
    template <class U> void construct(U *p) { ::new (static_cast<void *>(p)) U; }
    template <class U, class... A> void construct(U *p, A &&...a) {
        ::new (static_cast<void *>(p)) U(std::forward<A>(a)...);
    }
};
template <class T> using RawLineVector = std::vector<T, RawLineAllocator<T>>;

} // namespace dimoo
