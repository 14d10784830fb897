//! `sae sweep`: train one run per point of a grid over one or two options, in-process and one
//! after another, into `SWEEP/OPTION=V[,OPTION2=W]/`, then evaluate each and draw the WTA
//! paper's Figure 2 (each core metric against the first option's values, one line per value of
//! the second). The definition (grid + shared config) is stored in `SWEEP/sweep.json`; running
//! the same command again skips finished runs, resumes interrupted ones (`train --resume`'s
//! machinery) and refuses a changed definition. See docs/train.md, "Sweeps".

pub mod report;

use crate::config::TrainConfig;
use crate::eval::run::{evaluate, EvalOptions};
use crate::train::{self, rundir, Diverged, RunOptions, StepHook, CONFIG_FILE, DIVERGED_FILE, SUMMARY_FILE};
use crate::util::atomic::write_json_atomic;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub const SWEEP_FILE: &str = "sweep.json";
/// Options that say how a run is carried out, not what it trains: they may differ between
/// invocations of the same sweep (as on `--resume`) and may not be swept.
pub const HOW_NOT_WHAT: &[&str] = &["out", "quiet", "threads", "prefetch", "backend"];

/// One swept option: its config-file key and its values as written (`k=16,32` -> "k", ["16", "32"]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Axis {
    pub option: String,
    pub values: Vec<String>,
}

impl Axis {
    /// `OPTION=V1,V2,...` (the option as a config key or a flag name, `d-sae` or `d_sae`).
    pub fn parse(s: &str) -> Result<Self> {
        let (name, values) =
            s.split_once('=').with_context(|| format!("--over {s}: expected OPTION=V1,V2,... (e.g. k=16,32,64)"))?;
        let option = name.trim().trim_start_matches("--").replace('-', "_");
        let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
        ensure!(!option.is_empty(), "--over {s}: no option name");
        ensure!(values.iter().all(|v| !v.is_empty()), "--over {s}: an empty value");
        for v in &values {
            ensure!(
                v.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)),
                "--over {s}: value '{v}' is not usable in a directory name (letters, digits, '.', '_', '-', '+')"
            );
            ensure!(values.iter().filter(|w| *w == v).count() == 1, "--over {s}: value '{v}' repeats");
        }
        Ok(Axis { option, values })
    }
}

/// What `sweep.json` holds: the grid and the config every run shares.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Definition {
    pub over: Vec<Axis>,
    pub base: TrainConfig,
}

/// One grid point.
#[derive(Clone, Debug)]
pub struct Point {
    /// (option, value as written), in the order of `--over`.
    pub values: Vec<(String, String)>,
    pub name: String,
    pub cfg: TrainConfig,
}

/// A config value from its command-line spelling, for an option whose default is `current`: the
/// string itself for a string option (enum names, paths), else a number or bool when it reads
/// as one as the command line would (`04` is 4, `1e-3` is 0.001), else the string (so that
/// serde names the type it expected).
fn json_value(raw: &str, current: &Value) -> Value {
    if current.is_string() {
        return Value::String(raw.to_string());
    }
    if let Ok(b) = raw.parse::<bool>() {
        return Value::Bool(b);
    }
    if let Ok(i) = raw.parse::<i64>() {
        return Value::from(i);
    }
    match raw.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
        Some(n) => Value::Number(n),
        None => Value::String(raw.to_string()),
    }
}

/// Whether two command-line values of an option mean the same value (`16` and `16.0` do).
fn same_value(a: &str, b: &str, current: &Value) -> bool {
    match (json_value(a, current), json_value(b, current)) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (x, y) => x == y,
    }
}

