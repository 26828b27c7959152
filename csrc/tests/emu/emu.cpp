// emu.cpp - the fiber scheduler behind emu.h: every CUDA thread of a block
// is a fiber; fibers switch only at barriers, so one block runs on one host
// thread with no locks. Blocks run in order; kernels from several host
// threads are serialized by one mutex.
#include "emu.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(DIMOO_EMU_UCONTEXT)
#include <ucontext.h>
#endif

// Under AddressSanitizer every switch is announced, so that it tracks which
// stack is live (fiber API of sanitizer/common_interface_defs.h).
#if defined(__SANITIZE_ADDRESS__)
#define DIMOO_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DIMOO_EMU_ASAN 1
#endif
#endif
#ifdef DIMOO_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {

uint3 g_thread{0, 0, 0}, g_block{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

namespace {

// ---- context switching ---------------------------------------------------------

#if defined(__x86_64__) && !defined(DIMOO_EMU_UCONTEXT)
// Saves the callee-saved registers on the current stack, stores its pointer
// in *save, loads `load` and pops the other context's registers. A new
// context starts in ctx_entry with r12 = argument, r13 = function.
extern "C" void dimoo_emu_switch(void **save, void *load);
asm(R"(
    .text
    .p2align 4
    .globl dimoo_emu_switch
    .type dimoo_emu_switch,@function
dimoo_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size dimoo_emu_switch,.-dimoo_emu_switch
    .p2align 4
    .globl dimoo_emu_entry
    .type dimoo_emu_entry,@function
dimoo_emu_entry:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size dimoo_emu_entry,.-dimoo_emu_entry
    .section .note.GNU-stack,"",@progbits
    .text
)");
extern "C" void dimoo_emu_entry();

struct Context {
    void *sp = nullptr;
    const void *bottom = nullptr; // the stack, for AddressSanitizer
    size_t size = 0;
    void *fake = nullptr;
};
void ctx_make(Context &c, char *stack, size_t size, void (*fn)(void *), void *arg) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
    auto *s = reinterpret_cast<uint64_t *>(top);
    // Popped in order r15 r14 r13 r12 rbx rbp, then ret into dimoo_emu_entry
    // with the stack 16-byte aligned for its call.
    s[-1] = reinterpret_cast<uint64_t>(&dimoo_emu_entry);
    s[-2] = 0;                                  // rbp
    s[-3] = 0;                                  // rbx
    s[-4] = reinterpret_cast<uint64_t>(arg);    // r12
    s[-5] = reinterpret_cast<uint64_t>(fn);     // r13
    s[-6] = 0;                                  // r14
    s[-7] = 0;                                  // r15
    c.sp = s - 7;
    c.bottom = stack;
    c.size = size;
}
void raw_switch(Context &from, Context &to) { dimoo_emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
    const void *bottom = nullptr;
    size_t size = 0;
    void *fake = nullptr;
};
// makecontext passes int arguments only: the entry finds its function and
// argument here instead (one block starts its fibers at a time).
void (*g_uc_fn)(void *) = nullptr;
void *g_uc_arg = nullptr;
void uc_entry() { g_uc_fn(g_uc_arg); }
void ctx_make(Context &c, char *stack, size_t size, void (*fn)(void *), void *arg) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    g_uc_fn = fn, g_uc_arg = arg;
    makecontext(&c.uc, uc_entry, 0);
    c.bottom = stack;
    c.size = size;
}
void raw_switch(Context &from, Context &to) { swapcontext(&from.uc, &to.uc); }
#endif

// `exiting`: `from` never runs again.
void ctx_switch(Context &from, Context &to, bool exiting = false) {
#ifdef DIMOO_EMU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &from.fake, to.bottom, to.size);
#else
    (void)exiting;
#endif
    raw_switch(from, to);
#ifdef DIMOO_EMU_ASAN
    __sanitizer_finish_switch_fiber(from.fake, nullptr, nullptr);
#endif
}

// ---- fibers and blocks ----------------------------------------------------------

constexpr size_t kStack = size_t(256) << 10; // per CUDA thread; a guard page below
constexpr size_t kSlot = 64;                  // warp exchange bytes per lane

enum class State { Ready, Done };

struct Fiber {
    Context ctx;
    char *stack = nullptr; // the usable part (above the guard page)
    unsigned tid = 0;
    uint3 idx{0, 0, 0};
    State state = State::Ready;
};

using Order = Schedule;
Order &order_setting() {
    static Order o = [] {
        const char *e = std::getenv("DIMOO_EMU_SCHEDULE");
        if (e && std::string(e) == "reverse") return Order::Reverse;
        if (e && std::string(e) == "random") return Order::Random;
        return Order::Forward;
    }();
    return o;
}

