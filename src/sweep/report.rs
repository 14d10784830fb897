//! Outputs of `sae sweep`: `results.json`, `results.csv`, `report.md` and one PNG per core
//! metric against the first swept option (one line per value of the second).

use super::{Definition, RunMetrics, RunResult, Status};
use crate::eval::report::{markdown_table, text_table, REPORT_FILE};
use crate::plot::{self, Panel, Series};
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::Result;
use serde_json::json;
use std::fmt::Write as _;
use std::path::Path;

pub const RESULTS_JSON: &str = "results.json";
pub const RESULTS_CSV: &str = "results.csv";

/// A metric of the pictures and the table: (file stem, title, value).
type Metric = (&'static str, &'static str, fn(&RunResult) -> Option<f64>);

pub fn metrics() -> Vec<Metric> {
    vec![
        ("fvu", "fraction of variance unexplained (1 - EV)", |r| m(r).map(|m| m.fvu)),
        ("explained_variance", "explained variance", |r| m(r).map(|m| m.explained_variance)),
        ("l0", "L0 (active latents per token)", |r| m(r).map(|m| m.l0)),
        ("frac_dead", "dead fraction (held-out)", |r| m(r).map(|m| m.frac_dead)),
        ("mse", "MSE", |r| m(r).map(|m| m.mse)),
        ("mmcs", "MMCS with the ground truth", |r| m(r).and_then(|m| m.mmcs)),
    ]
}

/// A run's metrics (none for a diverged run: its points are left out of the pictures).
fn m(r: &RunResult) -> Option<&RunMetrics> {
    r.metrics.as_ref()
}

/// The x position of each value of the first option: the numbers when all read as numbers,
/// else their index (named in the axis label).
pub fn x_positions(values: &[String]) -> (Vec<f64>, Option<String>) {
    let nums: Option<Vec<f64>> = values.iter().map(|v| v.parse::<f64>().ok().filter(|x| x.is_finite())).collect();
    match nums {
        Some(n) => (n, None),
        None => (
            (0..values.len()).map(|i| i as f64).collect(),
            Some(values.iter().enumerate().map(|(i, v)| format!("{i}={v}")).collect::<Vec<_>>().join(", ")),
        ),
    }
}

/// The table: one row per run (header first).
pub fn table(def: &Definition, results: &[RunResult]) -> Vec<Vec<String>> {
    let mut head: Vec<String> = def.over.iter().map(|a| a.option.clone()).collect();
    head.extend(["EV", "FVU", "L0", "dead", "MSE", "MMCS", "recovered > 0.9", "status"].map(String::from));
    let mut t = vec![head];
    for r in results {
        let mut row: Vec<String> = r.values.iter().map(|(_, v)| v.clone()).collect();
        match m(r) {
            Some(m) => row.extend([
                format!("{:.4}", m.explained_variance),
                format!("{:.4}", m.fvu),
                format!("{:.2}", m.l0),
                format!("{:.4}", m.frac_dead),
                format!("{:.4e}", m.mse),
                m.mmcs.map(|x| format!("{x:.4}")).unwrap_or_default(),
                m.frac_recovered_0_9.map(|x| format!("{x:.4}")).unwrap_or_default(),
            ]),
            None => row.extend(std::iter::repeat_n("-".to_string(), 7)),
        }
        row.push(r.status.name().to_string());
        t.push(row);
    }
    t
}

/// Full-precision CSV: the swept values, then every metric.
pub fn csv(def: &Definition, results: &[RunResult]) -> String {
    let mut s = String::new();
    let head: Vec<String> = def.over.iter().map(|a| a.option.clone()).collect();
    let _ =
        writeln!(s, "name,{},explained_variance,fvu,l0,frac_dead,mse,mmcs,frac_recovered_0_9,status", head.join(","));
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for r in results {
        let vals: Vec<&str> = r.values.iter().map(|(_, v)| v.as_str()).collect();
        // A diverged run's metrics are empty cells.
        let cells: Vec<String> = match m(r) {
            Some(m) => [Some(m.explained_variance), Some(m.fvu), Some(m.l0), Some(m.frac_dead), Some(m.mse)]
                .into_iter()
                .chain([m.mmcs, m.frac_recovered_0_9])
                .map(opt)
                .collect(),
            None => vec![String::new(); 7],
        };
        let _ = writeln!(s, "\"{}\",{},{},{}", r.name, vals.join(","), cells.join(","), r.status.name());
    }
    s
}

