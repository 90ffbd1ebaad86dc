// The emulated device's runtime: device memory, launches, the execution model and the checker.
//
// Memory. Device memory is host memory carved from one reserved address range (the arena), each
// allocation followed by a 64 KiB gap that is never handed out, addresses never reused: an access past an
// allocation's end, before its start, or into a freed one lands in the arena outside every live
// allocation, and the checker names it.
//
// Launches. The blocks of a grid run one after another (in order, reversed or shuffled); a block's
// threads are fibers, each with its own stack, scheduled cooperatively on one OS thread: a thread runs
// until it waits (at `__syncthreads`, a warp collective) or returns. `__syncthreads` releases when every
// live thread of the block has arrived (threads that returned leave it, as on sm_70+); a warp collective
// completes when every lane its mask names has arrived or returned. When no thread can run and some have
// not returned, the launch fails with every thread's wait site (a deadlock on the device). One launch runs
// at a time in the process (the `__shared__` variables are one object each).
//
// The checker (kernels.cpp built by clang with -fsanitize=thread: every load and store of the kernels
// calls the __tsan_* hooks below; no TSan runtime is linked, these hooks are the whole runtime). Each
// 2-byte unit of the arena and of the shared-memory section has a shadow cell: its last write and last
// read (launch, barrier interval, thread, warp-collective count) and whether it holds a value. Reported,
// with the kernel, block, thread and address:
//   - out of bounds: an arena address outside every live allocation (and shared or global accesses of a
//     freed allocation);
//   - uninitialised: a read of device memory never written (allocations made without zeroing), or of
//     shared memory not written by this block;
//   - races: two threads of one block touching one unit in one barrier interval (and, for two lanes of one
//     warp, with no warp collective between), at least one writing; or two blocks of one launch touching
//     one unit of global memory, at least one writing.
// What it does not model: the device's memory ordering (a race that works serially may pass), timing.

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace bcemu {
struct Fiber {
    dim3 thread_idx;  // first: the header's view of a Fiber
    int tid = 0;      // linear thread index in the block
    int state = 0;
    const char* wait_file = nullptr;
    int wait_line = 0;
    int wait_op = 0;
    unsigned wait_mask = 0;
    uint64_t value = 0, result = 0;
    int arg = 0, width = 32;
    char* stack = nullptr;
    void* sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
};
struct Block {
    dim3 block_idx, block_dim, grid_dim;
};
struct Gather {
    const void* mine;
    void* all;
    unsigned bytes;
};
Fiber* current = nullptr;
Block block;
}  // namespace bcemu

using bcemu::Fiber;

namespace {

enum State { RUNNABLE = 0, AT_BARRIER = 1, AT_WARP = 2, DONE = 3 };
const char* const OP_NAMES[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__all_sync", "__any_sync", "__syncwarp",
                                "a warp-wide fragment exchange (mma.sync, ldmatrix)"};

// ---- reports ----------------------------------------------------------------------------------------------
std::mutex g_lock;  // every API call; one launch at a time
std::vector<std::string> g_reports;
size_t g_report_count = 0;
bool g_abort = false;
const char* g_kernel = "";

void report(const char* fmt, ...) {
    g_report_count++;
    if (g_reports.size() >= 12) return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    std::string s = std::string("kernel ") + g_kernel;
    if (bcemu::current) {
        const auto &b = bcemu::block.block_idx, &t = bcemu::current->thread_idx;
        char w[96];
        snprintf(w, sizeof w, ", block (%u,%u,%u), thread (%u,%u,%u)", b.x, b.y, b.z, t.x, t.y, t.z);
        s += w;
    }
    g_reports.push_back(s + ": " + buf);
}

void set_err(char* err, size_t cap, const std::string& msg) {
    if (err && cap) {
        snprintf(err, cap, "%s", msg.c_str());
    }
}

// ---- fibers -----------------------------------------------------------------------------------------------
constexpr size_t STACK = 256 << 10;
constexpr int MAX_THREADS = 1024;
Fiber g_fibers[MAX_THREADS];
void* g_sched_sp = nullptr;
void (*g_invoke)(void*, void**) = nullptr;
void* g_fn = nullptr;
void** g_args = nullptr;

[[noreturn]] void fiber_main();

#if defined(__x86_64__)
extern "C" void bcemu_switch(void** save_sp, void* to_sp);
extern "C" void bcemu_fiber_start();
asm(R"(
.text
.globl bcemu_switch
.type bcemu_switch,@function
bcemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size bcemu_switch, .-bcemu_switch
.globl bcemu_fiber_start
.type bcemu_fiber_start,@function
bcemu_fiber_start:
    andq $-16, %rsp
    call *%r12
    ud2
.size bcemu_fiber_start, .-bcemu_fiber_start
)");

void fiber_init(Fiber& f) {
    uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + STACK);
    top -= 2;
    *--top = reinterpret_cast<uint64_t>(&bcemu_fiber_start);  // ret target
    *--top = 0;                                                // rbp
    *--top = 0;                                                // rbx
    *--top = reinterpret_cast<uint64_t>(&fiber_main);          // r12
    *--top = 0;                                                // r13
    *--top = 0;                                                // r14
    *--top = 0;                                                // r15
    *--top = 0x1F80ull | (0x037Full << 32);                    // mxcsr, x87 control word
    f.sp = top;
}
void to_fiber(Fiber& f) { bcemu_switch(&g_sched_sp, f.sp); }
void to_scheduler() { bcemu_switch(&bcemu::current->sp, g_sched_sp); }
#else
ucontext_t g_sched_uc;
void fiber_entry() { fiber_main(); }
void fiber_init(Fiber& f) {
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = STACK;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_entry, 0);
}
void to_fiber(Fiber& f) { swapcontext(&g_sched_uc, &f.uc); }
void to_scheduler() { swapcontext(&bcemu::current->uc, &g_sched_uc); }
#endif

