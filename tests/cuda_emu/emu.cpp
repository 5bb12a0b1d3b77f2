// Fiber scheduler of the CUDA emulator (include/cuda_runtime.h). A block's threads are persistent fibers
// (one guarded stack each, reused by every block and launch) that run the kernel body in a loop. The
// scheduler resumes every runnable fiber once per round, in forward, reverse or shuffled order (blocks
// likewise), until it blocks at a barrier or finishes; when none is runnable it releases one barrier:
//   - a warp shuffle when all 32 lanes of a warp wait at the same shuffle,
//   - __syncthreads when every thread of the block waits at the same __syncthreads,
// and anything else (a barrier some threads skipped or exited before, divergent barrier sites, a
// shuffle in a partial warp) is reported as an error naming the kernel, block and source line.
// Context switches are a few instructions of assembly on x86-64 (swapcontext costs a syscall per
// switch); other architectures, or -DEMU_UCONTEXT, use ucontext. Both tell AddressSanitizer about
// every stack switch, so ASan builds check device code on fiber stacks too.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <vector>

#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#if !defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_UCONTEXT 1
#endif
#ifdef EMU_UCONTEXT
#include <ucontext.h>
#endif

#ifndef EMU_UCONTEXT
// void emu_switch(void** save_sp, void* load_sp): saves the callee-saved registers, MXCSR and the x87
// control word on the current stack, stores its stack pointer, loads the other one and restores.
asm(R"(
    .pushsection .text
    .globl emu_switch
    .type emu_switch, @function
    .p2align 4
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    fnstcw (%rsp)
    stmxcsr 8(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
    .popsection
)");
extern "C" void emu_switch(void** save_sp, void* load_sp);
#endif

namespace emu {

dim3 threadIdx_, blockIdx_, blockDim_, gridDim_;
cudaError_t last_error = cudaSuccess;
uint64_t block_epoch = 0;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

enum class State : uint8_t { runnable, at_sync, at_shuffle, done };

struct Fiber {
    State state = State::done;
    bool started = false;
    dim3 tid;
    const char* site_file = nullptr;  // the barrier this fiber waits at
    int site_line = 0;
    char* stack = nullptr;  // lowest usable address (a PROT_NONE guard page lies below it)
#ifdef EMU_UCONTEXT
    ucontext_t ctx;
#else
    void* sp = nullptr;
#endif
    void* fake_stack = nullptr;  // ASan's fake stack of this fiber while it is switched out
};

Fiber g_fibers[kMaxThreads];
int g_created = 0;
int g_current = -1;
#ifdef EMU_UCONTEXT
ucontext_t g_sched_ctx;
#else
void* g_sched_sp = nullptr;
#endif
#if EMU_ASAN
const void* g_main_stack_bottom = nullptr;  // the scheduler's (OS thread's) stack, for ASan
size_t g_main_stack_size = 0;
#endif

// The launch being run.
const char* g_kernel_name = "";
const char* g_kernel_file = "";
int g_kernel_line = 0;
void (*g_kernel)(void*) = nullptr;
void* g_kernel_ctx = nullptr;

std::vector<LaunchSite> g_sites;
std::vector<LaunchShape> g_log;

Order g_order = Order::forward;
uint64_t g_rng = 0x9e3779b97f4a7c15ull;
Stats g_stats;
uint64_t g_slots[kMaxThreads];  // shuffle exchange, one slot per thread

uint64_t next_random() {  // xorshift64*: the shuffled fiber order, reproducible from the seed
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545f4914f6cdd1dull;
}

// ---- switching ----------------------------------------------------------------------------------------

// Called on the fiber: give control back to the scheduler; returns when resumed.
void switch_to_scheduler(Fiber& f) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&f.fake_stack, g_main_stack_bottom, g_main_stack_size);
#endif
#ifdef EMU_UCONTEXT
    swapcontext(&f.ctx, &g_sched_ctx);
#else
    emu_switch(&f.sp, g_sched_sp);
#endif
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

// Body of every fiber: run the current kernel for the current block, report done, wait for the next block.
void fiber_main() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_main_stack_bottom, &g_main_stack_size);
#endif
    for (;;) {
        g_kernel(g_kernel_ctx);
        Fiber& f = g_fibers[g_current];
        f.state = State::done;
        switch_to_scheduler(f);
    }
}

#ifdef EMU_UCONTEXT
void fiber_entry_uc() { fiber_main(); }
#else
extern "C" void fiber_entry_asm() {
    fiber_main();
    abort();  // unreachable: fibers never return
}
#endif

void create_fiber(Fiber& f) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    char* base = static_cast<char*>(
        mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) fail("cannot map a fiber stack");
    if (mprotect(base, page, PROT_NONE) != 0) fail("cannot protect a fiber stack guard page");
    f.stack = base + page;
#ifdef EMU_UCONTEXT
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;  // fiber_main never returns
    makecontext(&f.ctx, fiber_entry_uc, 0);