impl Definition {
    /// Check the axes against the config's keys and expand the grid (first axis outermost).
    pub fn points(&self, sweep_dir: &Path) -> Result<Vec<Point>> {
        ensure!(
            (1..=2).contains(&self.over.len()),
            "sae sweep takes one or two --over options, not {}",
            self.over.len()
        );
        let base = serde_json::to_value(&self.base)?;
        for a in &self.over {
            ensure!(
                base.get(&a.option).is_some(),
                "--over {}: not a training option (see sae train --help; config-file keys or flag names)",
                a.option
            );
            ensure!(
                !HOW_NOT_WHAT.contains(&a.option.as_str()),
                "--over {}: says how runs are carried out, not what they train; it cannot be swept",
                a.option
            );
            // Two spellings of one value (1e-3 and 0.001) would train the same point twice.
            for (i, v) in a.values.iter().enumerate() {
                let same = a.values[..i].iter().find(|w| same_value(w, v, &base[&a.option]));
                if let Some(w) = same {
                    bail!("--over {}: values '{w}' and '{v}' are the same value; give each once", a.option);
                }
            }
        }
        ensure!(
            self.over.len() < 2 || self.over[0].option != self.over[1].option,
            "--over {} is given twice",
            self.over[0].option
        );
        let second: Vec<Option<&String>> = match self.over.get(1) {
            Some(a) => a.values.iter().map(Some).collect(),
            None => vec![None],
        };
        let mut points = vec![];
        for v0 in &self.over[0].values {
            for v1 in &second {
                let mut values = vec![(self.over[0].option.clone(), v0.clone())];
                if let Some(v1) = v1 {
                    values.push((self.over[1].option.clone(), (*v1).clone()));
                }
                let name = values.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
                let mut c = base.clone();
                for (k, v) in &values {
                    c[k] = json_value(v, &base[k]);
                }
                c["out"] = Value::String(sweep_dir.join(&name).display().to_string());
                let cfg: TrainConfig = match crate::util::json::from_value(c.clone()) {
                    Ok(cfg) => cfg,
                    Err(e) => {
                        // An option with no default (`data`, `init_from`) may be a path that
                        // reads as a number: try those values as written.
                        for (k, v) in &values {
                            if base[k].is_null() {
                                c[k] = Value::String(v.clone());
                            }
                        }
                        crate::util::json::from_value(c).map_err(|_| anyhow::anyhow!("sweep point {name}: {e}"))?
                    }
                };
                cfg.validate().with_context(|| format!("sweep point {name}"))?;
                points.push(Point { values, name, cfg });
            }
        }
        Ok(points)
    }

    /// Why `self` may not continue the sweep defined by `saved`: every difference in the grid
    /// and in the shared options, except [`HOW_NOT_WHAT`].
    pub fn differences(&self, saved: &Definition) -> Result<Vec<String>> {
        let mut out = vec![];
        let show = |o: &[Axis]| {
            o.iter().map(|a| format!("--over {}={}", a.option, a.values.join(","))).collect::<Vec<_>>().join(" ")
        };
        if self.over != saved.over {
            out.push(format!("the grid is {} (the sweep has {})", show(&self.over), show(&saved.over)));
        }
        let (a, b) = (serde_json::to_value(&self.base)?, serde_json::to_value(&saved.base)?);
        let (Value::Object(a), Value::Object(b)) = (a, b) else { bail!("configs are JSON objects") };
        for (k, v) in &a {
            let old = b.get(k).cloned().unwrap_or(Value::Null);
            // The held-out layout is the sweep's own record, not an option ([`prepare`]).
            let same = old == *v || (k == "data" && crate::config::same_data_value(&old, v));
            if !HOW_NOT_WHAT.contains(&k.as_str()) && k != "held_out_windows" && !same {
                out.push(format!("--{} {} (the sweep has {})", k.replace('_', "-"), v, old));
            }
        }
        Ok(out)
    }
}

/// What happened to one run in this invocation.
#[derive(Clone, Debug)]
pub enum Status {
    Trained,
    Resumed,
    /// Finished in an earlier invocation: not trained again.
    Skipped,
    /// Its loss stopped being finite, in this invocation or an earlier one (`diverged.json`):
    /// no metrics, and not trained again.
    Diverged(Diverged),
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Status::Trained => "trained",
            Status::Resumed => "resumed",
            Status::Skipped => "skipped",
            Status::Diverged(_) => "diverged",
        }
    }
}

/// One run's results.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub name: String,
    pub values: Vec<(String, String)>,
    pub path: PathBuf,
    pub status: Status,
    /// Its `sae eval` numbers; `None` for a diverged run.
    pub metrics: Option<RunMetrics>,
}