// ---- memory -----------------------------------------------------------------------------------------------
struct Alloc {
    uint64_t base, size;
    bool live, all_init;
};
constexpr uint64_t ARENA_BYTES = 1ull << 38;  // reserved, committed on touch
constexpr uint64_t GAP = 64 << 10;
char* g_arena = nullptr;
uint64_t g_next = 0;
std::vector<Alloc> g_allocs;  // in address order (addresses only grow)

struct Rec {
    uint32_t launch, interval;
    uint16_t tid, wsync;
};
struct Cell {
    Rec w, r;
    uint8_t init, rmulti;
};
Cell* g_shadow = nullptr;  // a cell per 2 bytes of the arena
bool g_check = false;

#if BCEMU_CHECKED
extern "C" char __start_bcemu_shared[], __stop_bcemu_shared[];
#endif
uintptr_t g_shared_lo = 0, g_shared_hi = 0;
Cell* g_shared_shadow = nullptr;

bool arena_init() {
    if (g_arena) return true;
    void* p = mmap(nullptr, ARENA_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    g_arena = static_cast<char*>(p);
    g_next = GAP;
#if BCEMU_CHECKED
    void* s = mmap(nullptr, ARENA_BYTES / 2 * sizeof(Cell), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) return false;
    g_shadow = static_cast<Cell*>(s);
    g_shared_lo = reinterpret_cast<uintptr_t>(__start_bcemu_shared);
    g_shared_hi = reinterpret_cast<uintptr_t>(__stop_bcemu_shared);
    g_shared_shadow = static_cast<Cell*>(calloc((g_shared_hi - g_shared_lo) / 2 + 8, sizeof(Cell)));
#endif
    for (auto& f : g_fibers) {
        void* st = mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (st == MAP_FAILED) return false;
        f.stack = static_cast<char*>(st);
    }
    return true;
}

uint64_t dev_addr(const char* p) { return reinterpret_cast<uint64_t>(p); }
bool in_arena(uintptr_t a) { return a >= (uintptr_t)g_arena && a < (uintptr_t)g_arena + ARENA_BYTES; }

// The allocation starting at or before a (live or freed), or null.
const Alloc* alloc_at_or_before(uintptr_t a) {
    auto it = std::upper_bound(g_allocs.begin(), g_allocs.end(), (uint64_t)a,
                               [](uint64_t x, const Alloc& al) { return x < al.base; });
    return it == g_allocs.begin() ? nullptr : &*(it - 1);
}

// The allocation holding a, or null.
const Alloc* find_alloc(uintptr_t a) {
    static size_t last = 0;  // the last one found: accesses come in runs
    if (last < g_allocs.size() && a >= g_allocs[last].base && a < g_allocs[last].base + g_allocs[last].size)
        return &g_allocs[last];
    const Alloc* al = alloc_at_or_before(a);
    if (!al || a >= al->base + al->size) return nullptr;
    last = (size_t)(al - g_allocs.data());
    return al;
}

int alloc_index(const Alloc* al) { return al ? (int)(al - g_allocs.data()) : -1; }

void describe_global(char* out, size_t cap, uintptr_t a) {
    if (const Alloc* al = alloc_at_or_before(a)) {
        snprintf(out, cap, "device address 0x%lx (allocation #%d of %lu bytes%s, byte offset %ld)", (unsigned long)a,
                 alloc_index(al), (unsigned long)al->size, al->live ? "" : ", freed", (long)(a - al->base));
    } else {
        snprintf(out, cap, "device address 0x%lx (before every allocation)", (unsigned long)a);
    }
}

void mark_init(uint64_t a, uint64_t n) {
    if (!g_shadow || n == 0) return;
    for (uint64_t u = (a - dev_addr(g_arena)) / 2, e = (a + n - dev_addr(g_arena) + 1) / 2; u < e; u++) {
        g_shadow[u].init = 1;
    }
}

// ---- the block being run ----------------------------------------------------------------------------------
int g_nthreads = 0, g_live = 0, g_arrived = 0;
uint32_t g_launch = 0;        // launch counter (global memory records)
uint32_t g_block_run = 0;     // block counter (shared memory records)
uint32_t g_interval = 0;      // barrier intervals, unique over the process
uint32_t g_block_first = 0;   // the first interval of the running block
unsigned g_exited[32];        // per warp: lanes that returned (or do not exist)
uint16_t g_wsync[32];         // per warp: completed collectives

void new_interval() { g_interval++; }

void complete_barrier() {
    for (int i = 0; i < g_nthreads; i++)
        if (g_fibers[i].state == AT_BARRIER) g_fibers[i].state = RUNNABLE;
    g_arrived = 0;
    new_interval();
}

struct WarpOp {
    int op;
    unsigned mask, arrived;
    const char* file;
    int line;
};
std::vector<WarpOp> g_pending[32];

void complete_warp_op(int warp, size_t k) {
    WarpOp w = g_pending[warp][k];
    g_pending[warp].erase(g_pending[warp].begin() + (long)k);
    Fiber* lanes = &g_fibers[warp * 32];
    const unsigned took = w.arrived;
    uint64_t ballot = 0;
    bool all = true, any = false;
    for (int l = 0; l < 32; l++)
        if (took >> l & 1) {
            const bool p = lanes[l].value != 0;
            ballot |= (uint64_t)p << l;
            all = all && p;
            any = any || p;
        }
    if (w.op == 8) {
        if (took != 0xffffffffu) {
            report("%s at %s:%d: lanes 0x%08x took part; it needs all 32", OP_NAMES[8], w.file, w.line, took);
        }
        for (int l = 0; l < 32; l++) {
            if (!(took >> l & 1)) continue;
            const auto* gl = reinterpret_cast<const bcemu::Gather*>(lanes[l].value);
            for (int s = 0; s < 32; s++) {
                char* dst = static_cast<char*>(gl->all) + (size_t)s * gl->bytes;
                if (took >> s & 1)
                    memcpy(dst, reinterpret_cast<const bcemu::Gather*>(lanes[s].value)->mine, gl->bytes);
                else
                    memset(dst, 0xff, gl->bytes);
            }
        }
    }
    for (int l = 0; l < 32; l++) {
        if (!(took >> l & 1)) continue;
        Fiber& f = lanes[l];
        int src = l;
        const int width = f.width, seg = l & ~(width - 1);
        switch (w.op) {
            case 0: src = seg + (f.arg & (width - 1)); break;
            case 1: src = (l - seg) >= f.arg ? l - f.arg : l; break;
            case 2: src = (l - seg) + f.arg < width ? l + f.arg : l; break;
            case 3: src = ((l ^ f.arg) & ~(width - 1)) == seg ? l ^ f.arg : l; break;
            default: break;
        }
        if (w.op <= 3) {
            if (!(took >> src & 1)) {
                Fiber* saved = bcemu::current;
                bcemu::current = &f;
                report("%s at %s:%d reads lane %d, which did not take part (undefined on the device)",
                       OP_NAMES[w.op], w.file, w.line, src);
                bcemu::current = saved;
                f.result = f.value;
            } else {
                f.result = lanes[src].value;
            }
        } else if (w.op == 4) {
            f.result = ballot;
        } else if (w.op == 5) {
            f.result = all;
        } else if (w.op == 6) {
            f.result = any;
        }
        if (&f != bcemu::current) f.state = RUNNABLE;
    }
    g_wsync[warp]++;
}

void check_warp_ops(int warp) {
    for (size_t k = 0; k < g_pending[warp].size();) {
        const WarpOp& w = g_pending[warp][k];
        if (((w.arrived | g_exited[warp]) & w.mask) == w.mask) {
            complete_warp_op(warp, k);
        } else {
            k++;
        }
    }
}

[[noreturn]] void fiber_main() {
    g_invoke(g_fn, g_args);
    Fiber* f = bcemu::current;
    f->state = DONE;
    g_live--;
    const int warp = f->tid >> 5;
    g_exited[warp] |= 1u << (f->tid & 31);
    if (g_arrived > 0 && g_arrived == g_live) complete_barrier();
    check_warp_ops(warp);
    to_scheduler();
    __builtin_trap();
}

std::string wait_sites() {
    struct Site {
        const char* file;
        int line, op;
        unsigned mask;
        int count, first;
    };
    std::vector<Site> sites;
    for (int i = 0; i < g_nthreads; i++) {
        const Fiber& f = g_fibers[i];
        if (f.state == DONE) continue;
        int op = f.state == AT_BARRIER ? -1 : f.wait_op;
        auto it = std::find_if(sites.begin(), sites.end(), [&](const Site& s) {
            return s.file == f.wait_file && s.line == f.wait_line && s.op == op && s.mask == f.wait_mask;
        });
        if (it == sites.end()) sites.push_back({f.wait_file, f.wait_line, op, f.wait_mask, 1, i});
        else it->count++;
    }
    std::string s;
    for (const auto& x : sites) {
        char b[256];
        if (x.op < 0)
            snprintf(b, sizeof b, "%s%d thread(s) from thread %d wait in __syncthreads at %s:%d", s.empty() ? "" : "; ",
                     x.count, x.first, x.file, x.line);
        else
            snprintf(b, sizeof b, "%s%d thread(s) from thread %d wait in %s (mask 0x%08x) at %s:%d", s.empty() ? "" : "; ",
                     x.count, x.first, OP_NAMES[x.op], x.mask, x.file, x.line);
        s += b;
    }
    return s;
}

// Runs one block to completion; false when the launch must stop (deadlock, misuse of a collective).
bool run_block(int nthreads, const dim3& bdim) {
    g_nthreads = g_live = nthreads;
    g_arrived = 0;
    g_block_run++;
    new_interval();
    g_block_first = g_interval;
    for (int w = 0; w < 32; w++) {
        g_pending[w].clear();
        g_wsync[w] = 0;
        g_exited[w] = 0;
        const int lo = w * 32;
        for (int l = 0; l < 32; l++)
            if (lo + l >= nthreads) g_exited[w] |= 1u << l;
    }
    for (int i = 0; i < nthreads; i++) {
        Fiber& f = g_fibers[i];
        f.tid = i;
        f.thread_idx.x = i % bdim.x;
        f.thread_idx.y = (i / bdim.x) % bdim.y;
        f.thread_idx.z = i / (bdim.x * bdim.y);
        f.state = RUNNABLE;
        f.wait_file = nullptr;
        f.wait_line = 0;
        fiber_init(f);
    }
    while (g_live > 0) {
        bool ran = false;
        for (int i = 0; i < nthreads; i++) {
            Fiber& f = g_fibers[i];
            if (f.state != RUNNABLE) continue;
            ran = true;
            bcemu::current = &f;
            to_fiber(f);
            bcemu::current = nullptr;
            if (g_abort) return false;
        }
        if (!ran) {
            report("deadlock: no thread of the block can go on: %s", wait_sites().c_str());
            return false;
        }
    }
    return true;
}

void wait_here(int state, const char* file, int line) {
    Fiber* f = bcemu::current;
    f->state = state;
    f->wait_file = file;
    f->wait_line = line;
    to_scheduler();
}

// ---- the checker ------------------------------------------------------------------------------------------
inline bool ordered(const Rec& r, uint32_t launch, bool shared) {
    if (r.launch != launch) return true;
    if (!shared && r.interval < g_block_first) return false;  // another block of this launch
    if (r.interval != g_interval) return true;                // a barrier between
    const int t = bcemu::current->tid;
    if (r.tid == t) return true;
    if ((r.tid >> 5) == (t >> 5) && r.wsync != g_wsync[t >> 5]) return true;  // a warp collective between
    return false;
}

void describe_thread(char* out, size_t cap, const Rec& r, bool shared) {
    if (!shared && r.interval < g_block_first)
        snprintf(out, cap, "another block of this launch");
    else
        snprintf(out, cap, "thread %u of this block, in the same barrier interval", r.tid);
}

void where(char* out, size_t cap, uintptr_t a, bool shared) {
    if (shared)
        snprintf(out, cap, "shared memory byte %lu", (unsigned long)(a - g_shared_lo));
    else
        describe_global(out, cap, a);
}

void access(uintptr_t a, unsigned n, bool write, bool atomic_op) {
    Fiber* f = bcemu::current;
    if (!g_check || !f) return;
    const bool shared = a >= g_shared_lo && a < g_shared_hi;
    if (!shared && !in_arena(a)) return;  // the thread's stack, kernel arguments
    char wh[256], who[128];
    const Alloc* al = nullptr;
    if (!shared) {
        al = find_alloc(a);
        if (!al || !al->live || a + n > al->base + al->size) {
            where(wh, sizeof wh, a, false);
            report("out of bounds: %s of %u bytes at %s", write ? "write" : "read", n, wh);
            return;
        }
    }
    const uint32_t launch = shared ? g_block_run : g_launch;
    Cell* base = shared ? g_shared_shadow + (a - g_shared_lo) / 2 : g_shadow + (a - dev_addr(g_arena)) / 2;
    const unsigned units = (unsigned)((a + n + 1) / 2 - a / 2);
    const Rec me{launch, g_interval, (uint16_t)f->tid, g_wsync[f->tid >> 5]};
    for (unsigned u = 0; u < units; u++) {
        Cell& c = base[u];
        const bool init = shared ? c.w.launch == launch && c.init : (c.init || al->all_init);
        if (!write && !init) {
            where(wh, sizeof wh, a, shared);
            report("uninitialised: read of %u bytes at %s, never written%s", n, wh,
                   shared ? " by this block" : "");
            return;
        }
        if (!atomic_op) {
            if (c.init && !ordered(c.w, launch, shared)) {
                where(wh, sizeof wh, a, shared);
                describe_thread(who, sizeof who, c.w, shared);
                report("race: %s of %u bytes at %s after a write by %s", write ? "write" : "read", n, wh, who);
                return;
            }
            if (write && c.r.launch == launch) {
                const bool same_interval = c.r.interval == g_interval || (!shared && c.r.interval < g_block_first);
                if (!ordered(c.r, launch, shared) || (c.rmulti && same_interval)) {
                    where(wh, sizeof wh, a, shared);
                    describe_thread(who, sizeof who, c.r, shared);
                    report("race: write of %u bytes at %s after a read by %s", n, wh, who);
                    return;
                }
            }
        }
        if (write) {
            c.w = me;
            c.init = 1;
            c.rmulti = 0;
            c.r.launch = 0;
        } else {
            const bool other_block = !shared && c.r.launch == launch && c.r.interval < g_block_first;
            const bool same_interval = c.r.launch == launch && c.r.interval == g_interval;
            if (other_block || (same_interval && c.r.tid != me.tid)) c.rmulti = 1;
            else if (!same_interval) c.rmulti = 0;
            c.r = me;
        }
    }
}

}  // namespace