#else
    // Initial frame popped by emu_switch: x87 CW + MXCSR, six callee-saved registers, then `ret` into
    // fiber_entry_asm with the stack at 8 mod 16 (as after a call), above it a null return address.
    uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;
    *--sp = reinterpret_cast<uint64_t>(&fiber_entry_asm);
    for (int i = 0; i < 6; ++i) *--sp = 0;
    *--sp = 0x1F80;  // MXCSR default (at sp + 8)
    *--sp = 0x037F;  // x87 control word default (at sp)
    f.sp = sp;
#endif
}

void resume(int i) {
    Fiber& f = g_fibers[i];
    g_current = i;
    threadIdx_ = f.tid;
    void* fake = nullptr;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
#ifdef EMU_UCONTEXT
    swapcontext(&g_sched_ctx, &f.ctx);
#else
    emu_switch(&g_sched_sp, f.sp);
#endif
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    (void)fake;
    g_current = -1;
}

[[noreturn]] void block_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void block_error(const char* fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fail("kernel %s (launched at %s:%d), block (%u,%u,%u) of grid (%u,%u,%u), block (%u,%u,%u): %s", g_kernel_name,
         g_kernel_file, g_kernel_line, blockIdx_.x, blockIdx_.y, blockIdx_.z, gridDim_.x, gridDim_.y, gridDim_.z,
         blockDim_.x, blockDim_.y, blockDim_.z, msg);
}

bool same_site(const Fiber& a, const Fiber& b) {
    return a.site_line == b.site_line && (a.site_file == b.site_file || strcmp(a.site_file, b.site_file) == 0);
}

// Called on a fiber at a barrier.
void wait_at(State s, const char* file, int line) {
    if (g_current < 0) fail("%s:%d: barrier or shuffle outside a kernel", file, line);
    Fiber& f = g_fibers[g_current];
    f.state = s;
    f.site_file = file;
    f.site_line = line;
    switch_to_scheduler(f);
    threadIdx_ = f.tid;
}

void run_block(int nt) {
    ++block_epoch;
    ++g_stats.blocks;
    g_stats.threads += nt;
    for (int i = 0; i < nt; ++i) {
        Fiber& f = g_fibers[i];
        f.state = State::runnable;
        f.tid = dim3(i % blockDim_.x, (i / blockDim_.x) % blockDim_.y, i / (blockDim_.x * blockDim_.y));
        f.site_file = nullptr;
        f.site_line = 0;
        g_slots[i] = 0;
    }
    static int order[kMaxThreads];
    int done = 0;
    for (;;) {
        // One round: every runnable fiber runs until it blocks or finishes.
        for (int k = 0; k < nt; ++k) order[k] = g_order == Order::reverse ? nt - 1 - k : k;
        if (g_order == Order::shuffle)
            for (int k = nt - 1; k > 0; --k) std::swap(order[k], order[next_random() % (k + 1)]);
        for (int k = 0; k < nt; ++k) {
            const int i = order[k];
            if (g_fibers[i].state != State::runnable) continue;
            resume(i);
            if (g_fibers[i].state == State::done) ++done;
        }
        if (done == nt) break;

        // Nobody can run: release whole warps waiting at one shuffle first.
        bool released = false;
        int at_sync = 0, at_shuffle = 0;
        for (int w = 0; w * 32 < nt; ++w) {
            const int lo = w * 32, hi = std::min(nt, lo + 32);
            int waiting = 0;
            for (int i = lo; i < hi; ++i) waiting += g_fibers[i].state == State::at_shuffle;
            at_shuffle += waiting;
            if (waiting == 0) continue;
            if (waiting != hi - lo) continue;  // some lanes elsewhere: maybe they get there later
            if (hi - lo != 32)
                block_error("full-mask warp shuffle (%s:%d) in a partial warp of %d threads",
                            g_fibers[lo].site_file, g_fibers[lo].site_line, hi - lo);
            for (int i = lo + 1; i < hi; ++i)
                if (!same_site(g_fibers[i], g_fibers[lo]))
                    block_error("divergent warp shuffle: lane %d waits at %s:%d, lane 0 at %s:%d", i - lo,
                                g_fibers[i].site_file, g_fibers[i].site_line, g_fibers[lo].site_file,
                                g_fibers[lo].site_line);
            for (int i = lo; i < hi; ++i) g_fibers[i].state = State::runnable;
            released = true;
        }
        if (released) continue;
        int first_sync = -1, first_shuffle = -1;
        for (int i = 0; i < nt; ++i) {
            if (g_fibers[i].state == State::at_sync) {
                ++at_sync;
                if (first_sync < 0) first_sync = i;
            } else if (g_fibers[i].state == State::at_shuffle && first_shuffle < 0) {
                first_shuffle = i;
            }
        }
        if (at_shuffle > 0)
            block_error("deadlock: thread %d waits at a warp shuffle (%s:%d) that lanes of its warp never reach "
                        "(%d threads at __syncthreads, %d exited)",
                        first_shuffle, g_fibers[first_shuffle].site_file, g_fibers[first_shuffle].site_line, at_sync,
                        done);
        if (done > 0)
            block_error("__syncthreads (%s:%d) reached by %d threads while %d threads of the block exited",
                        g_fibers[first_sync].site_file, g_fibers[first_sync].site_line, at_sync, done);
        for (int i = 0; i < nt; ++i)
            if (!same_site(g_fibers[i], g_fibers[first_sync]))
                block_error("divergent __syncthreads: thread %d waits at %s:%d, thread %d at %s:%d", i,
                            g_fibers[i].site_file, g_fibers[i].site_line, first_sync,
                            g_fibers[first_sync].site_file, g_fibers[first_sync].site_line);
        ++g_stats.barriers;
        for (int i = 0; i < nt; ++i) g_fibers[i].state = State::runnable;
    }
}

}  // namespace

