//! This CPU's f32 FMA peak, measured rather than looked up: every thread of the rayon pool (the
//! threads the encoder GEMM runs on) runs, at the same moment, a loop of independent vector FMAs
//! that never leaves the registers, in the widest instruction set the CPU has (AVX-512F, else
//! AVX2 + FMA). Whatever the CPU does under that load (all-core turbo, AVX-512 down-clocking, two
//! SMT siblings sharing one core's FMA ports) is in the number. A dependent chain of integer adds
//! (one per cycle, register operands) measures the clock at the same time, so the report can also say FLOP per cycle
//! per thread (2 x lanes x FMA ports per core: 32 for two 256-bit ports, 64 for two 512-bit).

use serde::Serialize;

/// Independent accumulators in the FMA loop: more than latency (4-5 cycles) x ports (2), and with
/// the two constant operands still within the 16 ymm registers of AVX2.
pub const ACCUMULATORS: usize = 12;

/// The measured FMA peak of the pool's threads.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FmaPeak {
    /// f32 GFLOP/s of all threads together (an FMA counts 2 FLOP per lane).
    pub gflops: f64,
    pub threads: usize,
    /// Instruction set of the loop: "avx512f" or "avx2+fma".
    pub isa: String,
    /// f32 lanes per FMA (16 or 8).
    pub lanes: usize,
    /// Clock of the threads while they run a dependent integer-add chain (GHz).
    pub ghz: f64,
    /// gflops / threads / ghz.
    pub flop_per_cycle: f64,
    /// How the peak was obtained, for the report.
    pub method: String,
}

/// GFLOP/s of `threads` threads that each ran `iters` iterations of `acc` FMAs of `lanes` f32
/// lanes in `secs` seconds.
pub fn fma_gflops(threads: usize, iters: u64, acc: usize, lanes: usize, secs: f64) -> f64 {
    threads as f64 * iters as f64 * acc as f64 * lanes as f64 * 2.0 / secs / 1e9
}

/// FLOP per cycle per thread at `gflops` over `threads` threads clocked at `ghz`.
pub fn flop_per_cycle(gflops: f64, threads: usize, ghz: f64) -> f64 {
    gflops / threads as f64 / ghz
}

/// The ISA the loop will use on this CPU and its f32 lanes (None: not x86-64 with FMA).
pub fn detect_isa() -> Option<(&'static str, usize)> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Some(("avx512f", 16));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some(("avx2+fma", 8));
        }
    }
    None
}

/// Measure the peak on the current rayon pool: best of three runs of about 50 ms. Each thread
/// times its own loop in thread CPU time, so another process sharing the cores lowers neither
/// number (the GEMM it is compared with is wall time, so contention shows as a lower fraction).
/// None where the CPU is not x86-64 with FMA (no loop is written for other targets).
pub fn measure() -> Option<FmaPeak> {
    let (isa, lanes) = detect_isa()?;
    let threads = rayon::current_num_threads();
    // ~50 ms at 3 GHz with two FMA ports (6 cycles per iteration of 12 FMAs).
    let iters: u64 = 25_000_000;
    let clock_iters: u64 = 1_500_000; // x 100 adds: 50 ms at 3 GHz
    let mut best = 0.0f64;
    let mut ghz = 0.0f64;
    for _ in 0..3 {
        let secs = all_threads(threads, || imp::fma_loop(lanes, iters));
        best = best.max(secs.iter().map(|&s| fma_gflops(1, iters, ACCUMULATORS, lanes, s)).sum());
        let secs = all_threads(threads, || imp::add_chain(clock_iters));
        let mean = secs.iter().map(|&s| clock_iters as f64 * imp::ADDS_PER_ITER as f64 / s / 1e9).sum::<f64>();
        ghz = ghz.max(mean / threads as f64);
    }
    Some(FmaPeak {
        gflops: best,
        threads,
        isa: isa.to_string(),
        lanes,
        ghz,
        flop_per_cycle: flop_per_cycle(best, threads, ghz),
        method: format!(
            "measured: {threads} thread(s) at once, register-resident {isa} FMA loop ({} bit, {ACCUMULATORS} accumulators), thread CPU time; clock from a dependent integer add chain",
            lanes * 32
        ),
    })
}