// ---- what the kernels call (cuda_emu.h) -------------------------------------------------------------------
namespace bcemu {

struct KernelInfo {
    const char* name;
    void* fn;
    void (*invoke)(void*, void**);
    int nargs;
    const unsigned* sizes;
    unsigned max_dynamic_shared;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
};
std::vector<KernelInfo>& registry() {
    static std::vector<KernelInfo> r;
    return r;
}
void register_kernel(const char* name, void* fn, void (*invoke)(void*, void**), int nargs, const unsigned* sizes) {
    registry().push_back({name, fn, invoke, nargs, sizes, 48 * 1024});
}

void syncthreads(const char* file, int line) {
    g_arrived++;
    if (g_arrived == g_live) {
        complete_barrier();
        return;  // the last to arrive goes on; the others resume in the scheduler's next round
    }
    wait_here(AT_BARRIER, file, line);
}

uint64_t warp_op(int op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    Fiber* f = current;
    const int warp = f->tid >> 5, lane = f->tid & 31;
    if (!(mask >> lane & 1)) {
        report("%s at %s:%d: the mask 0x%08x does not name the calling lane %d", OP_NAMES[op], file, line, mask, lane);
        g_abort = true;
        to_scheduler();
    }
    if (width < 1 || width > 32 || (width & (width - 1))) {
        report("%s at %s:%d: width %d is not a power of two up to 32", OP_NAMES[op], file, line, width);
        g_abort = true;
        to_scheduler();
    }
    auto& pend = g_pending[warp];
    size_t k = 0;
    for (; k < pend.size(); k++) {
        if (pend[k].mask == mask) break;
        if (pend[k].mask & mask) {
            report("%s at %s:%d with mask 0x%08x while lanes of it wait in %s with mask 0x%08x at %s:%d "
                   "(mismatched masks)",
                   OP_NAMES[op], file, line, mask, OP_NAMES[pend[k].op], pend[k].mask, pend[k].file, pend[k].line);
            g_abort = true;
            to_scheduler();
        }
    }
    if (k == pend.size()) {
        pend.push_back({op, mask, 0, file, line});
    } else if (pend[k].op != op) {
        report("%s at %s:%d meets %s at %s:%d in one warp collective (mask 0x%08x)", OP_NAMES[op], file, line,
               OP_NAMES[pend[k].op], pend[k].file, pend[k].line, mask);
        g_abort = true;
        to_scheduler();
    }
    f->value = value;
    f->arg = arg;
    f->width = width;
    f->wait_op = op;
    f->wait_mask = mask;
    pend[k].arrived |= 1u << lane;
    if (((pend[k].arrived | g_exited[warp]) & mask) == mask) {
        complete_warp_op(warp, k);
    } else {
        wait_here(AT_WARP, file, line);
    }
    return f->result;
}

unsigned active_mask() {
    const int warp = current->tid >> 5;
    return ~g_exited[warp];
}

uint32_t atomic_rmw32(void* p, int op, uint32_t v, uint32_t cmp) {
    access(reinterpret_cast<uintptr_t>(p), 4, false, true);
    access(reinterpret_cast<uintptr_t>(p), 4, true, true);
    uint32_t* x = static_cast<uint32_t*>(p);
    const uint32_t old = *x;
    switch (op) {
        case 0: *x = old + v; break;
        case 1: *x = v; break;
        case 2: *x = (uint32_t)std::min((int32_t)old, (int32_t)v); break;
        case 3: *x = (uint32_t)std::max((int32_t)old, (int32_t)v); break;
        case 4: *x = old == cmp ? v : old; break;
        case 5: *x = old & v; break;
        case 6: *x = old | v; break;
        case 7: *x = old ^ v; break;
        case 8: {
            float a, b;
            memcpy(&a, &old, 4);
            memcpy(&b, &v, 4);
            a += b;
            memcpy(x, &a, 4);
            break;
        }
        default: break;
    }
    return old;
}

uint64_t atomic_rmw64(void* p, int op, uint64_t v, uint64_t cmp) {
    access(reinterpret_cast<uintptr_t>(p), 8, false, true);
    access(reinterpret_cast<uintptr_t>(p), 8, true, true);
    uint64_t* x = static_cast<uint64_t*>(p);
    const uint64_t old = *x;
    if (op == 0) *x = old + v;
    if (op == 4) *x = old == cmp ? v : old;
    if (op == 9) {
        double a, b;
        memcpy(&a, &old, 8);
        memcpy(&b, &v, 8);
        a += b;
        memcpy(x, &a, 8);
    }
    return old;
}

void trap(const char* file, int line) {
    report("__trap() at %s:%d", file, line);
    g_abort = true;
    to_scheduler();
}

}  // namespace bcemu