/// `results.json`'s row: the metrics inline (`null` for a diverged run, whose row says why).
impl Serialize for RunResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &self.name)?;
        m.serialize_entry("values", &self.values)?;
        m.serialize_entry("path", &self.path)?;
        m.serialize_entry("status", self.status.name())?;
        if let Status::Diverged(why) = &self.status {
            m.serialize_entry("diverged", why)?;
        }
        let metrics = serde_json::to_value(&self.metrics).map_err(serde::ser::Error::custom)?;
        for key in RunMetrics::KEYS {
            m.serialize_entry(key, metrics.get(key).unwrap_or(&Value::Null))?;
        }
        m.end()
    }
}

/// A run's `sae eval` numbers (exported sparsifier, held-out set).
#[derive(Clone, Debug, Serialize)]
pub struct RunMetrics {
    pub explained_variance: f64,
    /// Fraction of variance unexplained, `nmse = 1 - explained_variance`.
    pub fvu: f64,
    pub l0: f64,
    pub frac_dead: f64,
    pub mse: f64,
    /// Synthetic data: mean max cosine of the ground-truth directions to the decoder rows.
    pub mmcs: Option<f64>,
    pub frac_recovered_0_9: Option<f64>,
}

impl RunMetrics {
    /// The keys of `results.json`'s rows, in order.
    pub const KEYS: [&'static str; 7] =
        ["explained_variance", "fvu", "l0", "frac_dead", "mse", "mmcs", "frac_recovered_0_9"];
}

/// The sweep directory: created, locked, its definition stored or checked. Also returns the
/// held-out layout every point uses (`held_out_windows`, config.rs), recorded in `sweep.json`:
/// whole token windows for a new sweep; for a sweep whose `sweep.json` has no such key (defined
/// before it was recorded), the layout of its started points ([`started_layout`]), so that a
/// point trained now is held out like the points trained before and their metrics stay
/// comparable.
pub fn prepare(dir: &Path, def: &Definition) -> Result<(rundir::RunLock, bool)> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {}: exists and is not a directory", dir.display());
    }
    crate::util::paths::refuse_dangling(dir, "--out")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock = rundir::lock(dir)?;
    let file = dir.join(SWEEP_FILE);
    let mut windows = true;
    if file.is_file() {
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let saved: Definition = crate::util::json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a sweep definition: {e}", file.display()))?;
        let diff = def.differences(&saved)?;
        if !diff.is_empty() {
            bail!(
                "{} holds a sweep with another definition ({}): continuing it would mix results of different \
                 settings; run it as it was defined (see {}) or choose another --out",
                dir.display(),
                diff.join("; "),
                file.display()
            );
        }
        windows = match saved.base.held_out_windows {
            Some(w) => w,
            None => started_layout(dir)?.unwrap_or(true),
        };
    } else {
        let others: Vec<String> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != rundir::LOCK_FILE && !crate::util::atomic::is_our_temporary(n))
            .collect();
        if !others.is_empty() {
            bail!(
                "--out {} is not empty ({}) and holds no {SWEEP_FILE}: choose another --out",
                dir.display(),
                others.join(", ")
            );
        }
    }
    // Temporaries of a sweep killed while writing its own files (sweep.json, the results, the
    // report and its pictures): train, export and eval sweep theirs at start-up too.
    let ours = |n: &str| {
        [SWEEP_FILE, report::RESULTS_CSV, report::RESULTS_JSON, crate::eval::report::REPORT_FILE].contains(&n)
            || n.ends_with(".png")
    };
    for line in crate::util::sweep::describe(&crate::util::sweep::sweep_stale_temporaries_where(dir, ours)?) {
        eprintln!("{line}");
    }
    let mut def = def.clone();
    def.base.held_out_windows = Some(windows);
    write_json_atomic(&file, &def)?;
    Ok((lock, windows))
}

