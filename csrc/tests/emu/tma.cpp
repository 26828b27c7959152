// tma.cpp - the emulated tensor maps (cuTensorMapEncodeTiled), mbarriers
// and TMA tile loads of sm_90 (see cuda.h, emu.h and cuda/ptx_sm90.cuh).
//
// An mbarrier is a record keyed by its shared address: expected arrivals,
// arrivals pending, the transaction bytes outstanding, the phase. A phase
// completes when every arrival has come and every byte announced with
// expect_tx has landed. When a TMA load lands depends on the schedule: with
// DIMOO_EMU_SCHEDULE=reverse at once (so a producer that overwrites a tile
// still being read shows), otherwise as late as it can, when some thread
// first polls its mbarrier (so a consumer that reads a tile before its
// mbarrier says so reads the 0xff poison of shared memory).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include "cuda.h"
#include "cuda_runtime.h"
#include "emu.h"

namespace {

// What a tensor map's opaque bytes hold here.
struct Map {
    uint32_t magic;
    uint8_t rank, elem, swizzle, pad;
    const unsigned char *addr;
    uint64_t dim[5];
    uint64_t stride[5]; // bytes; stride[0] is the element size
    uint16_t box[5];
};
static_assert(sizeof(Map) <= sizeof(CUtensorMap), "the emulated tensor map does not fit the opaque bytes");
constexpr uint32_t kMagic = 0x4d414d54u;

[[noreturn]] void fail(const char *what, uint32_t addr) {
    std::fprintf(stderr, "dimoo emu: %s (shared byte %u)\n", what, addr);
    std::abort();
}

struct Copy {
    uint32_t dst;
    Map map;
    int c[5];
};
struct Mbar {
    bool init = false;
    uint32_t expected = 0, pending = 0, phase = 0;
    int64_t tx = 0;
    std::vector<Copy> copies; // issued, not landed
};
struct Mbars {
    std::map<uint32_t, Mbar> m;
};

Mbar &get(uint32_t bar, const char *op) {
    auto &ms = emu::block_state<Mbars>().m;
    auto it = ms.find(bar);
    if (it == ms.end() || !it->second.init) {
        std::fprintf(stderr, "dimoo emu: %s on shared byte %u, which holds no initialized mbarrier\n", op, bar);
        std::abort();
    }
    return it->second;
}

void complete_if_done(Mbar &b, uint32_t bar) {
    if (b.pending != 0) return;
    if (b.tx < 0) fail("more TMA bytes landed on an mbarrier than its expect_tx announced", bar);
    if (b.tx > 0) return;
    b.phase++;
    b.pending = b.expected;
    emu::progress();
}

uint32_t box_bytes(const Map &m) {
    uint32_t n = m.elem;
    for (int d = 0; d < m.rank; d++) n *= m.box[d];
    return n;
}

// The box at coordinates c into shared memory at dst, elements outside the
// tensor as zeros, each byte's address swizzled as the map says (the
// swizzle is a function of the shared address bits, as wgmma reads it).
void land(const Copy &cp) {
    const Map &m = cp.map;
    unsigned char *smem = static_cast<unsigned char *>(emu::dyn_smem());
    const size_t smem_size = emu::dyn_smem_size();
    const uint32_t n = box_bytes(m);
    if (size_t(cp.dst) + n > smem_size) fail("a TMA load writes past the block's shared memory", cp.dst);
    uint32_t idx[5] = {0, 0, 0, 0, 0};
    const uint32_t rows = n / (m.box[0] * m.elem);
    for (uint32_t r = 0; r < rows; r++) {
        // idx[1..] from r; dim 0 is the run of one row.
        uint32_t q = r;
        bool row_in = true;
        size_t row_off = 0;
        for (int d = 1; d < m.rank; d++) {
            idx[d] = q % m.box[d];
            q /= m.box[d];
            const int64_t g = int64_t(cp.c[d]) + idx[d];
            if (g < 0 || uint64_t(g) >= m.dim[d]) row_in = false;
            else row_off += size_t(g) * m.stride[d];
        }
        for (uint32_t i = 0; i < m.box[0]; i++) {
            const int64_t g = int64_t(cp.c[0]) + i;
            const bool in = row_in && g >= 0 && uint64_t(g) < m.dim[0];
            const uint32_t a = cp.dst + (r * m.box[0] + i) * m.elem;
            for (uint32_t b = 0; b < m.elem; b++) {
                uint32_t p = a + b;
                if (m.swizzle == CU_TENSOR_MAP_SWIZZLE_128B) p ^= (p & 0x380u) >> 3;
                else if (m.swizzle == CU_TENSOR_MAP_SWIZZLE_64B) p ^= (p & 0x180u) >> 3;
                else if (m.swizzle == CU_TENSOR_MAP_SWIZZLE_32B) p ^= (p & 0x080u) >> 3;
                if (!in) {
                    smem[p] = 0;
                    continue;
                }
                const unsigned char *src = m.addr + row_off + size_t(g) * m.elem + b;
                if (b == 0 && !emu::is_device_range(src, m.elem)) fail("a TMA load reads outside device memory", cp.dst);
                smem[p] = *src;
            }
        }
    }
}

void land_all(Mbar &b, uint32_t bar) {
    std::vector<Copy> cs;
    cs.swap(b.copies);
    for (const Copy &c : cs) {
        land(c);
        b.tx -= box_bytes(c.map);
    }
    complete_if_done(b, bar);
}

} // namespace