// A 16-byte access (a vector load or store) of device or shared memory at an address that is not a
// multiple of 16 faults on the device ("misaligned address"): reported, and the thread stopped before the
// access (the host's aligned vector instruction would fault too).
void vector_access(uintptr_t a, unsigned n, bool write) {
    const bool shared = a >= g_shared_lo && a < g_shared_hi;
    if (g_check && bcemu::current && (a & (n - 1)) != 0 && (shared || in_arena(a))) {
        char wh[256];
        where(wh, sizeof wh, a, shared);
        report("misaligned: %s of %u bytes at %s", write ? "write" : "read", n, wh);
        g_abort = true;
        to_scheduler();
    }
    access(a, n, write, false);
}

// ---- the thread-sanitizer instrumentation's entry points: the checker --------------------------------------
extern "C" {
void __tsan_read16(void* p) { vector_access(reinterpret_cast<uintptr_t>(p), 16, false); }
void __tsan_write16(void* p) { vector_access(reinterpret_cast<uintptr_t>(p), 16, true); }
void __tsan_unaligned_read16(void* p) { access(reinterpret_cast<uintptr_t>(p), 16, false, false); }
void __tsan_unaligned_write16(void* p) { access(reinterpret_cast<uintptr_t>(p), 16, true, false); }
#define BCEMU_HOOK(N)                                                                              \
    void __tsan_read##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, false, false); }          \
    void __tsan_write##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, true, false); }          \
    void __tsan_unaligned_read##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, false, false); } \
    void __tsan_unaligned_write##N(void* p) { access(reinterpret_cast<uintptr_t>(p), N, true, false); }
BCEMU_HOOK(1)
BCEMU_HOOK(2)
BCEMU_HOOK(4)
BCEMU_HOOK(8)
void __tsan_read_range(void* p, unsigned long n) { access(reinterpret_cast<uintptr_t>(p), (unsigned)n, false, false); }
void __tsan_write_range(void* p, unsigned long n) { access(reinterpret_cast<uintptr_t>(p), (unsigned)n, true, false); }
void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
    access(reinterpret_cast<uintptr_t>(s), (unsigned)n, false, false);
    access(reinterpret_cast<uintptr_t>(d), (unsigned)n, true, false);
    return memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, unsigned long n) {
    access(reinterpret_cast<uintptr_t>(s), (unsigned)n, false, false);
    access(reinterpret_cast<uintptr_t>(d), (unsigned)n, true, false);
    return memmove(d, s, n);
}
void* __tsan_memset(void* d, int c, unsigned long n) {
    access(reinterpret_cast<uintptr_t>(d), (unsigned)n, true, false);
    return memset(d, c, n);
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}

