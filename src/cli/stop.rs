//! Ctrl-C (SIGINT), SIGTERM and SIGHUP during `sae train` and `sae sweep`: the step under way
//! finishes, a checkpoint of the steps done is written, and the process exits with 128 + the
//! signal (130, 143, 129), saying how to resume. A second signal quits at once (removing the
//! temporaries being written).
//!
//! Without this, each of them killed the process and lost every step since the last periodic
//! checkpoint (up to `--checkpoint-every`, 1000 steps by default): a batch scheduler's SIGTERM
//! before it preempts a job, and the SIGHUP of a dropped ssh session, are the usual cases. A
//! signal ignored at start-up stays ignored (`nohup` ignores SIGHUP).
//!
//! `sae data synth` installs the same handlers ([`install_for_writing`]): it stops after the
//! shard under way and removes the shards it wrote.
//!
//! The Python package handles these signals itself (with Python's handlers), so this lives in
//! the command line. Only the commands that ask the flag install it: elsewhere a signal must
//! still stop the process at once.

use crate::train::StepHook;
use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::flag;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// The signals that stop a run.
const SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

#[derive(Default)]
struct Flags {
    /// The first signal's number (0: none yet).
    which: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// The error a command returns when a signal stopped it; `main` exits with 128 + its number when
/// this is anywhere in the error's chain.
#[derive(Debug)]
pub struct Stopped(usize);

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by {}", name(self.0))
    }
}

impl std::error::Error for Stopped {}

/// Install the handlers (once per process; later calls reuse them) and return the hook that
/// stops a run after the step in which a signal came.
pub fn install() -> Result<StepHook> {
    watch(
        "training stops after the step under way and writes a checkpoint (a run past its last step finishes instead)",
    )?;
    let stopped = check();
    Ok(Arc::new(move |_, _, _| stopped()))
}

/// The handlers for a command that writes files one by one (`sae data synth`): the check it calls
/// between files, an error once a signal came. `what` says, as the signal comes, what it will do.
pub fn install_for_writing(what: &'static str) -> Result<impl Fn() -> Result<()>> {
    watch(what)?;
    Ok(check())
}

/// After [`watch`]: [`Stopped`] once a signal came, else Ok.
fn check() -> impl Fn() -> Result<()> + Send + Sync {
    let which = Arc::clone(&FLAGS.get().expect("set by watch").which);
    move || match which.load(Ordering::SeqCst) {
        0 => Ok(()),
        sig => Err(Stopped(sig).into()),
    }
}

/// Whether `e` is, or was caused by, a stop on a signal: the status to exit with.
pub fn stopped_status(e: &anyhow::Error) -> Option<i32> {
    e.chain().any(|c| c.is::<Stopped>()).then(exit_status).flatten()
}

fn watch(what: &'static str) -> Result<()> {
    if FLAGS.get().is_none() {
        let flags = Flags::default();
        let watched: Vec<i32> = SIGNALS.into_iter().filter(|&s| !ignored(s)).collect();
        for &sig in &watched {
            // The second signal's exit is the signal thread's (it removes the temporaries being
            // written first, which a handler may not do).
            flag::register_usize(sig, Arc::clone(&flags.which), sig as usize)
                .with_context(|| format!("cannot install a handler for {}", name(sig as usize)))?;
        }
        if !watched.is_empty() {
            announce(&watched, what)?;
        }
        // Only this function sets it, and the command line calls it from one thread.
        let _ = FLAGS.set(flags);
    }
    Ok(())
}

/// The exit status for a run stopped by a signal: 128 + its number, as a shell reports a process
/// that the signal killed. `None` when no signal came.
pub fn exit_status() -> Option<i32> {
    let sig = FLAGS.get()?.which.load(Ordering::SeqCst);
    (sig != 0).then_some(128 + sig as i32)
}

/// Say on stderr, as the signal comes, what will happen (a step can take seconds, the start of a
/// run longer). A thread of its own: a signal handler may not print.
fn announce(watched: &[i32], what: &'static str) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new(watched).context("cannot watch for signals")?;
    std::thread::Builder::new()
        .name("sae-stop".into())
        .spawn(move || {
            let mut signals = signals.forever();
            if let Some(sig) = signals.next() {
                // Not eprintln: after SIGHUP the terminal may be gone, and a failed write must
                // not panic.
                let _ = writeln!(std::io::stderr(), "\n{}: {what}; send it again to quit at once", name(sig as usize));
            }
            if let Some(sig) = signals.next() {
                // Said, so that a run that ends without "interrupted after step N" is not
                // mistaken for one that wrote its checkpoint.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n{}: quit at once; the files being written are removed (a resume starts from the last checkpoint written before)",
                    name(sig as usize)
                );
                crate::util::atomic::remove_live_temporaries_and_exit(128 + sig);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// For a command that has nothing to finish on a signal (`sae export`, `sae eval`): the first
/// SIGINT, SIGTERM or SIGHUP ends it at once, with 128 + the signal as a killed process would,
/// but only after removing the temporaries it was writing. (Killed by the default action, each
/// stayed behind until a later command swept that directory.)
pub fn quit_cleanly_on_signal() -> Result<()> {
    let watched: Vec<i32> = SIGNALS.into_iter().filter(|&s| !ignored(s)).collect();
    if watched.is_empty() {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new(&watched).context("cannot watch for signals")?;
    std::thread::Builder::new()
        .name("sae-quit".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = writeln!(
                    std::io::stderr(),
                    "\n{}: stopped; the files being written are removed",
                    name(sig as usize)
                );
                crate::util::atomic::remove_live_temporaries_and_exit(128 + sig);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Whether `sig` was ignored when the process started. A shell starts a script's background
/// commands with SIGINT ignored, so that Ctrl-C at the terminal spares them; a handler would undo
/// that (Python, too, leaves an inherited ignore alone).
fn ignored(sig: i32) -> bool {
    // SAFETY: with a null new action, sigaction only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

fn name(sig: usize) -> &'static str {
    match sig as i32 {
        SIGINT => "SIGINT (Ctrl-C)",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP (the terminal went away)",
        _ => "a signal",
    }
}
