// The emulator's scheduler: runs one kernel launch on the host, each CUDA thread as a fiber.
//
// A block's threads are fibers (fiber.hpp) on the calling OS thread. The scheduler runs every
// ready fiber until it finishes or waits at a barrier, then releases barriers:
//   - a warp's barrier (the two halves of every shuffle) when all its live lanes wait there;
//     a lane that has exited while the others shuffle is a bug (undefined on a GPU) and fails;
//   - the block's barrier (__syncthreads) when every live thread waits there (threads that have
//     exited count as arrived, as on sm_70+).
// Anything else that leaves no fiber runnable is a deadlock (a barrier inside divergent code)
// and fails the launch with the threads' states. Blocks run one after another, each to its end.
//
// Within a round (between two barriers) the fibers run in a pseudo-random order that is a
// function of the kernel, the block and the round, so runs are reproducible and a missing
// __syncthreads shows up as a wrong result whichever thread reads too early. The blocks of a
// launch run in a pseudo-random order too (a function of the kernel and the grid): a GPU gives
// no order among blocks, so a kernel whose result depends on it (one block reading what another
// writes in the same launch, entries placed by an atomic cursor and not sorted after) gives a
// different result than the CPU twin and fails its parity test, where block 0, 1, 2... in turn
// would hide it. SAETRAIN_EMU_SCHEDULE=forward|reverse|random (default random) picks both
// orders.
//
// Fiber stacks have a guard page, and a SIGSEGV handler names the kernel, block and thread when
// a kernel touches memory outside its buffers (the Rust side puts a guard page after each one).

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu.hpp"
#include "fiber.hpp"
#include "registry.hpp"

extern "C" const emu::KernelEntry* saetrain_emu_kernels(std::size_t* n);

#if defined(__x86_64__)
// saetrain_emu_switch(void** save_sp, void* load_sp): push the callee-saved registers and the
// MXCSR / x87 control words, store rsp in *save_sp, load load_sp, pop the same and return into
// the other fiber (the layout fiber_init builds for a new one).
asm(R"(
    .text
    .globl saetrain_emu_switch
    .type saetrain_emu_switch, @function
saetrain_emu_switch:
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
    .size saetrain_emu_switch, .-saetrain_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif

namespace emu {

namespace {

constexpr std::size_t STACK_BYTES = 64 * 1024;
constexpr unsigned MAX_THREADS = 1024;

enum class State : unsigned char { Ready, AtWarp, AtBlock, Done };

struct Fiber {
    FiberContext ctx;
    Coords coords;
    State state;
};

struct Stack {
    void* base = nullptr;  // guard page, then STACK_BYTES
};

// Per OS thread: the fibers and stacks (reused across launches) and the launch in progress.
struct Launcher {
    std::vector<Fiber> fibers;
    std::vector<Stack> stacks;
    std::vector<uint64_t> slots;
    FiberContext sched;
    unsigned current = 0;
    unsigned nthreads = 0;
    const KernelEntry* kernel = nullptr;
    void** params = nullptr;
    bool failed = false;
    std::string error;
    std::vector<unsigned> order;

    ~Launcher() {
        long page = sysconf(_SC_PAGESIZE);
        for (auto& s : stacks) munmap(s.base, STACK_BYTES + page);
    }
};

thread_local Launcher* launcher = nullptr;

Launcher& get_launcher() {
    static thread_local Launcher l;
    return l;
}

void fiber_main() {
    Launcher& L = *launcher;
    L.kernel->call(L.params);
    L.fibers[L.current].state = State::Done;
    fiber_switch(&L.fibers[L.current].ctx, &L.sched);  // never resumed
    __builtin_unreachable();
}

void wait(State s) {
    Launcher& L = *launcher;
    Fiber& f = L.fibers[L.current];
    f.state = s;
    fiber_switch(&f.ctx, &L.sched);
}

// ---- invalid accesses --------------------------------------------------------------------------

struct sigaction previous_segv, previous_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
    (void)uctx;
    Launcher* L = launcher;
    if (L && L->kernel) {
        const Coords& c = L->fibers[L->current].coords;
        char msg[512];
        int n = std::snprintf(msg, sizeof msg,
                              "\nsaetrain CUDA emulator: invalid memory access at %p in kernel %s, block (%u, %u, %u), "
                              "thread (%u, %u, %u): an index outside its buffer (or a fiber stack overflow)\n",
                              info->si_addr, L->kernel->name, c.block.x, c.block.y, c.block.z, c.thread.x, c.thread.y,
                              c.thread.z);
        if (n > 0) {
            ssize_t w = write(2, msg, (std::size_t)n);
            (void)w;
        }
    }
    // Hand the fault to whoever handled it before (Rust's handler, or the default action).
    sigaction(sig, sig == SIGSEGV ? &previous_segv : &previous_bus, nullptr);
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
    });
}