// ---- conversions (cuda_emu.h) -----------------------------------------------------------------------------
extern "C" uint16_t bcemu_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

extern "C" uint16_t bcemu_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fff;
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // ≥ 65520 rounds to infinity
    if (a <= 0x33000000u) return (uint16_t)sign;              // ≤ 2^-25 rounds to zero
    const int e = (int)(a >> 23);
    uint32_t r, rem, halfway;
    if (e < 113) {  // a subnormal half
        const uint32_t m = (a & 0x7fffffu) | 0x800000u;
        const int shift = 126 - e;
        r = m >> shift;
        rem = m & ((1u << shift) - 1);
        halfway = 1u << (shift - 1);
    } else {
        r = ((uint32_t)(e - 112) << 10) | ((a >> 13) & 0x3ffu);
        rem = a & 0x1fffu;
        halfway = 0x1000u;
    }
    if (rem > halfway || (rem == halfway && (r & 1u))) r++;
    return (uint16_t)(sign | r);
}

extern "C" float bcemu_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t u;
    if (e == 0x1f) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {
        if (m == 0) {
            u = sign;
        } else {
            float v = (float)m * (1.0f / 16777216.0f);  // m · 2^-24
            memcpy(&u, &v, 4);
            u |= sign;
        }
    } else {
        u = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// ---- the C interface of the emulated device (src/backend/device/emu.rs) -----------------------------------
extern "C" void bcemu_kernels_anchor();
extern "C" void bcemu_mutants_anchor();

extern "C" int bcemu_checker_built() { return BCEMU_CHECKED; }

extern "C" int bcemu_init(int check, char* err, size_t cap) {
    std::lock_guard<std::mutex> g(g_lock);
    bcemu_kernels_anchor();
    bcemu_mutants_anchor();
    if (!arena_init()) {
        set_err(err, cap, std::string("cannot reserve the emulated device's memory: ") + strerror(errno));
        return 1;
    }
    g_check = check && BCEMU_CHECKED;
    return 0;
}

extern "C" void bcemu_set_check(int check) {
    std::lock_guard<std::mutex> g(g_lock);
    g_check = check && BCEMU_CHECKED;
}

extern "C" uint64_t bcemu_alloc(uint64_t bytes, int zero) {
    std::lock_guard<std::mutex> g(g_lock);
    const uint64_t size = bytes ? bytes : 1;
    const uint64_t base = (g_next + 255) & ~255ull;
    if (base + size + GAP > ARENA_BYTES) return 0;
    g_next = base + size + GAP;
    const uint64_t addr = dev_addr(g_arena) + base;
    if (zero) memset(reinterpret_cast<void*>(addr), 0, size);
    g_allocs.push_back({addr, size, true, zero != 0});
    return addr;
}

namespace {
void release_pages(uint64_t addr, uint64_t size) {
    const uint64_t page = 4096, lo = (addr + page - 1) & ~(page - 1), hi = (addr + size) & ~(page - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
    if (g_shadow) {
        const uint64_t s0 = (uint64_t)(g_shadow + (lo - dev_addr(g_arena)) / 2);
        const uint64_t s1 = (uint64_t)(g_shadow + (hi - dev_addr(g_arena)) / 2);
        const uint64_t a = (s0 + page - 1) & ~(page - 1), b = s1 & ~(page - 1);
        if (hi > lo && b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_DONTNEED);
    }
}

// Whether [p, p + n) lies in one live allocation; names it otherwise.
bool region_ok(uint64_t p, uint64_t n, const char* what, char* err, size_t cap) {
    const Alloc* al = find_alloc(p);
    if (!al || !al->live || p + n > al->base + al->size) {
        char wh[256];
        describe_global(wh, sizeof wh, p);
        set_err(err, cap, std::string(what) + ": " + std::to_string(n) + " bytes at " + wh +
                              " are not inside one live allocation");
        return false;
    }
    return true;
}
}  // namespace

extern "C" int bcemu_free(uint64_t p) {
    std::lock_guard<std::mutex> g(g_lock);
    const Alloc* al = find_alloc(p);
    if (!al || al->base != p || !al->live) return 1;
    auto& a = g_allocs[(size_t)alloc_index(al)];
    a.live = false;
    release_pages(a.base, a.size);
    return 0;
}

extern "C" int bcemu_htod(uint64_t dst, const void* src, uint64_t n, char* err, size_t cap) {
    std::lock_guard<std::mutex> g(g_lock);
    if (n == 0) return 0;
    if (!region_ok(dst, n, "copy to the device", err, cap)) return 1;
    memcpy(reinterpret_cast<void*>(dst), src, n);
    mark_init(dst, n);
    return 0;
}

extern "C" int bcemu_dtoh(void* dst, uint64_t src, uint64_t n, char* err, size_t cap) {
    std::lock_guard<std::mutex> g(g_lock);
    if (n == 0) return 0;
    if (!region_ok(src, n, "copy from the device", err, cap)) return 1;
    memcpy(dst, reinterpret_cast<void*>(src), n);
    return 0;
}

extern "C" int bcemu_dtod(uint64_t dst, uint64_t src, uint64_t n, char* err, size_t cap) {
    std::lock_guard<std::mutex> g(g_lock);
    if (n == 0) return 0;
    if (!region_ok(src, n, "device copy source", err, cap) || !region_ok(dst, n, "device copy destination", err, cap))
        return 1;
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), n);
    mark_init(dst, n);
    return 0;
}

