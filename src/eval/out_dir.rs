//! Where `sae eval` may write (`--out`, by default `RUN/eval` or `RUN/eval-history`), and what
//! it leaves there.
//!
//! An evaluation writes `eval.json`, `report.md` and its pictures. Those names are common, so:
//! - a directory that holds a training run is refused (an evaluation's files are not the run's,
//!   and `sae train --overwrite` would not know them);
//! - `RUN/eval` and `RUN/eval-history` belong to RUN's own evaluation (`--zipf-from RUN` reads
//!   the first): another SAE's evaluation there is refused;
//! - an earlier evaluation's directory (its `eval.json` is ours) is rewritten, and the files it
//!   listed that this one does not write (a picture of an input no longer evaluated, every
//!   picture after `--no-plots`) are removed, so the directory never mixes two evaluations;
//! - any other non-empty directory needs `--overwrite`, and then only the evaluation's files are
//!   replaced.
//!
//! `eval.json` is written last and lists every file of the evaluation (`files`).
//!
//! The directory is created and locked only when the evaluation is done and its files are
//! about to be written ([`EvalOut::begin`]; a failed evaluation leaves no empty directory), and
//! the checks are made again under the lock, so two evaluations into one directory never mix.
//! The files are written into [`STAGING_DIR`] inside `--out` first and moved into place only
//! when every one is written (`eval.json` last), so an evaluation stopped or failing half way
//! leaves the earlier one whole, never its numbers beside this one's pictures (the next
//! evaluation removes the staging folder). While they are moved, [`PENDING_FILE`] lists what
//! was there before: an evaluation killed in that instant leaves files that no `eval.json`
//! lists, and the next one removes them.

use super::report::{EVAL_FILE, REPORT_FILE};
use crate::export::load::checkpoint_dir;
use crate::train::checkpoint::STATE_FILE;
use crate::train::rundir::LOCK_FILE;
use crate::util::atomic::is_our_temporary;
use crate::util::sweep::{describe, sweep_stale_temporaries_where};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The key of `eval.json` that lists the evaluation's files.
pub const FILES_KEY: &str = "files";

/// The sub-directories of a run that hold its own evaluations.
pub(crate) const RUN_EVAL_DIRS: [&str; 2] = ["eval", "eval-history"];

/// Written while an evaluation writes its files: the names that were in the directory before.
pub const PENDING_FILE: &str = ".eval-pending.json";
/// Where an evaluation writes its files before moving them into `--out`.
pub const STAGING_DIR: &str = ".eval-staging";

/// An output directory checked for an evaluation, with what an earlier one there wrote.
pub struct EvalOut {
    pub dir: PathBuf,
    inputs: Vec<PathBuf>,
    overwrite: bool,
    previous: Vec<String>,
    _lock: Option<crate::util::dirlock::DirLock>,
}

/// Whether `name` is a file an evaluation writes (and so may replace or remove).
fn is_eval_file(name: &str) -> bool {
    !name.contains('/') && (name == EVAL_FILE || name == REPORT_FILE || name == PENDING_FILE || name.ends_with(".png"))
}

/// The evaluation files that an evaluation killed while writing in `dir` left there: those not
/// present when it began (its [`PENDING_FILE`] says which were). Empty when none was killed.
fn left_by_a_killed_evaluation(dir: &Path, names: &[String]) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(dir.join(PENDING_FILE)) else { return vec![] };
    let before: Vec<String> = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("present")?.as_array().cloned())
        .map(|a| a.iter().filter_map(|n| n.as_str().map(String::from)).collect())
        .unwrap_or_default();
    names.iter().filter(|n| is_eval_file(n) && *n != PENDING_FILE && !before.contains(n)).cloned().collect()
}

/// An evaluation's file, or a temporary of one.
fn is_eval_file_or_temporary(name: &str) -> bool {
    is_eval_file(name) || crate::util::atomic::parse_temporary(name).is_some_and(|(t, _)| is_eval_file(t))
}

/// Whether `dir` holds a run (its trainer state, lock or config): no file but the run's own
/// belongs there.
pub(crate) fn holds_run(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists() || dir.join(LOCK_FILE).exists() || crate::train::run_config_file(dir).is_some()
}

