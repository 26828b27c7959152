// host_memory.h - the host memory this process may still allocate (see
// host_memory.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace dimoo {

struct HostMemory {
    int64_t available = -1;     // bytes, -1 when unknown
    const char *source = "";    // what set it: "MemAvailable", "the memory cgroup's limit", ...
};

// Read now (each call reads /proc and the cgroup files again).
HostMemory host_memory();

// Linux overcommits: a buffer larger than the memory left "succeeds" and the
// OOM killer ends the process when it is touched. Throws OUT_OF_MEMORY
// ("<what> needs N MiB of host memory but M MiB are available (source)")
// when bytes and a 64 MiB reserve do not fit what is available now, so a
// model's tensors or a decoder's activations are checked one by one as
// memory fills.
void check_host_room(size_t bytes, const std::string &what);

// n floats, uninitialised; n * 4 bytes checked first when at least 16 MiB.
std::unique_ptr<float[]> host_floats(size_t n, const char *what);

} // namespace dimoo