extern "C" int bcemu_memset(uint64_t dst, int value, uint64_t n, char* err, size_t cap) {
    std::lock_guard<std::mutex> g(g_lock);
    if (n == 0) return 0;
    if (!region_ok(dst, n, "memset", err, cap)) return 1;
    memset(reinterpret_cast<void*>(dst), value, n);
    mark_init(dst, n);
    return 0;
}

// For the emulated matrix products and collectives: [p, p + n) inside one live allocation; when read, every
// byte written before (with the checker on); when written, marked written.
extern "C" int bcemu_check_region(uint64_t p, uint64_t n, int write, const char* what, char* err, size_t cap) {
    std::lock_guard<std::mutex> g(g_lock);
    if (n == 0) return 0;
    if (!region_ok(p, n, what, err, cap)) return 1;
    if (write) {
        mark_init(p, n);
    } else if (g_check && g_shadow) {
        const Alloc* al = find_alloc(p);
        if (!al->all_init) {
            for (uint64_t a = p; a < p + n; a += 2) {
                if (!g_shadow[(a - dev_addr(g_arena)) / 2].init) {
                    char wh[256];
                    describe_global(wh, sizeof wh, a);
                    set_err(err, cap, std::string(what) + ": reads " + wh + ", never written");
                    return 1;
                }
            }
        }
    }
    return 0;
}