// ---- scheduling ---------------------------------------------------------------------------------

void ensure_stacks(Launcher& L, unsigned n) {
    long page = sysconf(_SC_PAGESIZE);
    while (L.stacks.size() < n) {
        void* p = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw std::runtime_error("cannot map a fiber stack");
        mprotect(p, page, PROT_NONE);  // stacks grow down onto this guard page
        L.stacks.push_back(Stack{p});
    }
}

std::string describe_states(const Launcher& L) {
    std::string s;
    const char* names[] = {"ready", "at a warp shuffle", "at __syncthreads", "exited"};
    unsigned i = 0;
    while (i < L.nthreads) {
        unsigned j = i;
        while (j + 1 < L.nthreads && L.fibers[j + 1].state == L.fibers[i].state) j++;
        char buf[96];
        std::snprintf(buf, sizeof buf, "%sthreads %u-%u %s", s.empty() ? "" : ", ", i, j,
                      names[(int)L.fibers[i].state]);
        s += buf;
        i = j + 1;
    }
    return s;
}

enum class Schedule { Forward, Reverse, Random };

Schedule schedule_from_env() {
    const char* v = std::getenv("SAETRAIN_EMU_SCHEDULE");
    if (v && std::strcmp(v, "forward") == 0) return Schedule::Forward;
    if (v && std::strcmp(v, "reverse") == 0) return Schedule::Reverse;
    return Schedule::Random;
}

uint64_t mix(uint64_t x) {  // splitmix64's finaliser
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// The order of one round: identity, reversed, or a Fisher-Yates shuffle seeded by `seed`.
void round_order(std::vector<unsigned>& order, unsigned n, Schedule sch, uint64_t seed) {
    order.resize(n);
    for (unsigned i = 0; i < n; i++) order[i] = sch == Schedule::Reverse ? n - 1 - i : i;
    if (sch != Schedule::Random) return;
    uint64_t st = seed;
    for (unsigned i = n; i > 1; i--) {
        st = mix(st);
        unsigned j = (unsigned)(st % i);
        std::swap(order[i - 1], order[j]);
    }
}

// Run one block to completion; false (with L.error set) on a kernel bug.
bool run_block(Launcher& L, dim3 block, dim3 block_dim, dim3 grid_dim, Schedule sch, uint64_t seed) {
    long page = sysconf(_SC_PAGESIZE);
    for (unsigned t = 0; t < L.nthreads; t++) {
        Fiber& f = L.fibers[t];
        unsigned tx = t % block_dim.x, ty = (t / block_dim.x) % block_dim.y, tz = t / (block_dim.x * block_dim.y);
        f.coords = Coords{dim3{tx, ty, tz}, block, block_dim, grid_dim};
        f.state = State::Ready;
        fiber_init(&f.ctx, static_cast<char*>(L.stacks[t].base) + page, STACK_BYTES, fiber_main);
    }
    for (uint64_t round = 0;; round++) {
        round_order(L.order, L.nthreads, sch, mix(seed ^ round));
        for (unsigned t : L.order) {
            if (L.fibers[t].state != State::Ready) continue;
            L.current = t;
            cur = &L.fibers[t].coords;
            fiber_switch(&L.sched, &L.fibers[t].ctx);
            if (L.failed) return false;
        }
        // Every fiber now waits or has exited: release what can be released.
        bool released = false, all_done = true, all_at_block = true;
        for (unsigned w = 0; w < L.nthreads; w += 32) {
            unsigned end = w + 32 < L.nthreads ? w + 32 : L.nthreads;
            unsigned waiting = 0, done = 0;
            for (unsigned t = w; t < end; t++) {
                State s = L.fibers[t].state;
                waiting += s == State::AtWarp;
                done += s == State::Done;
                all_done &= s == State::Done;
                all_at_block &= s == State::AtBlock || s == State::Done;
            }
            if (waiting > 0 && waiting + done == end - w) {
                if (done > 0) {
                    char buf[160];
                    std::snprintf(buf, sizeof buf,
                                  "warp %u shuffles with FULL_MASK after %u of its lanes exited (undefined on a GPU)",
                                  w / 32, done);
                    L.error = buf;
                    return false;
                }
                for (unsigned t = w; t < end; t++) L.fibers[t].state = State::Ready;
                released = true;
            }
        }
        if (all_done) return true;
        if (released) continue;
        if (all_at_block) {
            for (unsigned t = 0; t < L.nthreads; t++)
                if (L.fibers[t].state == State::AtBlock) L.fibers[t].state = State::Ready;
            continue;
        }
        L.error = "deadlock (a barrier in divergent code): " + describe_states(L);
        return false;
    }
}

std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

std::string sizes_text(const unsigned* sizes, unsigned n) {
    std::string s = "(";
    for (unsigned i = 0; i < n; i++) s += format("%s%u", i ? ", " : "", sizes[i]);
    return s + ")";
}

}  // namespace