/// Every output in `dir`; returns the text table.
pub fn write(dir: &Path, def: &Definition, results: &[RunResult], draw: bool) -> Result<String> {
    write_json_atomic(
        &dir.join(RESULTS_JSON),
        &json!({
            "saetrain_version": env!("CARGO_PKG_VERSION"),
            "definitions": {
                "explained_variance": "1 - sum_b ||x_b - x_hat_b||^2 / sum_b ||x_b - mean(X)||^2 (sae eval, exported sparsifier)",
                "fvu": "1 - explained_variance",
                "frac_dead": "share of latents that fired on no held-out token",
                "mmcs": "mean over ground-truth directions of the best cosine to a decoder row (synthetic data)",
            },
            "over": def.over,
            "runs": results,
        }),
    )?;
    write_atomic(&dir.join(RESULTS_CSV), csv(def, results).as_bytes())?;
    let mut pics = vec![];
    if draw {
        let x_axis = &def.over[0];
        let (xs, names) = x_positions(&x_axis.values);
        let x_label = match names {
            Some(n) => format!("{} ({n})", x_axis.option),
            None => x_axis.option.clone(),
        };
        for (stem, title, get) in metrics() {
            if results.iter().all(|r| get(r).is_none()) {
                continue;
            }
            let series: Vec<Series> = match def.over.get(1) {
                Some(second) => second
                    .values
                    .iter()
                    .map(|w| Series {
                        label: format!("{}={w}", second.option),
                        points: line(results, &x_axis.values, &xs, get, Some(w)),
                    })
                    .collect(),
                None => {
                    vec![Series { label: title.to_string(), points: line(results, &x_axis.values, &xs, get, None) }]
                }
            };
            let file = format!("sweep_{stem}.png");
            plot::line_panels(
                &dir.join(&file),
                &[Panel {
                    title: format!("{title} against {}", x_axis.option),
                    x_label: x_label.clone(),
                    y_label: stem.to_string(),
                    series,
                    log_y: false,
                }],
            )?;
            pics.push((file, format!("{title} against {}", x_axis.option)));
        }
    }
    let cells = table(def, results);
    let mut md = String::new();
    let grid = def.over.iter().map(|a| format!("`{}` = {}", a.option, a.values.join(", "))).collect::<Vec<_>>();
    let _ = writeln!(md, "# Sweep over {}\n", grid.join(" x "));
    let _ = writeln!(
        md,
        "{} runs, one directory each (`OPTION=VALUE[,OPTION=VALUE]/`); definition in `{}`. Metrics are `sae eval`'s \
         on each run's held-out set with the exported sparsifier. Full precision: `{RESULTS_CSV}`, `{RESULTS_JSON}`.\n",
        results.len(),
        super::SWEEP_FILE
    );
    let _ = writeln!(md, "{}", markdown_table(&cells));
    for r in results {
        if let Status::Diverged(why) = &r.status {
            let _ = writeln!(md, "- `{}` diverged: {why}. It has no metrics and is left out of the pictures.", r.name);
        }
    }
    if results.iter().any(|r| matches!(r.status, Status::Diverged(_))) {
        md.push('\n');
    }
    for (file, caption) in &pics {
        let _ = writeln!(md, "## {caption}\n\n![{caption}]({file})\n");
    }
    write_atomic(&dir.join(REPORT_FILE), md.as_bytes())?;
    Ok(text_table(&cells))
}

/// The (x, metric) points of the runs whose second value is `w` (or all, with one option).
fn line(
    results: &[RunResult],
    x_values: &[String],
    xs: &[f64],
    get: fn(&RunResult) -> Option<f64>,
    w: Option<&String>,
) -> Vec<(f64, f64)> {
    results
        .iter()
        .filter(|r| w.is_none_or(|w| r.values.get(1).is_some_and(|(_, v)| v == w)))
        .filter_map(|r| {
            let i = x_values.iter().position(|v| *v == r.values[0].1)?;
            Some((xs[i], get(r)?))
        })
        .collect()
}
