//! An exclusive lock on a directory that writes nothing into it: `flock` on the directory
//! itself. For the outputs of `sae export` and `sae eval`, where a `.sae.lock` file would make
//! the directory look like a run's (run directories keep their own lock file,
//! `train::rundir::lock`). The OS releases the lock when the process dies.

use anyhow::{bail, Context, Result};
use std::fs::{File, TryLockError};
use std::path::Path;

/// Held until dropped.
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

/// Lock the existing directory `dir` for `what` ("sae eval --out"), or say that another process
/// holds it.
pub fn lock_dir(dir: &Path, what: &str) -> Result<DirLock> {
    let f =
        File::open(dir).with_context(|| format!("{what} {}: cannot open the directory to lock it", dir.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(DirLock { _dir: f }),
        Err(TryLockError::WouldBlock) => bail!(
            "{what} {}: another sae process is writing there now; wait for it to finish or choose another directory",
            dir.display()
        ),
        Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("{what} {}: cannot lock it", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped_and_nothing_is_written() {
        let d = tempfile::tempdir().unwrap();
        let a = lock_dir(d.path(), "test").unwrap();
        let e = lock_dir(d.path(), "test").unwrap_err().to_string();
        assert!(e.contains("another sae process is writing there"), "{e}");
        drop(a);
        let _b = lock_dir(d.path(), "test").unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
