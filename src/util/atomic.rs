//! Atomic file writes: write a temporary file beside the target (`.NAME.PID.tmp`), flush it to
//! disk, rename it onto the target. A crash leaves either the old file or the new one, never a
//! half-written one. A failed write (disk full, file too large, rename refused) removes its
//! temporary and leaves the old file as it was; what a `kill -9` leaves behind is removed by the
//! next start-up's sweep ([`super::sweep`]).

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The temporaries being written right now, so that a signal that ends the process at once
/// (`sae export`, `sae eval`, a second Ctrl-C during training) can remove them first: else each
/// stays until a later command's sweep of that directory, as large as the file it was for.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Remove every temporary being written and exit with `status`. The registry stays locked until
/// the process is gone, so no writer creates a new temporary meanwhile.
pub fn remove_live_temporaries_and_exit(status: i32) -> ! {
    let live = live();
    for p in live.iter() {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(status)
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| Ok(w.write_all(bytes)?))
}

/// [`write_atomic`] of what `fill` writes (buffered), for files too large to assemble in memory
/// first (activation shards).
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let mut tmp = Temporary::new(tmp_path(path));
    let t = tmp.path.clone();
    let fail = |what: &str| format!("cannot write {}: {what} its temporary {}", path.display(), t.display());
    let f = File::create(&tmp.path).with_context(|| fail("cannot create"))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    fill(&mut w).with_context(|| fail("writing"))?;
    let f = w.into_inner().map_err(|e| e.into_error()).with_context(|| fail("writing"))?;
    // A full disk may only show here (delayed allocation, network filesystems): a temporary
    // that is not on disk must not replace the old file.
    f.sync_all().with_context(|| fail("flushing to disk"))?;
    drop(f);
    std::fs::rename(&tmp.path, path).with_context(|| fail("renaming onto it"))?;
    tmp.renamed = true;
    sync_parent(path);
    Ok(())
}

pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// A temporary removed when dropped, so that every error path of [`write_atomic`] (and a
/// panic) removes it; once renamed onto its target there is nothing left to remove.
struct Temporary {
    path: PathBuf,
    renamed: bool,
}

impl Temporary {
    /// Registered in [`LIVE`] before the file is created.
    fn new(path: PathBuf) -> Self {
        live().push(path.clone());
        Self { path, renamed: false }
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        let mut live = live();
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(i) = live.iter().position(|p| *p == self.path) {
            live.swap_remove(i);
        }
    }
}

/// Make the rename durable (best effort: a crash before this leaves the old file, which is
/// still a whole one).
fn sync_parent(path: &Path) {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// The target's file name and the writer's pid of one of our temporaries (`.NAME.PID.tmp`).
pub fn parse_temporary(name: &str) -> Option<(&str, u32)> {
    let (target, pid) = name.strip_prefix('.')?.strip_suffix(".tmp")?.rsplit_once('.')?;
    let pid = pid.parse().ok().filter(|_| pid.bytes().all(|b| b.is_ascii_digit()))?;
    (!target.is_empty()).then_some((target, pid))
}

/// Whether `name` is one of our temporary files (`.NAME.PID.tmp`).
pub fn is_our_temporary(name: &str) -> bool {
    parse_temporary(name).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_recognised_by_their_exact_pattern() {
        assert_eq!(parse_temporary(".trainer_state.safetensors.123.tmp"), Some(("trainer_state.safetensors", 123)));
        assert_eq!(parse_temporary(".cfg.json.7.tmp"), Some(("cfg.json", 7)));
        for other in [".notes.tmp", "x.tmp", "cfg.json.12.tmp", ".12.tmp", ".a.+12.tmp", ".a.12.tmp~", ".a..tmp"] {
            assert_eq!(parse_temporary(other), None, "{other}");
        }
    }

    #[test]
    fn a_failed_rename_names_the_target_and_removes_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming onto a non-empty directory fails after the temporary is written and flushed.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("keep"), b"x").unwrap();
        let e = format!("{:#}", write_atomic(&blocked, b"new").unwrap_err());
        assert!(e.contains(&blocked.display().to_string()) && e.contains("renaming"), "{e}");
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        assert_eq!(names, ["blocked"], "the temporary must be gone");
        assert_eq!(std::fs::read(blocked.join("keep")).unwrap(), b"x");
    }
}
