//! Zipf-Mandelbrot fit of a run's feature densities (the MC/FC paper, Fig. 3), in the form the
//! Zipf budgets use (`sparsify::budget::zipf_continuous`, docs/SPEC.md): the latent of rank r
//! (1 = most frequent) has density `p_r = c / (r + beta)^alpha`, so the fitted alpha and beta are
//! exactly what `--budget zipf --zipf-alpha --zipf-beta` (and `--zipf-from RUN`) consume.
//!
//! Method: the held-out densities sorted descending; dead latents (density 0) are left out (the
//! log is undefined; they sort last, so the live latents keep ranks 1..n). For a fixed beta,
//! ordinary least squares of `ln p_r` on `ln(r + beta)` gives `-alpha` (slope) and `ln c`
//! (intercept) in closed form; beta minimises the residual sum of squares over `[0, 10 n]`: a
//! grid of 0 and 240 geometric points from 1e-3, then golden-section search between the best
//! point's neighbours. R^2 (`1 - SS_res / SS_tot` of `ln p`) is reported on the whole live curve
//! and on its middle segment, ranks `floor(n/10) + 1 ..= n - floor(n/10)` (the same fit, scored
//! away from the few head latents and from the tail, where densities are quantised at 1/T).

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The fit of one density-rank curve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ZipfFit {
    pub alpha: f64,
    pub beta: f64,
    /// c in `p_r = c / (r + beta)^alpha`.
    pub scale: f64,
    /// R^2 of `ln p` over all live latents (`None` when they all have the same density).
    pub r2: Option<f64>,
    /// R^2 over the middle ranks `middle_ranks` (inclusive, 1-based).
    pub r2_middle: Option<f64>,
    pub middle_ranks: (usize, usize),
    /// Latents in the fit (density > 0) and latents left out (density 0).
    pub live: usize,
    pub dead: usize,
    /// The best beta is the search's upper bound `10 n` (the curve is closer to exponential
    /// than to any power law there).
    pub beta_at_bound: bool,
}

/// Closed-form least squares of `y` on `ln(r + beta)`, r = 1..n: (slope, intercept, SSE).
fn ols(y: &[f64], beta: f64) -> (f64, f64, f64) {
    let n = y.len() as f64;
    let x = |i: usize| (i as f64 + 1.0 + beta).ln();
    let mx = (0..y.len()).map(x).sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxx, mut sxy) = (0f64, 0f64);
    for (i, yi) in y.iter().enumerate() {
        let a = x(i) - mx;
        sxx += a * a;
        sxy += a * (yi - my);
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let intercept = my - slope * mx;
    // The residuals summed directly (not syy - slope sxy, which cancels near a perfect fit).
    let sse = y.iter().enumerate().map(|(i, yi)| (yi - intercept - slope * x(i)).powi(2)).sum();
    (slope, intercept, sse)
}

/// `1 - sum (y - yhat)^2 / sum (y - mean y)^2`; `None` when `y` is constant.
pub fn r_squared(y: &[f64], yhat: &[f64]) -> Option<f64> {
    assert_eq!(y.len(), yhat.len());
    if y.is_empty() {
        return None;
    }
    if y.iter().all(|v| *v == y[0]) {
        return None;
    }
    let m = y.iter().sum::<f64>() / y.len() as f64;
    let tot: f64 = y.iter().map(|v| (v - m) * (v - m)).sum();
    let res: f64 = y.iter().zip(yhat).map(|(a, b)| (a - b) * (a - b)).sum();
    (tot > 0.0).then(|| 1.0 - res / tot)
}

/// The middle segment of n ranks: `floor(n/10) + 1 ..= n - floor(n/10)`.
pub fn middle(n: usize) -> (usize, usize) {
    (n / 10 + 1, n - n / 10)
}

