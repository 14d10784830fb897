//! The start-up sweep of temporaries that writers killed mid-write left behind (`.NAME.PID.tmp`,
//! see [`super::atomic`]). They can be as large as the model, and on a nearly full disk one
//! leaked checkpoint temporary makes the next checkpoint fail again. Only files of our exact
//! pattern, for a file the caller writes, whose writer is no longer running are removed: a live
//! writer's temporary and every other file (the user's `.notes.tmp`) are left alone.

use super::atomic::parse_temporary;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Remove the stale temporaries of `names` (target file names) in `dir`; returns what was
/// removed, with the dead writer's pid. A missing directory has none.
pub fn sweep_stale_temporaries(dir: &Path, names: &[&str]) -> Result<Vec<(PathBuf, u32)>> {
    sweep_stale_temporaries_where(dir, |target| names.contains(&target))
}

/// [`sweep_stale_temporaries`] of every target file name that `ours` accepts (an evaluation's
/// pictures have names of their own).
pub fn sweep_stale_temporaries_where(dir: &Path, ours: impl Fn(&str) -> bool) -> Result<Vec<(PathBuf, u32)>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(vec![]) };
    let mut removed = vec![];
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((target, pid)) = parse_temporary(&name) else { continue };
        if !ours(target) || process_alive(pid) || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let p = e.path();
        std::fs::remove_file(&p)
            .with_context(|| format!("cannot remove {}, a temporary left by process {pid}", p.display()))?;
        removed.push((p, pid));
    }
    removed.sort();
    Ok(removed)
}

/// One line per removed temporary, for stderr.
pub fn describe(removed: &[(PathBuf, u32)]) -> Vec<String> {
    removed
        .iter()
        .map(|(p, pid)| format!("note: removed {}, left by process {pid}, which is no longer running", p.display()))
        .collect()
}

/// Whether a process `pid` exists (signal 0 checks without signalling; EPERM: it exists but
/// belongs to someone else). 0 and pids beyond `pid_t` name no writer.
pub fn process_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else { return false };
    if p <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only reports whether `p` exists.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_writers_temporaries_of_our_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        // A child that has exited and been reaped: its pid names no process (until reused).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let files = [
            (format!(".state.bin.{dead}.tmp"), false),
            (format!(".state.bin.{me}.tmp"), true),
            (format!(".other.bin.{dead}.tmp"), true),
            (".notes.tmp".to_string(), true),
            ("x.tmp".to_string(), true),
        ];
        for (n, _) in &files {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        let removed = sweep_stale_temporaries(dir.path(), &["state.bin"]).unwrap();
        assert_eq!(removed, vec![(dir.path().join(format!(".state.bin.{dead}.tmp")), dead)]);
        for (n, kept) in &files {
            assert_eq!(dir.path().join(n).exists(), *kept, "{n}");
        }
        assert!(process_alive(me) && !process_alive(0) && !process_alive(u32::MAX));
    }
}