extern "C" int bcemu_kernel(const char* name) {
    std::lock_guard<std::mutex> g(g_lock);
    bcemu_kernels_anchor();
    bcemu_mutants_anchor();
    const auto& r = bcemu::registry();
    for (size_t i = 0; i < r.size(); i++)
        if (strcmp(r[i].name, name) == 0) return (int)i;
    return -1;
}

extern "C" int bcemu_set_max_dynamic_shared(int k, unsigned bytes) {
    std::lock_guard<std::mutex> g(g_lock);
    auto& r = bcemu::registry();
    if (k < 0 || (size_t)k >= r.size() || bytes > 232448) return 1;
    r[(size_t)k].max_dynamic_shared = bytes;
    return 0;
}


extern "C" int bcemu_launch(int k, const unsigned* grid, const unsigned* blk, unsigned smem, void** args,
                            const unsigned* sizes, int nargs, int order, char* err, size_t cap) {
    std::lock_guard<std::mutex> g(g_lock);
    const auto& reg = bcemu::registry();
    if (k < 0 || (size_t)k >= reg.size()) {
        set_err(err, cap, "no such kernel");
        return 1;
    }
    const auto& info = reg[(size_t)k];
    const std::string name = std::string("kernel ") + info.name + ": ";
    if (nargs != info.nargs) {
        set_err(err, cap, name + "launched with " + std::to_string(nargs) + " arguments, it takes " +
                              std::to_string(info.nargs));
        return 1;
    }
    for (int i = 0; i < nargs; i++) {
        if (sizes[i] != info.sizes[i]) {
            set_err(err, cap, name + "argument " + std::to_string(i) + " is " + std::to_string(sizes[i]) +
                                  " bytes, the parameter is " + std::to_string(info.sizes[i]));
            return 1;
        }
    }
    const uint64_t threads = (uint64_t)blk[0] * blk[1] * blk[2];
    if (threads == 0 || threads > 1024 || blk[0] > 1024 || blk[1] > 1024 || blk[2] > 64) {
        set_err(err, cap, name + "invalid block (" + std::to_string(blk[0]) + ", " + std::to_string(blk[1]) + ", " +
                              std::to_string(blk[2]) + "): at most 1024 threads, (1024, 1024, 64) per dimension");
        return 1;
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 2147483647u || grid[1] > 65535 || grid[2] > 65535) {
        set_err(err, cap, name + "invalid grid (" + std::to_string(grid[0]) + ", " + std::to_string(grid[1]) + ", " +
                              std::to_string(grid[2]) + ")");
        return 1;
    }
    if (smem > info.max_dynamic_shared) {
        set_err(err, cap, name + std::to_string(smem) + " bytes of dynamic shared memory, above " +
                              std::to_string(info.max_dynamic_shared) +
                              (info.max_dynamic_shared > 48 * 1024
                                   ? ""
                                   : " (more needs the MAX_DYNAMIC_SHARED_SIZE_BYTES attribute)"));
        return 1;
    }
    if (!g_arena && !arena_init()) {
        set_err(err, cap, "the emulated device has no memory");
        return 1;
    }
    // The kernel's parameters, copied as cuLaunchKernel does.
    std::vector<std::vector<char>> copies((size_t)nargs);
    std::vector<void*> ptrs((size_t)nargs);
    for (int i = 0; i < nargs; i++) {
        copies[(size_t)i].assign(static_cast<char*>(args[i]), static_cast<char*>(args[i]) + sizes[i]);
        ptrs[(size_t)i] = copies[(size_t)i].data();
    }
    g_invoke = info.invoke;
    g_fn = info.fn;
    g_args = ptrs.data();
    g_kernel = info.name;
    g_reports.clear();
    g_report_count = 0;
    g_abort = false;
    g_launch++;
    bcemu::block.grid_dim = dim3{grid[0], grid[1], grid[2]};
    bcemu::block.block_dim = dim3{blk[0], blk[1], blk[2]};
    const uint64_t nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
    uint64_t mult = 1, add = 0;  // order 2: a fixed permutation (an odd multiplier mod a power of two ≥ n)
    uint64_t pow2 = 1;
    while (pow2 < nblocks) pow2 <<= 1;
    if (order == 2) {
        mult = 0x9E3779B97F4A7C15ull | 1;
        add = g_launch * 0x632BE59BD9B4E019ull;
    }
    for (uint64_t i = 0, done = 0; done < nblocks; i++) {
        uint64_t b = order == 1 ? nblocks - 1 - i : (order == 2 ? ((i * mult + add) & (pow2 - 1)) : i);
        if (b >= nblocks) continue;
        done++;
        bcemu::block.block_idx = dim3{(unsigned)(b % grid[0]), (unsigned)((b / grid[0]) % grid[1]),
                                      (unsigned)(b / ((uint64_t)grid[0] * grid[1]))};
        if (!run_block((int)threads, bcemu::block.block_dim)) break;
    }
    bcemu::current = nullptr;
    g_kernel = "";
    if (!g_reports.empty()) {
        std::string msg;
        for (const auto& r : g_reports) msg += (msg.empty() ? "" : "\n") + r;
        if (g_report_count > g_reports.size())
            msg += "\n(" + std::to_string(g_report_count - g_reports.size()) + " more reports)";
        set_err(err, cap, msg);
        return 2;
    }
    return 0;
}