struct Block {
    unsigned n = 0;             // threads
    std::vector<Fiber> *fibers = nullptr;
    Context sched;
    const std::function<void()> *body = nullptr;
    unsigned cur = 0;
    unsigned live = 0;          // threads not done
    unsigned bar_count = 0, bar_gen = 0;
    // Barriers of aligned thread groups: warps (32) and warpgroups (128).
    struct Groups {
        unsigned size;
        std::vector<unsigned> count, gen, live;
        void reset(unsigned n) {
            const unsigned g = (n + size - 1) / size;
            count.assign(g, 0);
            gen.assign(g, 0);
            live.assign(g, 0);
            for (unsigned t = 0; t < n; t++) live[t / size]++;
        }
        void exit(unsigned tid) { // an exited thread no longer holds its group back
            const unsigned w = tid / size;
            live[w]--;
            if (count[w] && count[w] == live[w]) count[w] = 0, gen[w]++;
        }
    };
    Groups warps{32, {}, {}, {}}, warpgroups{128, {}, {}, {}};
    unsigned named_count[16] = {}, named_gen[16] = {}, named_n[16] = {};
    unsigned idle = 0;          // turns passed on by waiting threads since someone arrived or finished
    Order order = Order::Forward;
    std::mt19937 rng{12345};
    std::vector<unsigned char> slots;
};

Block *g_run = nullptr;
std::unique_ptr<unsigned char[]> g_dyn; // dynamic shared memory, exactly the launch's size
size_t g_dyn_size = 0;
std::mutex g_kernel_mutex;

// Stacks, reused across launches.
std::vector<Fiber> &fiber_pool(unsigned n) {
    static std::vector<Fiber> pool;
    static std::vector<char *> maps;
    while (pool.size() < n) {
        const size_t page = 4096;
        void *m = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "dimoo emu: cannot map a fiber stack\n");
            std::abort();
        }
        mprotect(m, page, PROT_NONE); // overflow faults instead of corrupting a neighbour
        maps.push_back(static_cast<char *>(m));
        Fiber f;
        f.stack = static_cast<char *>(m) + page;
        pool.push_back(f);
    }
    return pool;
}

// The next live thread after the current one, in the chosen order.
unsigned next_live(Block &b) {
    std::vector<Fiber> &fs = *b.fibers;
    if (b.order == Order::Random) {
        for (;;) {
            const unsigned t = unsigned(b.rng() % b.n);
            if (fs[t].state != State::Done) return t;
        }
    }
    unsigned t = b.cur;
    for (unsigned k = 0; k < b.n; k++) {
        t = b.order == Order::Reverse ? (t + b.n - 1) % b.n : (t + 1) % b.n;
        if (fs[t].state != State::Done) return t;
    }
    return b.cur;
}

[[noreturn]] void deadlock(const Block &b);

// Hands the host thread to the next live CUDA thread, fiber to fiber.
void switch_to_next(Block &b, Context &from, bool exiting = false) {
    const unsigned t = next_live(b);
    if (t == b.cur) return; // its own turn again (random order, or the last one live)
    b.cur = t;
    Fiber &f = (*b.fibers)[t];
    g_thread = f.idx;
    ctx_switch(from, f.ctx, exiting);
}

// A waiting thread resumed with its barrier still closed: pass the turn on.
// Every live thread passing without anyone arriving anywhere is a deadlock.
void yield() {
    Block &b = *g_run;
    if (++b.idle > (b.order == Order::Random ? 64 * b.live : b.live + 1)) deadlock(b);
    switch_to_next(b, (*b.fibers)[b.cur].ctx);
}

void fiber_main(void *arg) {
    Block &b = *static_cast<Block *>(arg);
#ifdef DIMOO_EMU_ASAN
    // The first thread of a block starts from the scheduler: learn its stack.
    const void *old_bottom = nullptr;
    size_t old_size = 0;
    __sanitizer_finish_switch_fiber(nullptr, &old_bottom, &old_size);
    if (!b.sched.bottom) b.sched.bottom = old_bottom, b.sched.size = old_size;
#endif
    (*b.body)();
    Fiber &f = (*b.fibers)[b.cur];
    f.state = State::Done;
    b.live--;
    b.idle = 0;
    // Exited threads no longer hold a barrier back.
    if (b.bar_count && b.bar_count == b.live) b.bar_count = 0, b.bar_gen++;
    b.warps.exit(f.tid);
    b.warpgroups.exit(f.tid);
    if (b.live == 0) ctx_switch(f.ctx, b.sched, true);
    else switch_to_next(b, f.ctx, true);
    std::abort(); // never resumed
}

[[noreturn]] void deadlock(const Block &b) {
    std::fprintf(stderr,
                 "dimoo emu: deadlock in block (%u,%u,%u) of a %u-thread kernel launch: threads wait at barriers "
                 "that other threads never reach; threads not done:",
                 g_block.x, g_block.y, g_block.z, b.n);
    for (unsigned t = 0; t < b.n; t++)
        if ((*b.fibers)[t].state != State::Done) std::fprintf(stderr, " %u", t);
    std::fprintf(stderr, "\n");
    std::abort();
}

