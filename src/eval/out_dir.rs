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
const RUN_EVAL_DIRS: [&str; 2] = ["eval", "eval-history"];

/// An output directory checked for an evaluation, with what an earlier one there wrote.
pub struct EvalOut {
    pub dir: PathBuf,
    previous: Vec<String>,
}

/// Whether `name` is a file an evaluation writes (and so may replace or remove).
fn is_eval_file(name: &str) -> bool {
    !name.contains('/') && (name == EVAL_FILE || name == REPORT_FILE || name.ends_with(".png"))
}

fn holds_run(dir: &Path) -> bool {
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

/// Check `out` for an evaluation of `inputs` (see the module's rules), create it, and sweep the
/// temporaries a killed evaluation left there.
pub fn prepare(out: &Path, inputs: &[PathBuf], overwrite: bool) -> Result<EvalOut> {
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
    let previous = match earlier_evaluation(out) {
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
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create --out {}: {e}", out.display()))?;
    for line in describe(&sweep_stale_temporaries_where(out, is_eval_file)?) {
        eprintln!("{line}");
    }
    Ok(EvalOut { dir: out.to_path_buf(), previous })
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
        e.file_type().is_ok_and(|t| t.is_file())
            && (is_eval_file(&n) || crate::util::atomic::parse_temporary(&n).is_some_and(|(t, _)| is_eval_file(t)))
    })
}

/// Remove an evaluation's directory that [`only_an_evaluation`] accepted.
pub fn remove_evaluation(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        std::fs::remove_file(e.path()).map_err(|err| anyhow::anyhow!("cannot remove {}: {err}", e.path().display()))?;
    }
    std::fs::remove_dir(dir).map_err(|err| anyhow::anyhow!("cannot remove {}: {err}", dir.display()))
}

impl EvalOut {
    /// After the evaluation wrote `written`: remove the files the earlier evaluation listed that
    /// this one did not write.
    pub fn finish(&self, written: &[String]) -> Result<()> {
        for f in self.previous.iter().filter(|f| !written.contains(f)) {
            let p = self.dir.join(f);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => bail!("cannot remove {}, a file of the earlier evaluation there: {e}", p.display()),
            }
        }
        Ok(())
    }
}