CUresult cuTensorMapEncodeTiled(CUtensorMap *tensorMap, CUtensorMapDataType type, cuuint32_t rank, void *addr,
                                const cuuint64_t *dim, const cuuint64_t *strides, const cuuint32_t *box,
                                const cuuint32_t *estrides, CUtensorMapInterleave interleave,
                                CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill oob) {
    if (!tensorMap || !addr || rank < 1 || rank > 5) return CUDA_ERROR_INVALID_VALUE;
    Map m{};
    m.magic = kMagic;
    m.rank = uint8_t(rank);
    if (type == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16) m.elem = 2;
    else if (type == CU_TENSOR_MAP_DATA_TYPE_UINT8) m.elem = 1;
    else return CUDA_ERROR_INVALID_VALUE;
    // What the emulation models: no interleave, zero fill, unit element strides.
    if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
        return CUDA_ERROR_INVALID_VALUE;
    if (reinterpret_cast<uintptr_t>(addr) % 16) return CUDA_ERROR_INVALID_VALUE;
    m.addr = static_cast<const unsigned char *>(addr);
    m.stride[0] = m.elem;
    for (cuuint32_t d = 0; d < rank; d++) {
        if (dim[d] < 1 || dim[d] > (uint64_t(1) << 32)) return CUDA_ERROR_INVALID_VALUE;
        if (box[d] < 1 || box[d] > 256 || estrides[d] != 1) return CUDA_ERROR_INVALID_VALUE;
        m.dim[d] = dim[d];
        m.box[d] = uint16_t(box[d]);
        if (d > 0) {
            const uint64_t s = strides[d - 1];
            if (s % 16 || s >= (uint64_t(1) << 40) || s < m.dim[d - 1] * m.stride[d - 1]) return CUDA_ERROR_INVALID_VALUE;
            m.stride[d] = s;
        }
    }
    const uint32_t inner = box[0] * m.elem;
    if (inner % 16) return CUDA_ERROR_INVALID_VALUE;
    const uint32_t span[4] = {~0u, 32, 64, 128};
    if (int(swizzle) < 0 || int(swizzle) > 3 || inner > span[swizzle]) return CUDA_ERROR_INVALID_VALUE;
    m.swizzle = uint8_t(swizzle);
    std::memset(tensorMap, 0, sizeof *tensorMap);
    std::memcpy(tensorMap, &m, sizeof m);
    return CUDA_SUCCESS;
}

cudaError_t cudaGetDriverEntryPointByVersion(const char *symbol, void **fn, unsigned int, unsigned long long,
                                             cudaDriverEntryPointQueryResult *status) {
    if (!symbol || !fn) return cudaErrorInvalidValue;
    const bool found = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
    *fn = found ? reinterpret_cast<void *>(&cuTensorMapEncodeTiled) : nullptr;
    if (status) *status = found ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
    return cudaSuccess;
}