/// Fit `p_r = c / (r + beta)^alpha` to `density` (any order; zeros are left out). `None` with
/// fewer than 3 live latents. Equal densities give alpha 0, beta 0 and no R^2.
pub fn fit(density: &[f64]) -> Option<ZipfFit> {
    let mut live: Vec<f64> = density.iter().copied().filter(|p| *p > 0.0 && p.is_finite()).collect();
    let n = live.len();
    if n < 3 {
        return None;
    }
    live.sort_by(|a, b| b.total_cmp(a));
    let y: Vec<f64> = live.iter().map(|p| p.ln()).collect();
    let (m0, m1) = middle(n);
    if live.iter().all(|p| *p == live[0]) {
        // Equal densities (uniform budgets): the flat law, alpha 0, and no R^2 (nothing varies).
        let f = ZipfFit {
            alpha: 0.0,
            beta: 0.0,
            scale: live[0],
            r2: None,
            r2_middle: None,
            middle_ranks: (m0, m1),
            live: n,
            dead: density.len() - n,
            beta_at_bound: false,
        };
        return Some(f);
    }
    let sse = |beta: f64| ols(&y, beta).2;

    let hi = 10.0 * n as f64;
    let grid: Vec<f64> =
        std::iter::once(0.0).chain((0..=240).map(|k| 1e-3 * (hi / 1e-3).powf(k as f64 / 240.0))).collect();
    let best = (0..grid.len()).min_by(|&a, &b| sse(grid[a]).total_cmp(&sse(grid[b]))).expect("grid");
    let (mut lo, mut up) = (grid[best.saturating_sub(1)], grid[(best + 1).min(grid.len() - 1)]);
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (up - g * (up - lo), lo + g * (up - lo));
    let (mut fc, mut fd) = (sse(c), sse(d));
    for _ in 0..200 {
        if up - lo <= 1e-13 * up.max(1e-12) {
            break;
        }
        if fc < fd {
            up = d;
            (d, fd) = (c, fc);
            c = up - g * (up - lo);
            fc = sse(c);
        } else {
            lo = c;
            (c, fc) = (d, fd);
            d = lo + g * (up - lo);
            fd = sse(d);
        }
    }
    // The best of the bracket's points (the grid point itself may beat the refinement's end).
    let beta = [grid[best], c, d, lo, up].into_iter().min_by(|a, b| sse(*a).total_cmp(&sse(*b))).expect("points");
    let (slope, intercept, _) = ols(&y, beta);
    let yhat: Vec<f64> = (0..n).map(|i| intercept + slope * (i as f64 + 1.0 + beta).ln()).collect();
    Some(ZipfFit {
        alpha: -slope,
        beta,
        scale: intercept.exp(),
        r2: r_squared(&y, &yhat),
        r2_middle: r_squared(&y[m0 - 1..m1], &yhat[m0 - 1..m1]),
        middle_ranks: (m0, m1),
        live: n,
        dead: density.len() - n,
        beta_at_bound: beta >= hi * (1.0 - 1e-9),
    })
}

/// Log-log picture of each curve's density by rank with its fit.
pub fn picture(path: &Path, curves: &[(String, &[f64], &ZipfFit)]) -> Result<()> {
    let mut series = vec![];
    for (label, density, f) in curves {
        let mut live: Vec<f64> = density.iter().copied().filter(|p| *p > 0.0).collect();
        live.sort_by(|a, b| b.total_cmp(a));
        let pts = live.iter().enumerate().map(|(i, p)| ((i + 1) as f64, *p)).collect();
        let fit = (1..=live.len()).map(|r| (r as f64, f.scale / (r as f64 + f.beta).powf(f.alpha))).collect();
        let r2 = f.r2.map(|v| format!("{v:.3}")).unwrap_or("-".into());
        series.push(crate::plot::Series { label: format!("{label} ({} dead left out)", f.dead), points: pts });
        series.push(crate::plot::Series {
            label: format!("fit: alpha {:.3}, beta {:.2}, R^2 {r2}", f.alpha, f.beta),
            points: fit,
        });
    }
    let panel = crate::plot::Panel {
        title: "feature density by rank (Zipf-Mandelbrot fit c / (r + beta)^alpha)".into(),
        x_label: "rank r (most frequent first)".into(),
        y_label: "density".into(),
        series,
        log_y: true,
    };
    crate::plot::log_log(path, &panel)
}

/// Where `sae eval RUN` writes by default, and so where `--zipf-from RUN` looks.
pub fn eval_json_of(run: &Path) -> PathBuf {
    run.join("eval").join(super::report::EVAL_FILE)
}