void configure(Order order, uint64_t seed) {
    g_order = order;
    g_rng = seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
    if (g_rng == 0) g_rng = 1;
}

const Stats& stats() { return g_stats; }
const std::vector<LaunchSite>& launch_sites() { return g_sites; }
const std::vector<LaunchShape>& launch_log() { return g_log; }
void clear_launch_log() { g_log.clear(); }

void fail(const char* fmt, ...) {
    fflush(stdout);
    va_list ap;
    va_start(ap, fmt);
    fputs("emu: ERROR: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(stderr);
    abort();
}

void launch(const char* name, const char* file, int line, dim3 grid, dim3 block, size_t smem,
            void (*kernel)(void*), void* ctx) {
    if (g_current >= 0) fail("%s:%d: kernel %s launched from device code (not emulated)", file, line, name);
    const uint64_t nt = uint64_t(block.x) * block.y * block.z;
    if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
        block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
        nt > 1024 || smem > 48 * 1024) {
        if (getenv("EMU_TRACE"))
            fprintf(stderr, "emu: launch %s (%s:%d) rejected: grid (%u,%u,%u) block (%u,%u,%u) smem %zu\n", name,
                    file, line, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
        last_error = cudaErrorInvalidConfiguration;
        return;
    }
    ++g_stats.launches;
    bool known = false;
    for (auto& site : g_sites)
        if (site.line == line && strcmp(site.file, file) == 0 && strcmp(site.kernel, name) == 0) {
            ++site.launches;
            known = true;
        }
    if (!known) g_sites.push_back({file, line, name, 1});
    if (g_log.size() < 4096) g_log.push_back({name, grid, block});  // bounded: nobody clears it in most groups
    if (getenv("EMU_TRACE"))
        fprintf(stderr, "emu: launch %s (%s:%d) grid (%u,%u,%u) block (%u,%u,%u)\n", name, file, line, grid.x, grid.y,
                grid.z, block.x, block.y, block.z);
    while (g_created < static_cast<int>(nt)) create_fiber(g_fibers[g_created++]);
    g_kernel_name = name;
    g_kernel_file = file;
    g_kernel_line = line;
    g_kernel = kernel;
    g_kernel_ctx = ctx;
    gridDim_ = grid;
    blockDim_ = block;
    // Blocks run one at a time in the same order mode as the fibers, so a result that depends on which
    // block writes last (a race between blocks) changes with --order.
    const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
    std::vector<uint32_t> perm;
    if (g_order == Order::shuffle && nblocks <= (uint64_t(1) << 22)) {
        perm.resize(nblocks);
        for (uint64_t b = 0; b < nblocks; ++b) perm[b] = static_cast<uint32_t>(b);
        for (uint64_t b = nblocks - 1; b > 0; --b) std::swap(perm[b], perm[next_random() % (b + 1)]);
    }
    for (uint64_t k = 0; k < nblocks; ++k) {
        const uint64_t b = !perm.empty() ? perm[k] : g_order == Order::reverse ? nblocks - 1 - k : k;
        blockIdx_ = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                         static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y)));
        run_block(static_cast<int>(nt));
    }
    g_kernel = nullptr;
    g_kernel_ctx = nullptr;
}

void sync_threads(const char* file, int line) { wait_at(State::at_sync, file, line); }

uint64_t shuffle_exchange(uint64_t bits, int lane_mask, const char* file, int line) {
    const int me = g_current;
    if (me < 0) fail("%s:%d: warp shuffle outside a kernel", file, line);
    ++g_stats.shuffles;
    g_slots[me] = bits;
    wait_at(State::at_shuffle, file, line);  // every lane has published its value
    const uint64_t r = g_slots[(me & ~31) | ((me & 31) ^ lane_mask)];
    wait_at(State::at_shuffle, file, line);  // every lane has read before any slot is reused
    return r;
}

}  // namespace emu