/// Of two measurements of the peak, the one with more GFLOP/s (either may be missing).
pub fn larger(a: Option<FmaPeak>, b: Option<FmaPeak>) -> Option<FmaPeak> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.gflops > a.gflops { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Each of the `threads` pool threads, released together by a barrier, runs `f`; the thread CPU
/// seconds each spent in it.
fn all_threads(threads: usize, f: impl Fn() + Sync) -> Vec<f64> {
    let barrier = std::sync::Barrier::new(threads);
    rayon::broadcast(|_| {
        barrier.wait();
        let t0 = thread_cpu_seconds();
        f();
        (thread_cpu_seconds() - t0).max(1e-9)
    })
}

/// CPU time of the whole process (seconds).
pub fn process_cpu_seconds() -> f64 {
    clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// The share of `threads` cores a process had: `cpu_s` CPU seconds over `wall_s` wall seconds.
pub fn cpu_share(cpu_s: f64, wall_s: f64, threads: usize) -> f64 {
    cpu_s / (wall_s * threads as f64)
}

/// CPU time of the calling thread (seconds).
fn thread_cpu_seconds() -> f64 {
    clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock}) failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::ACCUMULATORS;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    pub const ADDS_PER_ITER: u64 = 100;

    /// `iters` x ACCUMULATORS vector FMAs, `a = a * b + c` with b just below 1 so the values
    /// converge to c / (1 - b) and never become subnormal.
    pub fn fma_loop(lanes: usize, iters: u64) {
        // SAFETY: `detect_isa` found the features each function is compiled for.
        let s = unsafe {
            if lanes == 16 {
                fma512(iters)
            } else {
                fma256(iters)
            }
        };
        black_box(s);
    }

    #[target_feature(enable = "avx512f")]
    fn fma512(iters: u64) -> f32 {
        let b = _mm512_set1_ps(black_box(0.999_99));
        let c = _mm512_set1_ps(black_box(1e-3));
        let mut acc = [_mm512_set1_ps(black_box(1.0)); ACCUMULATORS];
        for _ in 0..black_box(iters) {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, b, c);
            }
        }
        let s = acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    fn fma256(iters: u64) -> f32 {
        let b = _mm256_set1_ps(black_box(0.999_99));
        let c = _mm256_set1_ps(black_box(1e-3));
        let mut acc = [_mm256_set1_ps(black_box(1.0)); ACCUMULATORS];
        for _ in 0..black_box(iters) {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, b, c);
            }
        }
        let s = acc.iter().fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
        // SAFETY: __m256 is 8 f32 lanes.
        let out: [f32; 8] = unsafe { std::mem::transmute(s) };
        out.iter().sum()
    }

    /// `iters` x ADDS_PER_ITER dependent register-register integer adds: one cycle each. (Not
    /// `add reg, imm`: Golden Cove and later fold small immediate adds at rename, faster than
    /// one a cycle.)
    pub fn add_chain(iters: u64) {
        let mut a = black_box(0u64);
        let one = black_box(1u64);
        // SAFETY: registers only; the asm reads and writes nothing else.
        unsafe {
            std::arch::asm!(
                "2:",
                ".rept 100",
                "add {a}, {one}",
                ".endr",
                "sub {n}, 1",
                "jnz 2b",
                a = inout(reg) a,
                one = in(reg) one,
                n = inout(reg) iters.max(1) => _,
                options(nomem, nostack),
            );
        }
        black_box(a);
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    pub const ADDS_PER_ITER: u64 = 100;
    pub fn fma_loop(_: usize, _: u64) {}
    pub fn add_chain(_: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fma_arithmetic() {
        // 2 threads x 1e9 iterations x 12 FMAs x 8 lanes x 2 FLOP in 1 s = 384 GFLOP/s.
        assert!((fma_gflops(2, 1_000_000_000, 12, 8, 1.0) - 384.0).abs() < 1e-9);
        // Half the time, twice the rate; AVX-512 lanes double it again.
        assert!((fma_gflops(2, 1_000_000_000, 12, 16, 0.5) - 1536.0).abs() < 1e-9);
        // Two 256-bit FMA ports at 3 GHz: 32 FLOP per cycle, 96 GFLOP/s per thread.
        assert!((flop_per_cycle(192.0, 2, 3.0) - 32.0).abs() < 1e-12);
        // 3 CPU seconds in 2 wall seconds on 2 threads: three quarters of the two cores.
        assert!((cpu_share(3.0, 2.0, 2) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn the_larger_of_two_peaks_is_kept() {
        let at = |gflops: f64| FmaPeak {
            gflops,
            threads: 2,
            isa: "avx2+fma".into(),
            lanes: 8,
            ghz: 3.0,
            flop_per_cycle: gflops / 6.0,
            method: String::new(),
        };
        assert_eq!(larger(Some(at(100.0)), Some(at(200.0))), Some(at(200.0)));
        assert_eq!(larger(Some(at(200.0)), Some(at(100.0))), Some(at(200.0)));
        assert_eq!(larger(None, Some(at(100.0))), Some(at(100.0)));
        assert_eq!(larger(Some(at(100.0)), None), Some(at(100.0)));
        assert_eq!(larger(None, None), None);
    }

    #[test]
    fn measured_peak_is_plausible() {
        let Some(p) = measure() else {
            println!("skipped: no FMA loop for this CPU");
            return;
        };
        assert_eq!(p.threads, rayon::current_num_threads());
        assert!(p.lanes == 8 || p.lanes == 16, "{p:?}");
        // 0.3-7 GHz, and per thread between one lane-FMA per cycle and four full-width ports
        // (loose: a loaded shared machine slows either loop).
        assert!(p.ghz > 0.3 && p.ghz < 7.0, "{p:?}");
        assert!(p.flop_per_cycle > 2.0 && p.flop_per_cycle <= 8.0 * p.lanes as f64 * 1.2, "{p:?}");
        assert!((p.gflops - p.flop_per_cycle * p.ghz * p.threads as f64).abs() < 1e-6 * p.gflops);
    }
}