/// The fit of `run` from its `eval/eval.json` (when it holds one for this run and is newer than
/// the run's weights), else by evaluating the run on its held-out split. Returns the fit and
/// where it came from, in words.
pub fn fit_of_run(run: &Path) -> Result<(ZipfFit, String)> {
    let dir = crate::export::load::checkpoint_dir(run);
    if let Some(f) = from_eval_json(&dir)? {
        return Ok((f, format!("the fit in {}", eval_json_of(&dir).display())));
    }
    let e = super::run::evaluate(&dir, "zipf-from", &super::run::EvalOptions::default())
        .with_context(|| format!("--zipf-from {}: evaluating the run", run.display()))?;
    let Some(f) = e.zipf_fit else {
        bail!(
            "--zipf-from {}: the run has {} live latents on {} held-out tokens; a Zipf fit needs at least 3",
            run.display(),
            e.exported.alive,
            e.exported.tokens
        )
    };
    Ok((f, format!("a fit of {}'s densities on {} held-out tokens", run.display(), e.exported.tokens)))
}

fn from_eval_json(dir: &Path) -> Result<Option<ZipfFit>> {
    let p = eval_json_of(dir);
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(None) };
    // Stale when the weights were written after it (a resumed or overwritten run).
    let mtime = |q: &Path| std::fs::metadata(q).and_then(|m| m.modified()).ok();
    let weights = dir.join(crate::export::saelens::WEIGHTS_FILE);
    if let (Some(e), Some(w)) = (mtime(&p), mtime(&weights)) {
        if e < w {
            return Ok(None);
        }
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))?;
    let runs = v.get("runs").and_then(|r| r.as_array()).cloned().unwrap_or_default();
    let want = dir.canonicalize().unwrap_or(dir.to_path_buf());
    let same = |r: &serde_json::Value| {
        r.get("path").and_then(|p| p.as_str()).is_some_and(|s| Path::new(s).canonicalize().ok().as_ref() == Some(&want))
    };
    let entry = runs.iter().find(|r| same(r)).or(if runs.len() == 1 { runs.first() } else { None });
    match entry.and_then(|r| r.get("zipf_fit")).filter(|f| !f.is_null()) {
        Some(f) => Ok(Some(
            serde_json::from_value(f.clone()).with_context(|| format!("{}: unreadable zipf_fit", p.display()))?,
        )),
        None => Ok(None),
    }
}

/// `--zipf-from RUN`: set `cfg.zipf_alpha` and `cfg.zipf_beta` from RUN's fit. Values that a
/// config file set (they differ from the defaults) must agree with the fit; the command line's
/// `--zipf-alpha`/`--zipf-beta` conflict with `--zipf-from` in clap already. Returns the line
/// to log, or `None` without `--zipf-from`.
pub fn apply_zipf_from(cfg: &mut crate::config::TrainConfig) -> Result<Option<String>> {
    let Some(run) = cfg.zipf_from.clone() else { return Ok(None) };
    let uses_zipf = cfg.budget == crate::config::BudgetKind::Zipf && cfg.sparsifier.per_column()
        || cfg.aux_kinds().contains(&crate::config::AuxKind::AuxZipf);
    ensure!(
        uses_zipf,
        "--zipf-from {}: this run uses no Zipf law (it sets --budget zipf for wta/hybrid, and aux_zipf's dying rule)",
        run.display()
    );
    let (f, source) = fit_of_run(&run)?;
    ensure!(
        f.alpha > 0.0 && f.alpha.is_finite() && f.beta.is_finite(),
        "--zipf-from {}: the fitted alpha is {} (beta {}); Zipf budgets need alpha > 0",
        run.display(),
        f.alpha,
        f.beta
    );
    let def = crate::config::TrainConfig::default();
    for (name, set, default, fitted) in
        [("zipf_alpha", cfg.zipf_alpha, def.zipf_alpha, f.alpha), ("zipf_beta", cfg.zipf_beta, def.zipf_beta, f.beta)]
    {
        if set != default && (set - fitted).abs() > 1e-9 * fitted.abs().max(1.0) {
            bail!(
                "--zipf-from {} gives {name} {fitted} but the config sets {name} {set}: give one or the other",
                run.display()
            );
        }
    }
    cfg.zipf_alpha = f.alpha;
    cfg.zipf_beta = f.beta;
    Ok(Some(format!(
        "--zipf-from {}: zipf_alpha {} zipf_beta {} ({source}; R^2 {})",
        run.display(),
        f.alpha,
        f.beta,
        f.r2.map(|v| format!("{v:.4}")).unwrap_or("-".into())
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn middle_segment_bounds() {
        assert_eq!(middle(10), (2, 9));
        assert_eq!(middle(3), (1, 3));
        assert_eq!(middle(105), (11, 95));
    }

    #[test]
    fn too_few_live_latents_give_no_fit() {
        assert!(fit(&[0.5, 0.0, 0.1]).is_none());
    }
}