/// The files an earlier `sae eval` wrote in `dir` (listed by its `eval.json`), or None when
/// `dir/eval.json` is not one of ours.
fn earlier_evaluation(dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join(EVAL_FILE)).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
    doc.get("saetrain_version")?.as_str()?;
    if doc.get("runs").is_none() && doc.get("history").is_none() {
        return None;
    }
    let files = doc.get(FILES_KEY).and_then(|f| f.as_array()).cloned().unwrap_or_default();
    Some(files.iter().filter_map(|f| f.as_str()).filter(|f| is_eval_file(f)).map(String::from).collect())
}

/// Check `out` for an evaluation of `inputs` (see the module's rules), before the evaluation
/// (so that a refused `--out` costs nothing); [`EvalOut::begin`] creates and locks it.
pub fn prepare(out: &Path, inputs: &[PathBuf], overwrite: bool) -> Result<EvalOut> {
    let previous = check(out, inputs, overwrite)?;
    Ok(EvalOut { dir: out.to_path_buf(), inputs: inputs.to_vec(), overwrite, previous, _lock: None })
}

/// The module's rules for `out`; the files of earlier evaluations there that this one replaces.
fn check(out: &Path, inputs: &[PathBuf], overwrite: bool) -> Result<Vec<String>> {
    if out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a directory; give a directory for the evaluation's files", out.display());
    }
    if holds_run(out) {
        bail!(
            "--out {} holds a training run: an evaluation goes in a directory of its own (`sae eval {}` writes \
             {}), --overwrite or not",
            out.display(),
            out.display(),
            out.join("eval").display()
        );
    }
    let run_dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let named = out.file_name().and_then(|n| n.to_str()).is_some_and(|n| RUN_EVAL_DIRS.contains(&n));
    if named
        && holds_run(run_dir)
        && !(inputs.len() == 1 && super::run::same_data(&checkpoint_dir(&inputs[0]), Some(run_dir)))
    {
        bail!(
            "--out {} is where the evaluation of the run {} goes (`sae eval {}`; `--zipf-from {}` reads it): \
             another SAE's evaluation there is refused, --overwrite or not; choose another --out",
            out.display(),
            run_dir.display(),
            run_dir.display(),
            run_dir.display()
        );
    }
    let names: Vec<String> = std::fs::read_dir(out)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let names: Vec<String> = names.into_iter().filter(|n| !is_our_temporary(n)).collect();
    let killed = left_by_a_killed_evaluation(out, &names);
    let names: Vec<String> =
        names.into_iter().filter(|n| !killed.contains(n) && n != PENDING_FILE && n != STAGING_DIR).collect();
    let mut previous = match earlier_evaluation(out) {
        Some(files) => files,
        None if names.is_empty() || overwrite => vec![],
        None => {
            let mut shown = names.clone();
            shown.sort();
            shown.truncate(4);
            bail!(
                "--out {} is not empty ({}) and holds no earlier evaluation: pass --overwrite to write {EVAL_FILE}, \
                 {REPORT_FILE} and the pictures there anyway (other files are left alone), or choose another --out",
                out.display(),
                shown.join(", ")
            )
        }
    };
    previous.extend(killed);
    Ok(previous)
}

/// Whether `dir` is a directory holding one earlier evaluation and nothing else (the files an
/// evaluation writes, and temporaries of them): what `sae train --overwrite` may remove with the
/// run it describes.
pub fn only_an_evaluation(dir: &Path) -> bool {
    if earlier_evaluation(dir).is_none() {
        return false;
    }
    let Ok(rd) = std::fs::read_dir(dir) else { return false };
    rd.flatten().all(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        (n == STAGING_DIR && e.file_type().is_ok_and(|t| t.is_dir()))
            || (e.file_type().is_ok_and(|t| t.is_file()) && is_eval_file_or_temporary(&n))
    })
}