/// The held-out layout of the points already started in a sweep whose `sweep.json` does not
/// record one: blocks (false) if any point has no `held_out_windows` in its config.json (trained
/// before the layout existed), else windows; None when no point has started.
fn started_layout(dir: &Path) -> Result<Option<bool>> {
    let mut layout = None;
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?.flatten() {
        let cfg = e.path().join(CONFIG_FILE);
        if cfg.is_file() {
            let w = TrainConfig::load(&cfg)?.held_out_windows == Some(true);
            layout = Some(layout.unwrap_or(true) && w);
        }
    }
    Ok(layout)
}

/// How the finished run `saved` differs from the sweep point `expected` in what it trains
/// (its length included, which a resume may change but a finished point may not).
fn point_differences(saved: &TrainConfig, expected: &TrainConfig) -> Result<Vec<String>> {
    let mut out = vec![];
    if saved.total_steps() != expected.total_steps() {
        out.push(format!("{} steps (the point has {})", saved.total_steps(), expected.total_steps()));
    }
    let (a, b) = (train::checkpoint::trained_config(saved)?, train::checkpoint::trained_config(expected)?);
    let (Value::Object(a), Value::Object(b)) = (a, b) else { bail!("configs are JSON objects") };
    for (k, v) in &a {
        // Set by the run (the data's width, the held-out layout), not by the point.
        if ["d_in", "held_out_windows"].contains(&k.as_str()) || HOW_NOT_WHAT.contains(&k.as_str()) {
            continue;
        }
        let want = b.get(k).cloned().unwrap_or(Value::Null);
        if *v != want {
            out.push(format!("--{} {} (the point has {})", k.replace('_', "-"), v, want));
        }
    }
    if !crate::config::same_data_value(&serde_json::to_value(&saved.data)?, &serde_json::to_value(&expected.data)?) {
        out.push(format!("--data {:?} (the point has {:?})", saved.data, expected.data));
    }
    Ok(out)
}

/// Train (or skip, or resume) every point, then evaluate each run.
/// `on_step` is each run's [`train::StepHook`]: an error from it stops the run (with a checkpoint)
/// and the sweep.
pub fn run(
    dir: &Path,
    def: &Definition,
    on_step: Option<StepHook>,
    log: &mut dyn FnMut(String),
) -> Result<Vec<RunResult>> {
    let mut points = def.points(dir)?;
    let (_lock, windows) = prepare(dir, def)?;
    for p in &mut points {
        p.cfg.held_out_windows = Some(windows);
    }
    let n = points.len();
    let mut statuses = vec![];
    for (i, p) in points.iter().enumerate() {
        let run_dir = &p.cfg.out;
        let diverged_file = run_dir.join(DIVERGED_FILE);
        let status = if run_dir.join(SUMMARY_FILE).is_file() {
            // Finished, but by this sweep? A run trained there by hand with other settings would
            // put its numbers in this point's row.
            let saved = TrainConfig::load(&run_dir.join(CONFIG_FILE)).with_context(|| {
                format!("sweep point {}: {} holds a summary but no run config", p.name, run_dir.display())
            })?;
            let diff = point_differences(&saved, &p.cfg)?;
            if !diff.is_empty() {
                bail!(
                    "sweep point {}: {} holds a finished run with other settings than this point's ({}): not this \
                     sweep's run; move it away (the sweep then trains the point) or choose another sweep directory",
                    p.name,
                    run_dir.display(),
                    diff.join(", ")
                );
            }
            log(format!("[{}/{n}] {}: finished earlier, skipped", i + 1, p.name));
            Status::Skipped
        } else if diverged_file.is_file() {
            // Training is deterministic: the same settings would diverge again.
            let text = std::fs::read_to_string(&diverged_file)
                .with_context(|| format!("cannot read {}", diverged_file.display()))?;
            let why: Diverged = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a record of a diverged run", diverged_file.display()))?;
            log(format!(
                "[{}/{n}] {}: diverged earlier ({why}), not trained again (remove {} to retry)",
                i + 1,
                p.name,
                run_dir.display()
            ));
            Status::Diverged(why)
        } else if run_dir.join(CONFIG_FILE).is_file() {
            log(format!("[{}/{n}] {}: interrupted earlier, resuming", i + 1, p.name));
            let saved = TrainConfig::load(&run_dir.join(CONFIG_FILE))?;
            // A started run keeps the held-out layout its config.json records (train::run_with).
            let given: Map<String, Value> = match serde_json::to_value(&p.cfg)? {
                Value::Object(m) => m.into_iter().filter(|(k, v)| !v.is_null() && k != "held_out_windows").collect(),
                _ => Map::new(),
            };
            let changes = rundir::resume_changes(&saved, &given).with_context(|| format!("resuming {}", p.name))?;
            let opts = RunOptions { resume_changes: changes, on_step: on_step.clone(), ..Default::default() };
            outcome(train::run_with(p.cfg.clone(), Some(run_dir), &opts), Status::Resumed, &p.name, log)?
        } else {
            log(format!("[{}/{n}] {}: training", i + 1, p.name));
            let opts = RunOptions { on_step: on_step.clone(), ..Default::default() };
            outcome(train::run_with(p.cfg.clone(), None, &opts), Status::Trained, &p.name, log)?
        };
        statuses.push(status);
    }
    let mut results = vec![];
    for (p, status) in points.iter().zip(statuses) {
        let metrics = match status {
            Status::Diverged(_) => None,
            _ => {
                let e = evaluate(&p.cfg.out, &p.name, &EvalOptions::default());
                let e = crate::util::context::naming(e, "evaluating", &p.cfg.out)?;
                Some(RunMetrics {
                    explained_variance: e.exported.explained_variance,
                    fvu: e.exported.nmse,
                    l0: e.exported.l0,
                    frac_dead: e.exported.frac_dead,
                    mse: e.exported.mse,
                    mmcs: e.recovery.map(|r| r.mmcs),
                    frac_recovered_0_9: e.recovery.map(|r| r.frac_above_0_9),
                })
            }
        };
        results.push(RunResult {
            name: p.name.clone(),
            values: p.values.clone(),
            path: p.cfg.out.clone(),
            status,
            metrics,
        });
    }
    Ok(results)
}

