//! The run directory: which directory `sae train` may write into, the lock it holds while it
//! writes, and what `--resume` may change. A user's data is never overwritten without
//! `--overwrite`, and two writers never share a directory.

use super::checkpoint::STATE_FILE;
use super::history::{self, CHECKPOINTS_DIR, HISTORY_FILE};
use super::{CONFIG_FILE, DIVERGED_FILE, METRICS_FILE, SUMMARY_FILE};
use crate::config::TrainConfig;
use crate::export::saelens::{CFG_FILE, WEIGHTS_FILE};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file inside a run directory (its content: the writer's pid).
pub const LOCK_FILE: &str = ".sae.lock";
/// Every file a training run writes: what `--overwrite` replaces (and nothing else).
pub const RUN_FILES: &[&str] = &[
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    CFG_FILE,
    RESUMES_FILE,
    HISTORY_FILE,
    DIVERGED_FILE,
];
/// One line per resume that changed an option.
pub const RESUMES_FILE: &str = "resumes.jsonl";

/// An exclusive lock on a run directory, held until dropped. The OS releases it when the
/// process dies, so a `kill -9` never leaves a stale lock behind.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

/// Lock `dir` (which must exist) for writing, or say which process holds it.
pub fn lock(dir: &Path) -> Result<RunLock> {
    let path = dir.join(LOCK_FILE);
    // Never through a link: a `.sae.lock` planted as a link to a user's file would be truncated
    // and overwritten with the pid.
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| {
            let link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
            match link {
                true => format!("cannot open the lock file {}: it is a symbolic link (remove it)", path.display()),
                false => format!("cannot open the lock file {}", path.display()),
            }
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
            bail!(
                "{} is being written by {who} (lock {}); wait for it to finish or choose another --out",
                dir.display(),
                path.display()
            );
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    let mut record_pid = || -> std::io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.flush()
    };
    record_pid().with_context(|| format!("cannot write this process's pid into the lock file {}", path.display()))?;
    Ok(RunLock { _file: file, path })
}

/// Whether a process holds `dir`'s lock now (a trainer or an export writing there), without
/// taking it or writing anything: a shared lock is refused while an exclusive one is held.
pub fn being_written(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(LOCK_FILE)) else { return false };
    matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock))
}

/// Make `dir` ready for a new run and lock it: created when missing; refused when it holds
/// anything but a lock, unless `overwrite`, which removes the files a previous run wrote there
/// (`RUN_FILES` and its kept checkpoints, `checkpoints/`) and refuses if anything else is in it.
pub fn prepare_new(dir: &Path, overwrite: bool) -> Result<RunLock> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {}: exists and is not a directory", dir.display());
    }
    crate::util::paths::refuse_dangling(dir, "--out")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create output directory {}", dir.display()))?;
    // A refused --out (a directory of the user's) is left as it was: without the lock file.
    let had_lock = dir.join(LOCK_FILE).exists();
    let lock = lock(dir)?;
    let refuse = |e: anyhow::Error| -> Result<RunLock> {
        if !had_lock {
            let _ = std::fs::remove_file(dir.join(LOCK_FILE));
        }
        Err(e)
    };
    let mut names = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != LOCK_FILE && !crate::util::atomic::is_our_temporary(&name) {
            names.push(name);
        }
    }
    // A previous run: its config beside what training writes. A lone config.json is the
    // user's own file, never ours to remove.
    let is_run = names.iter().any(|n| n == CONFIG_FILE)
        && names.iter().any(|n| [METRICS_FILE, STATE_FILE, SUMMARY_FILE].contains(&n.as_str()));
    // The run's own evaluations (`sae eval RUN` writes RUN/eval) describe the SAE being replaced.
    let (ours, mut theirs): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| {
        is_run
            && (RUN_FILES.contains(&n.as_str())
                || (n == CHECKPOINTS_DIR && history::only_ours(&dir.join(n)))
                || crate::eval::out_dir::only_an_evaluation(&dir.join(n)))
    });
    if theirs.is_empty() && ours.is_empty() {
        return Ok(lock);
    }
    let list = |v: &mut Vec<String>| {
        v.sort();
        let more = if v.len() > 4 { format!(", ... ({} entries)", v.len()) } else { String::new() };
        format!("{}{more}", v.iter().take(4).cloned().collect::<Vec<_>>().join(", "))
    };
    if !overwrite {
        let what = if is_run { "holds a previous run" } else { "is not empty" };
        let mut all: Vec<String> = ours.iter().chain(&theirs).cloned().collect();
        return refuse(anyhow::anyhow!(
            "--out {} {what} ({}); pass --overwrite to replace a previous run, --resume {} to continue it, or choose another --out",
            dir.display(),
            list(&mut all),
            dir.display()
        ));
    }
    if !theirs.is_empty() {
        return refuse(anyhow::anyhow!(
            "--out {}: --overwrite replaces only a previous run's files, but the directory also holds {}; choose another --out",
            dir.display(),
            list(&mut theirs)
        ));
    }
    for name in &ours {
        if name == CHECKPOINTS_DIR {
            history::remove_all(dir)?;
            continue;
        }
        if dir.join(name).is_dir() {
            crate::eval::out_dir::remove_evaluation(&dir.join(name))?;
            continue;
        }
        let p = dir.join(name);
        std::fs::remove_file(&p).with_context(|| format!("--overwrite: cannot remove {}", p.display()))?;
    }
    Ok(lock)
}