/// Remove a staging folder: the evaluation files (and their temporaries) in it, then the folder.
fn remove_staging(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if !is_eval_file_or_temporary(&n) || !e.file_type().is_ok_and(|t| t.is_file()) {
            bail!("{} holds {n}, which no evaluation writes: remove it by hand", dir.display());
        }
        std::fs::remove_file(e.path()).map_err(|err| anyhow::anyhow!("cannot remove {}: {err}", e.path().display()))?;
    }
    std::fs::remove_dir(dir).map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", dir.display()))
}

/// Remove an evaluation's directory that [`only_an_evaluation`] accepted.
pub fn remove_evaluation(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_name() == STAGING_DIR {
            remove_staging(&e.path())?;
            continue;
        }
        std::fs::remove_file(e.path()).map_err(|err| anyhow::anyhow!("cannot remove {}: {err}", e.path().display()))?;
    }
    std::fs::remove_dir(dir).map_err(|err| anyhow::anyhow!("cannot remove {}: {err}", dir.display()))
}

/// An evaluation that failed after [`EvalOut::begin`] (a write error) takes its staging folder
/// with it; the earlier evaluation's files were never touched.
impl Drop for EvalOut {
    fn drop(&mut self) {
        let staging = self.staging();
        if self._lock.is_some() && staging.is_dir() {
            let _ = remove_staging(&staging);
        }
    }
}

impl EvalOut {
    /// Before the files are written: create the directory, lock it, check it again under the
    /// lock (another evaluation may have written there meanwhile), record what is there in
    /// [`PENDING_FILE`], and sweep the temporaries of killed evaluations.
    pub fn begin(&mut self) -> Result<()> {
        let out = &self.dir;
        crate::util::paths::refuse_dangling(out, "--out")?;
        std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create --out {}: {e}", out.display()))?;
        self._lock = Some(crate::util::dirlock::lock_dir(out, "sae eval --out")?);
        self.previous = check(out, &self.inputs, self.overwrite)?;
        for line in describe(&sweep_stale_temporaries_where(out, is_eval_file)?) {
            eprintln!("{line}");
        }
        // A killed evaluation's staging folder: files of its own only, never moved into place.
        let staging = self.staging();
        if staging.exists() {
            remove_staging(&staging)?;
            eprintln!("note: removed {}, what an evaluation stopped before it finished had written", staging.display());
        }
        std::fs::create_dir(&staging).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", staging.display()))?;
        Ok(())
    }

    /// Where the evaluation writes its files ([`STAGING_DIR`]); [`EvalOut::finish`] moves them.
    pub fn staging(&self) -> PathBuf {
        self.dir.join(STAGING_DIR)
    }

    /// After the evaluation wrote `written` into [`EvalOut::staging`]: move them into place,
    /// `eval.json` last, and remove the files the earlier evaluation listed that this one did not
    /// write.
    pub fn finish(&self, written: &[String]) -> Result<()> {
        let out = &self.dir;
        let mut present: Vec<String> = std::fs::read_dir(out)
            .map_err(|e| anyhow::anyhow!("cannot read --out {}: {e}", out.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != PENDING_FILE && n != STAGING_DIR && !self.previous.contains(n))
            .collect();
        present.sort();
        crate::util::atomic::write_json_atomic(&out.join(PENDING_FILE), &serde_json::json!({ "present": present }))?;
        let staging = self.staging();
        let last = written.iter().filter(|f| *f == super::report::EVAL_FILE);
        for f in written.iter().filter(|f| *f != super::report::EVAL_FILE).chain(last) {
            let (from, to) = (staging.join(f), out.join(f));
            std::fs::rename(&from, &to)
                .map_err(|e| anyhow::anyhow!("cannot move {} to {}: {e}", from.display(), to.display()))?;
        }
        remove_staging(&staging)?;
        for f in self.previous.iter().filter(|f| !written.contains(f)) {
            let p = self.dir.join(f);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => bail!("cannot remove {}, a file of the earlier evaluation there: {e}", p.display()),
            }
        }
        let pending = self.dir.join(PENDING_FILE);
        match std::fs::remove_file(&pending) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => bail!("cannot remove {}: {e}", pending.display()),
            _ => Ok(()),
        }
    }
}
