// host_memory.cpp - how much host memory this process may still take: the
// kernel's MemAvailable (free memory plus what it can reclaim without
// swapping), capped by the memory cgroup's limit less its non-reclaimable use
// (a container's limit is often far below the machine's memory). Linux
// overcommits, so an allocation past these numbers "succeeds" and the OOM
// killer ends the process later; the CPU backend refuses such sizes instead.
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "common.h"
#include "host_memory.h"

namespace dimoo {
namespace {

// The value of "key" in a "key value" file (/proc/meminfo, memory.stat), in
// the file's unit; -1 if absent.
int64_t stat_value(const std::string &path, const std::string &key) {
    std::ifstream f(path);
    std::string k;
    int64_t v = 0;
    while (f >> k >> v) {
        if (k == key) return v;
        f.ignore(1 << 10, '\n');
    }
    return -1;
}

// A file holding one number (or "max"); -1 if unreadable or unlimited.
int64_t read_number(const std::string &path) {
    std::ifstream f(path);
    std::string s;
    if (!(f >> s) || s == "max") return -1;
    char *end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    return end && *end == 0 && v >= 0 ? int64_t(v) : -1;
}

// Bytes the memory cgroup still allows (limit - usage + reclaimable file
// cache), or -1 without a limit. cgroup v2 first, then v1; the process's
// own cgroup (from /proc/self/cgroup) under the mount, else the mount's root
// (a cgroup namespace shows the process's cgroup there).
int64_t cgroup_room() {
    std::ifstream f("/proc/self/cgroup");
    std::string line, v2, v1;
    while (std::getline(f, line)) {
        const auto a = line.find(':'), b = line.find(':', a + 1);
        if (a == std::string::npos || b == std::string::npos) continue;
        const std::string ctl = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
        if (ctl.empty()) v2 = path;
        else if (ctl.find("memory") != std::string::npos) v1 = path;
    }
    const int64_t huge = int64_t(1) << 60; // v1 writes "no limit" as a number near 2^63
    for (const std::string &dir : {"/sys/fs/cgroup" + v2, std::string("/sys/fs/cgroup")}) {
        const int64_t lim = read_number(dir + "/memory.max");
        if (lim < 0) continue;
        const int64_t cur = read_number(dir + "/memory.current"), file = stat_value(dir + "/memory.stat", "file");
        if (cur < 0) continue;
        return std::max<int64_t>(0, lim - cur + std::max<int64_t>(file, 0));
    }
    for (const std::string &dir : {"/sys/fs/cgroup/memory" + v1, std::string("/sys/fs/cgroup/memory")}) {
        const int64_t lim = read_number(dir + "/memory.limit_in_bytes");
        if (lim < 0 || lim >= huge) continue;
        const int64_t cur = read_number(dir + "/memory.usage_in_bytes");
        const int64_t cache = stat_value(dir + "/memory.stat", "total_cache");
        if (cur < 0) continue;
        return std::max<int64_t>(0, lim - cur + std::max<int64_t>(cache, 0));
    }
    return -1;
}

} // namespace

HostMemory host_memory() {
    HostMemory m;
    // What to assume instead: for tests, and for virtual machines whose
    // memory grows as it is used (MemAvailable starts far below it).
    if (const char *e = std::getenv("DIMOO_HOST_AVAILABLE_MB"); e && *e) {
        m.available = int64_t(std::strtoll(e, nullptr, 10)) << 20;
        m.source = "DIMOO_HOST_AVAILABLE_MB";
        return m;
    }
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page > 0) m.available = int64_t(pages) * page, m.source = "physical memory";
    if (const int64_t kb = stat_value("/proc/meminfo", "MemAvailable:"); kb >= 0) {
        m.available = kb << 10;
        m.source = "MemAvailable";
    }
    if (const int64_t room = cgroup_room(); room >= 0 && (m.available < 0 || room < m.available)) {
        m.available = room;
        m.source = "the memory cgroup's limit";
    }
    return m;
}

void check_host_room(size_t bytes, const std::string &what) {
    const HostMemory m = host_memory();
    if (m.available < 0) return;
    constexpr int64_t kReserve = int64_t(64) << 20;
    const std::string hint = std::strcmp(m.source, "DIMOO_HOST_AVAILABLE_MB") == 0
                                 ? ""
                                 : "; DIMOO_HOST_AVAILABLE_MB=N overrides it where memory grows on demand";
    if (int64_t(bytes) + kReserve > m.available)
        fail(DIMOO_ERR_OUT_OF_MEMORY, what + " needs " + std::to_string(bytes >> 20) + " MiB of host memory but " +
                                          std::to_string(std::max<int64_t>(0, m.available) >> 20) +
                                          " MiB are available (" + m.source + hint + ")");
}

std::unique_ptr<float[]> host_floats(size_t n, const char *what) {
    if (n * sizeof(float) >= (size_t(16) << 20)) check_host_room(n * sizeof(float), what);
    return std::unique_ptr<float[]>(new float[n]);
}

} // namespace dimoo
