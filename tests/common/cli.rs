//! Driving the `sae` binary as a user would, for the run-directory and hostile-input tests.

use std::path::Path;
use std::process::{Command, Output};

pub fn sae(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sae")).args(args).output().expect("run sae")
}

/// `sae` with every file it writes limited to `bytes` (RLIMIT_FSIZE, set in the child only). A
/// write past the limit fails in the kernel with EFBIG after writing what fits: a genuine failed
/// write, as on a full disk, without needing a small filesystem (CI has no tmpfs) and regardless
/// of root (file permissions do not stop root; the limit does). SIGXFSZ is ignored so the write
/// returns the error instead of the signal killing the process.
pub fn sae_with_file_size_limit(bytes: u64, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(env!("CARGO_BIN_EXE_sae"));
    c.args(args);
    // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit).
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().expect("run sae")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn ok(o: &Output) {
    assert!(o.status.success(), "sae failed: {}", stderr(o));
}

/// The flags of a tiny run (about a second): d_in 16, d_sae 64, 20 steps of 64 tokens. Its
/// trainer state is about 27 KB, its SAELens weights about 9 KB.
pub const TINY: &[&str] = &[
    "--synth-d-in",
    "16",
    "--synth-features",
    "32",
    "--d-sae",
    "64",
    "--k",
    "4",
    "--batch-size",
    "64",
    "--steps",
    "20",
    "--eval-tokens",
    "256",
    "--backend",
    "cpu",
    "--quiet",
];

/// A tiny run into `out` with extra flags.
pub fn train(out: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["train", "--out", out.to_str().unwrap()];
    a.extend_from_slice(TINY);
    a.extend_from_slice(extra);
    sae(&a)
}

/// Our temporaries (`.NAME.PID.tmp`) left in `dir`.
pub fn temporaries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.retain(|n| saetrain::util::atomic::is_our_temporary(n));
    v
}

/// `sae args`, sent `signals` (libc's numbers, 300 ms apart) once `ready` exists (a file the
/// command writes once it is under way); waits for it to exit. The child starts with SIGINT,
/// SIGTERM and SIGHUP at their defaults, as under a terminal (a test run in a background job inherits SIGINT
/// ignored), or with SIGINT ignored, as a script's background command starts. Panics if `ready`
/// does not appear within two minutes.
pub fn sae_signalled_when(args: &[&str], ready: &Path, signals: &[i32], sigint_ignored: bool) -> Output {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut c = Command::new(env!("CARGO_BIN_EXE_sae"));
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls (signal).
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGINT, if sigint_ignored { libc::SIG_IGN } else { libc::SIG_DFL });
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = c.spawn().expect("run sae");
    let t = std::time::Instant::now();
    while !ready.exists() {
        assert!(t.elapsed().as_secs() < 120, "{} did not appear", ready.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for (i, &s) in signals.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        // SAFETY: kill only sends a signal to our own child, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, s) }, 0);
    }
    child.wait_with_output().expect("wait for sae")
}
