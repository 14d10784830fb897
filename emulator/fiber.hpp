// Switching between the emulator's fibers (one per CUDA thread).
//
// On x86-64 a switch saves the callee-saved registers and the SSE/x87 control words on the old
// stack and pops them from the new one: a few nanoseconds, where glibc's swapcontext also makes a
// sigprocmask system call (which made the emulator several times slower). Elsewhere: ucontext.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)

namespace emu {

struct FiberContext {
    void* sp = nullptr;
};

extern "C" void saetrain_emu_switch(void** save_sp, void* load_sp);

// Save the running context into `from` and resume `to`.
inline void fiber_switch(FiberContext* from, FiberContext* to) { saetrain_emu_switch(&from->sp, to->sp); }

// Prepare `c` to start `entry` (which must never return) on the stack [lo, lo + size).
inline void fiber_init(FiberContext* c, void* lo, std::size_t size, void (*entry)()) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                     // keeps `entry`'s frame aligned as after a call
    *--sp = reinterpret_cast<uint64_t>(entry);     // where the first switch's `ret` lands
    for (int i = 0; i < 6; i++) *--sp = 0;         // rbp rbx r12 r13 r14 r15
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
    c->sp = sp;
}

}  // namespace emu

#else

#include <ucontext.h>

namespace emu {

struct FiberContext {
    ucontext_t uc;
};

inline void fiber_switch(FiberContext* from, FiberContext* to) { swapcontext(&from->uc, &to->uc); }

inline void fiber_init(FiberContext* c, void* lo, std::size_t size, void (*entry)()) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = lo;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, entry, 0);
}

}  // namespace emu

#endif