/// A run's status from what `train::run_with` returned: a diverged run is a result (recorded,
/// and the sweep goes on); any other error stops the sweep.
fn outcome(r: Result<train::Summary>, done: Status, name: &str, log: &mut dyn FnMut(String)) -> Result<Status> {
    match r {
        Ok(_) => Ok(done),
        Err(e) => match e.downcast_ref::<Diverged>() {
            Some(why) => {
                log(format!("{name}: {why}; recorded as diverged, going on"));
                Ok(Status::Diverged(why.clone()))
            }
            None => Err(e.context(format!("sweep run {name}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_the_command_line_would() {
        let def = Definition {
            over: vec![Axis::parse("k=04,16").unwrap(), Axis::parse("data=01").unwrap()],
            base: TrainConfig { data: Some("x".into()), ..TrainConfig::default() },
        };
        let points = def.points(Path::new("sw")).unwrap();
        assert_eq!(points.iter().map(|p| p.cfg.k).collect::<Vec<_>>(), [4, 16]);
        // A string option keeps the text as written.
        assert_eq!(points[0].cfg.data.as_deref(), Some(std::path::Path::new("01")));
        assert_eq!(points[0].name, "k=04,data=01");
        // An option without a default (`data` null) reads "01" as 1 first, and its path on retry.
        let def = Definition { over: vec![Axis::parse("data=01,02").unwrap()], base: TrainConfig::default() };
        assert!(def.base.data.is_none());
        let points = def.points(Path::new("sw")).unwrap();
        assert_eq!(points[1].cfg.data.as_deref(), Some(std::path::Path::new("02")));
        let num = Value::from(0.1);
        assert!(same_value("1e-3", "0.001", &num) && same_value("16", "16.0", &num));
        assert!(!same_value("1e-3", "1e-4", &num));
        assert_eq!(json_value("true", &Value::Null), Value::Bool(true));
        assert_eq!(json_value("nan", &num), Value::String("nan".into()));
        assert_eq!(json_value("topk", &Value::String("wta".into())), Value::String("topk".into()));
    }
}
