// The table that connects a kernel's name to a host-compiled function, shared by the generated
// kernel translation unit (build.rs writes it: every kernels/*.cu plus one entry per kernel) and
// the runtime.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

namespace emu {

// `call` unpacks a cuLaunchKernel-style parameter array (a pointer to each argument) and runs
// the kernel body for the current thread. `sizes` lets the launcher check every argument's width:
// the driver does not, and a u64 passed where a kernel takes a u32 misplaces every later one.
struct KernelEntry {
    const char* name;
    void (*call)(void** params);
    unsigned nparams;
    const unsigned* sizes;
};

template <class... A, std::size_t... I>
inline void call_with(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(p[I])...);
}

template <class... A>
inline void call_params(void (*k)(A...), void** p) {
    call_with(k, p, std::index_sequence_for<A...>{});
}

template <class... A>
constexpr unsigned count_params(void (*)(A...)) {
    return sizeof...(A);
}

template <class... A>
struct ParamSizes {
    static constexpr unsigned value[sizeof...(A) + 1] = {(unsigned)sizeof(A)..., 0u};
};

template <class... A>
constexpr const unsigned* param_sizes(void (*)(A...)) {
    return ParamSizes<A...>::value;
}

}  // namespace emu

#define EMU_KERNEL(NAME) \
    emu::KernelEntry { #NAME, [](void** p) { emu::call_params(NAME, p); }, emu::count_params(NAME), emu::param_sizes(NAME) }
