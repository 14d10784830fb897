//! Shards truncated under a running reader: an error that names the file, not a dead process.
//!
//! Shards are read through memory maps. When a file is truncated while mapped (a user re-running
//! `numpy.save` onto a shard a run is reading, a disk quota hit by a copy in place), the next read
//! of a page past the new end raises SIGBUS, whose default action kills the process at once:
//! "Bus error", no message naming the file and no checkpoint of the steps since the last one.
//!
//! Every mapped shard registers its address range here ([`guard`]). A SIGBUS handler, installed
//! with the first registration, looks the faulting address up: inside a registered range it maps
//! one zeroed page over the lost one, so that the interrupted read completes, and marks the range
//! faulted; the reader checks [`Guard::faulted`] after each batch and turns it into an error that
//! discards the batch (its rows are not the data). Any other SIGBUS goes to the handler that was
//! there before (the default: the process dies, as it would without this module).
//!
//! The table is a list of slots that are never freed (one per shard mapped at once; a slot is
//! reused once its shard is dropped), read by the handler with atomics only, which is all a
//! signal handler may do besides the two system calls it makes (`mmap`, `sigaction`).

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

struct Slot {
    in_use: AtomicBool,
    start: AtomicUsize,
    /// 0 while the slot is free or being filled.
    len: AtomicUsize,
    faulted: AtomicBool,
    next: AtomicPtr<Slot>,
}

static HEAD: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
/// Faults served since the process started: readers look at their slots only when this moved.
static FAULTS: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
/// The SIGBUS action found at installation, handed every fault outside a shard.
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();
static HAVE_PREVIOUS: AtomicBool = AtomicBool::new(false);

/// A mapped range watched for faults while this lives.
pub struct Guard(&'static Slot);

impl Guard {
    /// Whether a read of the range faulted (the file lost pages under its map) since [`guard`].
    pub fn faulted(&self) -> bool {
        FAULTS.load(Ordering::Acquire) > 0 && self.0.faulted.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.len.store(0, Ordering::Release);
        self.0.faulted.store(false, Ordering::Release);
        self.0.in_use.store(false, Ordering::Release);
    }
}

/// Watch `bytes` (a whole memory map) for truncation faults until the guard is dropped. The
/// guard must be dropped before the map is unmapped.
pub fn guard(bytes: &[u8]) -> Guard {
    INSTALL.call_once(install);
    let slot = free_slot();
    slot.faulted.store(false, Ordering::Relaxed);
    slot.start.store(bytes.as_ptr() as usize, Ordering::Relaxed);
    slot.len.store(bytes.len(), Ordering::Release);
    Guard(slot)
}

fn free_slot() -> &'static Slot {
    let mut p = HEAD.load(Ordering::Acquire);
    // SAFETY: slots are leaked boxes, never freed, so every pointer in the list stays valid.
    while let Some(s) = unsafe { p.as_ref() } {
        if s.in_use.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            return s;
        }
        p = s.next.load(Ordering::Acquire);
    }
    let s: &'static Slot = Box::leak(Box::new(Slot {
        in_use: AtomicBool::new(true),
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        faulted: AtomicBool::new(false),
        next: AtomicPtr::new(std::ptr::null_mut()),
    }));
    let me = s as *const Slot as *mut Slot;
    let mut head = HEAD.load(Ordering::Acquire);
    loop {
        s.next.store(head, Ordering::Relaxed);
        match HEAD.compare_exchange(head, me, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return s,
            Err(h) => head = h,
        }
    }
}

fn install() {
    // SAFETY: sysconf and sigaction with a zeroed, then filled, struct; the handler only uses
    // atomics, mmap and sigaction.
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut act.sa_mask);
        let prev = std::ptr::addr_of_mut!(PREVIOUS) as *mut libc::sigaction;
        if libc::sigaction(libc::SIGBUS, &act, prev) == 0 {
            HAVE_PREVIOUS.store(true, Ordering::Release);
        }
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; slots are never freed; mmap is given a page
    // inside a range a live guard registered (its shard's map), so it replaces only that map's
    // page; sigaction restores the action saved at installation.
    unsafe {
        let addr = (*info).si_addr() as usize;
        let from_kernel = (*info).si_code > 0;
        let page = PAGE.load(Ordering::Relaxed);
        let mut p = HEAD.load(Ordering::Acquire);
        while let Some(s) = p.as_ref() {
            let len = s.len.load(Ordering::Acquire);
            let start = s.start.load(Ordering::Relaxed);
            if from_kernel && len > 0 && addr >= start && addr < start + len {
                let at = (addr & !(page - 1)) as *mut libc::c_void;
                let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
                if libc::mmap(at, page, libc::PROT_READ, flags, -1, 0) != libc::MAP_FAILED {
                    s.faulted.store(true, Ordering::Release);
                    FAULTS.fetch_add(1, Ordering::AcqRel);
                    return; // the read is retried and finds zeros
                }
                break;
            }
            p = s.next.load(Ordering::Acquire);
        }
        // Not a shard's page: what would have happened without this module. With the previous
        // action back in place, a fault retried raises it again; a sent SIGBUS is re-sent.
        let prev = std::ptr::addr_of!(PREVIOUS) as *const libc::sigaction;
        if HAVE_PREVIOUS.load(Ordering::Acquire) {
            libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut());
        } else {
            libc::signal(libc::SIGBUS, libc::SIG_DFL);
        }
        if !from_kernel {
            libc::raise(libc::SIGBUS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_truncated_map_reads_zeros_and_is_marked_faulted_and_slots_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let page = PAGE.load(Ordering::Relaxed).max(4096);
        std::fs::File::create(&path).unwrap().write_all(&vec![7u8; 4 * page]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the test truncates the file on purpose; the guard turns the fault into zeros.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let g = guard(&map);
        let other = std::fs::File::open(&path).unwrap();
        // SAFETY: as above, and this map's range is guarded too.
        let map2 = unsafe { memmap2::Mmap::map(&other) }.unwrap();
        let g2 = guard(&map2);
        assert_eq!(map[3 * page], 7);
        assert!(!g.faulted());
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(page as u64).unwrap();
        assert_eq!(map[0], 7, "the page still in the file is the file's");
        let v = std::hint::black_box(&map[..])[2 * page + 5];
        assert_eq!(v, 0, "the lost page reads as zeros");
        assert!(g.faulted());
        assert!(!g2.faulted(), "only the map that faulted is marked");
        let slot = g.0 as *const Slot;
        drop(g);
        let g3 = guard(&map2);
        assert_eq!(g3.0 as *const Slot, slot, "a dropped guard's slot is reused");
        assert!(!g3.faulted(), "a reused slot starts clean");
        drop((g2, g3));
    }
}