/// Options `--resume` may change, each safe because it does not change what has been trained:
/// the length of the run (to extend it), threads, output and logging cadence (kept checkpoints
/// and the history included: those already written stay), prefetching and
/// the backend (which computes the same step within rounding).
pub const SAFE_ON_RESUME: &[&str] = &[
    "steps",
    "tokens",
    "threads",
    "quiet",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "history_every",
    "prefetch",
    "backend",
    "dense_codes",
];

/// The options given with `--resume` (name -> value, config-file keys) checked against the
/// saved config: an error naming every option that differs and may not change; else the
/// changes that apply (name -> [old, new]).
pub fn resume_changes(saved: &TrainConfig, given: &Map<String, Value>) -> Result<Map<String, Value>> {
    let saved_v = serde_json::to_value(saved)?;
    let mut refused = vec![];
    let mut changes = Map::new();
    for (name, new) in given {
        if name == "out" {
            continue; // --resume names the directory
        }
        let old = saved_v.get(name).cloned().unwrap_or(Value::Null);
        if &old == new || (name == "data" && crate::config::same_data_value(&old, new)) {
            continue;
        }
        // Data recorded by a path that no longer leads to it from here (relative to another
        // directory, or moved): the path may change; the checkpoint's sample of the rows
        // refuses other contents when the stream seeks.
        let moved = name == "data" && old.as_str().is_some_and(|p| !Path::new(p).exists());
        if moved {
            changes.insert(name.clone(), Value::Array(vec![old, new.clone()]));
            continue;
        }
        if SAFE_ON_RESUME.contains(&name.as_str()) {
            changes.insert(name.clone(), Value::Array(vec![old, new.clone()]));
        } else {
            refused.push(format!("--{} {} (the run has {})", name.replace('_', "-"), show(new), show(&old)));
        }
    }
    if !refused.is_empty() {
        bail!(
            "--resume continues a run with its saved config; these options differ from it and cannot change mid-run: {}. \
             Options that may change on resume: {}",
            refused.join(", "),
            SAFE_ON_RESUME.iter().map(|s| format!("--{}", s.replace('_', "-"))).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(changes)
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "none".into(),
        other => other.to_string(),
    }
}

/// `saved` with `changes` (from [`resume_changes`]) applied.
pub fn apply_changes(saved: &TrainConfig, changes: &Map<String, Value>) -> Result<TrainConfig> {
    let mut v = serde_json::to_value(saved)?;
    for (name, change) in changes {
        v[name] = change[1].clone();
    }
    Ok(serde_json::from_value(v)?)
}

/// Remove the temporaries that writers of this run killed mid-write left in `dir` (call it with
/// the lock held): see [`crate::util::sweep`].
pub fn sweep_temporaries(dir: &Path) -> Result<Vec<(PathBuf, u32)>> {
    let mut swept = crate::util::sweep::sweep_stale_temporaries(dir, RUN_FILES)?;
    swept.extend(history::sweep_temporaries(dir)?);
    Ok(swept)
}