namespace emu {

void mbar_init(uint32_t bar, uint32_t count) {
    if (bar % 8 || size_t(bar) + 8 > dyn_smem_size()) fail("mbarrier.init at an address that is not 8-byte aligned shared memory", bar);
    if (count < 1) fail("mbarrier.init with an arrival count of 0", bar);
    Mbar &b = block_state<Mbars>().m[bar];
    if (!b.copies.empty()) fail("mbarrier.init of an mbarrier with TMA loads in flight", bar);
    b = Mbar{};
    b.init = true;
    b.expected = b.pending = count;
}

void mbar_arrive(uint32_t bar, uint32_t tx_bytes) {
    Mbar &b = get(bar, tx_bytes ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive");
    b.tx += tx_bytes;
    b.pending--;
    progress();
    complete_if_done(b, bar);
}

bool mbar_try_wait(uint32_t bar, uint32_t parity) {
    Mbar &b = get(bar, "mbarrier.try_wait");
    if (!b.copies.empty()) land_all(b, bar);
    return (b.phase & 1u) != (parity & 1u);
}

void tma_load(uint32_t dst, const void *tensor_map, uint32_t bar, const int *coords, int rank) {
    Copy c{};
    std::memcpy(&c.map, tensor_map, sizeof c.map);
    if (c.map.magic != kMagic) fail("a TMA load through something that is not an encoded tensor map", dst);
    if (c.map.rank != rank) fail("a TMA load whose rank differs from its tensor map's", dst);
    if (dst % 128) fail("a TMA load to shared memory that is not 128-byte aligned", dst);
    c.dst = dst;
    for (int d = 0; d < rank; d++) c.c[d] = coords[d];
    Mbar &b = get(bar, "cp.async.bulk.tensor");
    if (schedule() == Schedule::Reverse) {
        land(c);
        b.tx -= box_bytes(c.map);
        complete_if_done(b, bar);
    } else {
        b.copies.push_back(c);
    }
}

namespace {
// Per 16-byte chunk of shared memory (cp.async writes whole chunks): 1 +
// the thread that wrote it through the generic proxy and has not fenced
// since (0: visible to the async proxy).
struct Unfenced {
    std::vector<uint32_t> writer;
    std::vector<std::vector<uint32_t>> by_thread; // chunks each thread wrote, until its fence
};
Unfenced &unfenced() {
    Unfenced &u = block_state<Unfenced>();
    if (u.writer.size() != (dyn_smem_size() + 15) / 16) u.writer.assign((dyn_smem_size() + 15) / 16, 0);
    return u;
}
} // namespace

void generic_smem_write(const void *p, size_t n) {
    const auto *base = static_cast<const unsigned char *>(dyn_smem());
    const auto *c = static_cast<const unsigned char *>(p);
    if (c < base || c + n > base + dyn_smem_size()) return; // static shared memory: no wgmma reads it
    Unfenced &u = unfenced();
    const uint32_t t = thread_linear();
    if (u.by_thread.size() <= t) u.by_thread.resize(t + 1);
    for (size_t off = size_t(c - base) / 16; off <= (size_t(c - base) + n - 1) / 16; off++) {
        u.writer[off] = t + 1;
        u.by_thread[t].push_back(uint32_t(off));
    }
}

void proxy_fence() {
    Unfenced &u = unfenced();
    const uint32_t t = thread_linear();
    if (u.by_thread.size() <= t) return;
    for (uint32_t off : u.by_thread[t])
        if (u.writer[off] == t + 1) u.writer[off] = 0;
    u.by_thread[t].clear();
}

void check_async_read(uint32_t offset) {
    Unfenced &u = unfenced();
    if (offset / 16 < u.writer.size() && u.writer[offset / 16]) {
        std::fprintf(stderr,
                     "dimoo emu: a wgmma reads shared byte %u, which thread %u wrote through the generic proxy "
                     "(cp.async) with no fence.proxy.async after it\n",
                     offset, u.writer[offset / 16] - 1);
        std::abort();
    }
}

} // namespace emu