void run_block(Block &b) {
    std::vector<Fiber> &fs = *b.fibers;
    for (unsigned t = 0; t < b.n; t++) {
        fs[t].tid = t;
        fs[t].state = State::Ready;
        fs[t].idx = uint3{t % g_block_dim.x, (t / g_block_dim.x) % g_block_dim.y, t / (g_block_dim.x * g_block_dim.y)};
        ctx_make(fs[t].ctx, fs[t].stack, kStack, fiber_main, &b);
    }
    b.live = b.n;
    b.bar_count = 0;
    b.bar_gen = 0;
    b.idle = 0;
    b.warps.reset(b.n);
    b.warpgroups.reset(b.n);
    for (int i = 0; i < 16; i++) b.named_count[i] = b.named_gen[i] = b.named_n[i] = 0;
    b.slots.assign(size_t(b.n) * kSlot, 0xff);
    // Threads hand the host thread to each other; the last one to finish comes back here.
    b.cur = b.order == Order::Reverse ? b.n - 1 : 0;
    g_thread = fs[b.cur].idx;
    ctx_switch(b.sched, fs[b.cur].ctx);
}

} // namespace

// ---- kernel-side entry points ----------------------------------------------------

void block_sync() {
    Block &b = *g_run;
    const unsigned gen = b.bar_gen;
    b.idle = 0;
    if (++b.bar_count == b.live) {
        b.bar_count = 0;
        b.bar_gen++;
        return;
    }
    while (b.bar_gen == gen) yield();
}

namespace {
void group_sync(Block::Groups &g) {
    Block &b = *g_run;
    const unsigned w = b.cur / g.size, gen = g.gen[w];
    b.idle = 0;
    if (++g.count[w] == g.live[w]) {
        g.count[w] = 0;
        g.gen[w]++;
        return;
    }
    while (g.gen[w] == gen) yield();
}
} // namespace

void warp_sync() { group_sync(g_run->warps); }
void spin_wait() { yield(); }

namespace {
// One arrival at named barrier id; true when it opened the barrier.
bool named_arrive(Block &b, unsigned id, unsigned n) {
    if (id == 0 || id > 15 || n == 0 || n % 32 || n > b.n) {
        std::fprintf(stderr, "dimoo emu: named barrier %u with %u threads (ids 1-15, a multiple of 32 threads)\n", id, n);
        std::abort();
    }
    if (b.named_count[id] && b.named_n[id] != n) {
        std::fprintf(stderr, "dimoo emu: named barrier %u used with %u and %u threads at once\n", id, b.named_n[id], n);
        std::abort();
    }
    b.named_n[id] = n;
    b.idle = 0;
    if (++b.named_count[id] < n) return false;
    b.named_count[id] = 0;
    b.named_gen[id]++;
    return true;
}
} // namespace

void named_barrier_sync(unsigned id, unsigned n) {
    Block &b = *g_run;
    const unsigned gen = id < 16 ? b.named_gen[id] : 0;
    if (named_arrive(b, id, n)) return;
    while (b.named_gen[id] == gen) yield();
}
void named_barrier_arrive(unsigned id, unsigned n) { named_arrive(*g_run, id, n); }
void progress() { g_run->idle = 0; }
void warpgroup_sync() { group_sync(g_run->warpgroups); }

unsigned lane_id() { return g_run->cur & 31; }
unsigned thread_linear() { return g_run->cur; }
namespace {
unsigned long g_epoch = 0;
}
unsigned long block_epoch() { return g_epoch; }
void *lane_slot() { return g_run->slots.data() + size_t(g_run->cur) * kSlot; }
void *lane_slot_of(unsigned lane) { return g_run->slots.data() + size_t((g_run->cur & ~31u) | lane) * kSlot; }
void *dyn_smem() { return g_dyn.get(); }
size_t dyn_smem_size() { return g_dyn_size; }

void set_schedule(Schedule s) {
    std::lock_guard<std::mutex> lock(g_kernel_mutex);
    order_setting() = s;
}
Schedule schedule() { return order_setting(); }

void run_grid(const void *, dim3 grid, dim3 block, size_t smem, const std::function<void()> &body) {
    std::lock_guard<std::mutex> lock(g_kernel_mutex);
    const unsigned n = block.x * block.y * block.z;
    const Order order = order_setting();
    Block b;
    b.n = n;
    b.fibers = &fiber_pool(n);
    b.body = &body;
    b.order = order;
    Block *saved = g_run;
    g_run = &b;
    g_block_dim = block;
    g_grid_dim = grid;
    g_dyn.reset(new unsigned char[smem ? smem : 1]);
    g_dyn_size = smem;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                g_block = uint3{x, y, z};
                std::memset(g_dyn.get(), 0xff, g_dyn_size); // shared memory starts as garbage
                g_epoch++;
                run_block(b);
            }
    g_run = saved;
}

} // namespace emu