thread_local const Coords* cur = nullptr;

void block_barrier() { wait(State::AtBlock); }
void warp_barrier() { wait(State::AtWarp); }

uint64_t* my_slot() { return &launcher->slots[launcher->current]; }

uint64_t warp_slot(unsigned lane) {
    unsigned base = launcher->current / 32 * 32;
    return launcher->slots[base + lane % 32];
}

void fail(const char* what) {
    Launcher& L = *launcher;
    const Coords& c = L.fibers[L.current].coords;
    L.error = format("%s (block (%u, %u, %u), thread (%u, %u, %u))", what, c.block.x, c.block.y, c.block.z,
                     c.thread.x, c.thread.y, c.thread.z);
    L.failed = true;
    fiber_switch(&L.fibers[L.current].ctx, &L.sched);
    __builtin_unreachable();  // an abandoned fiber is never resumed
}

}  // namespace emu

// Run kernel `name` over the grid. 0 on success; otherwise 1 and a message in `err`.
extern "C" int saetrain_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3], void** params,
                                   const unsigned* sizes, unsigned nparams, char* err, std::size_t err_len) {
    using namespace emu;
    auto fail_with = [&](const std::string& m) {
        std::snprintf(err, err_len, "%s", m.c_str());
        return 1;
    };
    std::size_t n = 0;
    const KernelEntry* table = saetrain_emu_kernels(&n);
    const KernelEntry* k = nullptr;
    for (std::size_t i = 0; i < n; i++)
        if (std::strcmp(table[i].name, name) == 0) k = &table[i];
    if (!k) return fail_with(format("no kernel named %s", name));
    bool same = k->nparams == nparams;
    for (unsigned i = 0; same && i < nparams; i++) same = k->sizes[i] == sizes[i];
    if (!same)
        return fail_with(format("kernel %s takes %u parameters of sizes %s; the launch passed %u of sizes %s", name,
                                k->nparams, sizes_text(k->sizes, k->nparams).c_str(), nparams,
                                sizes_text(sizes, nparams).c_str()));
    unsigned threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > MAX_THREADS) return fail_with(format("block of %u threads", threads));
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return fail_with("empty grid");
    uint64_t nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
    if (nblocks > 0xffffffffull) return fail_with(format("grid of %llu blocks", (unsigned long long)nblocks));

    Launcher& L = get_launcher();
    if (L.kernel) return fail_with("nested launch");
    install_fault_handler();
    try {
        ensure_stacks(L, threads);
    } catch (const std::exception& e) {
        return fail_with(e.what());
    }
    L.fibers.resize(threads);
    L.slots.assign(threads, 0);
    L.nthreads = threads;
    L.kernel = k;
    L.params = params;
    L.failed = false;
    L.error.clear();
    launcher = &L;
    dim3 bd{block[0], block[1], block[2]}, gd{grid[0], grid[1], grid[2]};
    bool ok = true;
    static const Schedule sch = schedule_from_env();
    uint64_t seed = 0;
    for (const char* c = name; *c; c++) seed = mix(seed ^ (uint64_t)(unsigned char)*c);
    std::vector<unsigned> blocks;
    round_order(blocks, (unsigned)nblocks, sch, mix(seed ^ (nblocks << 1 | 1)));
    for (unsigned i = 0; ok && i < blocks.size(); i++) {
        unsigned b = blocks[i], x = b % grid[0], y = (b / grid[0]) % grid[1], z = b / (grid[0] * grid[1]);
        ok = run_block(L, dim3{x, y, z}, bd, gd, sch, mix(seed ^ b));
    }
    L.kernel = nullptr;
    launcher = nullptr;
    cur = nullptr;
    if (!ok) return fail_with(format("kernel %s: %s", name, L.error.c_str()));
    return 0;
}
