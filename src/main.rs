use std::io::Write;

fn main() {
    keep_large_allocations();
    if let Err(e) = saetrain::cli::main() {
        // Not eprintln: stderr may be a terminal that is gone (SIGHUP), and the exit status
        // must still come out.
        let _ = writeln!(std::io::stderr(), "error: {e:#}");
        // A command stopped by SIGINT / SIGTERM exits as a shell reports that signal (130, 143).
        std::process::exit(saetrain::cli::stop::stopped_status(&e).unwrap_or(1));
    }
}

/// A training step allocates a few buffers of tens of MB (codes, their gradients, batch copies).
/// glibc serves those with fresh mmaps, so every step pays a page fault and a zeroed page per
/// 4 KB (measured: 10% of a relu step's time in the kernel's clear_page). Serving them from the
/// heap, and never trimming it, reuses the same pages step after step. Process-wide, hence here
/// in the binary and not in the library (the Python package leaves its host's malloc alone).
fn keep_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        // M_MMAP_THRESHOLD cannot go above 32 MB, so large blocks come off mmap only with
        // M_MMAP_MAX = 0 (no mmapped blocks at all).
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
