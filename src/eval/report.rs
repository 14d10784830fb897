//! Outputs of `sae eval`: `eval.json` (every number), PNG pictures, `report.md` (the table and
//! a link to every picture) and a short table on stdout.

use super::run::SaeEval;
use crate::plot::{self, HistSpec, Panel, Sample, Series};
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::{Context, Result};
use serde_json::json;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub const EVAL_FILE: &str = "eval.json";
pub const REPORT_FILE: &str = "report.md";

/// One column of the table: an SAE with its exported or its training sparsifier.
struct Column<'a> {
    title: String,
    e: &'a SaeEval,
    training: bool,
}

fn columns(evals: &[SaeEval]) -> Vec<Column<'_>> {
    let mut cols = vec![];
    for e in evals {
        let exported = Column { title: format!("{} ({})", e.label, e.architecture), e, training: false };
        // The training sparsifier's column, where it would show other numbers than the exported
        // one (topk and relu runs give the same, up to roundings the table does not print;
        // eval.json has both either way).
        let name = e.training_sparsifier.clone().unwrap_or_default();
        let training = Column { title: format!("{} (train: {name})", e.label), e, training: true };
        // (Rows the training column leaves empty, the weights', do not count.)
        let differs = e.training.is_some()
            && rows()
                .iter()
                .any(|(_, cell)| matches!((cell(&exported), cell(&training)), (Some(a), Some(b)) if a != b));
        cols.push(exported);
        if differs {
            cols.push(training);
        }
    }
    cols
}

type Row = (&'static str, fn(&Column) -> Option<String>);

fn f(v: f64, prec: usize) -> Option<String> {
    Some(format!("{v:.prec$}"))
}

fn ce(c: &Column, key: &str) -> Option<String> {
    if c.training {
        return None;
    }
    c.e.ce_eval.as_ref()?.get(key)?.as_f64().map(|v| format!("{v:.4}"))
}

fn rows() -> Vec<Row> {
    vec![
        ("tokens", |c| Some(metrics(c).tokens.to_string())),
        ("L0", |c| f(metrics(c).l0, 2)),
        ("L1", |c| f(metrics(c).l1, 3)),
        ("MSE", |c| Some(format!("{:.4e}", metrics(c).mse))),
        ("NMSE", |c| f(metrics(c).nmse, 4)),
        ("explained variance", |c| f(metrics(c).explained_variance, 4)),
        ("EV legacy (SAEBench)", |c| f(metrics(c).explained_variance_legacy, 4)),
        ("cosine(x, x_hat)", |c| f(metrics(c).cosine, 4)),
        ("l2 ratio", |c| f(metrics(c).l2_ratio, 4)),
        ("rel. recon. bias", |c| f(metrics(c).relative_reconstruction_bias, 4)),
        ("alive fraction", |c| f(metrics(c).frac_alive, 4)),
        ("dead latents", |c| Some(format!("{} / {}", metrics(c).dead, metrics(c).d_sae))),
        ("density > 1%", |c| f(metrics(c).frac_density_above_1pct, 4)),
        ("density > 10%", |c| f(metrics(c).frac_density_above_10pct, 4)),
        ("alignment mean", |c| (!c.training).then(|| format!("{:.4}", c.e.weights.summary.alignment_mean))),
        ("alignment > 0.9", |c| (!c.training).then(|| format!("{:.4}", c.e.weights.summary.alignment_frac_above_0_9))),
        ("|alignment| < 0.1", |c| {
            (!c.training).then(|| format!("{:.4}", c.e.weights.summary.alignment_frac_abs_below_0_1))
        }),
        ("cos(enc,dec) mean", |c| (!c.training).then(|| format!("{:.4}", c.e.weights.summary.enc_dec_cosine_mean))),
        ("cos(enc,dec) > 0.9", |c| {
            (!c.training).then(|| format!("{:.4}", c.e.weights.summary.enc_dec_cosine_frac_above_0_9))
        }),
        ("|cos(enc,dec)| < 0.1", |c| {
            (!c.training).then(|| format!("{:.4}", c.e.weights.summary.enc_dec_cosine_frac_abs_below_0_1))
        }),
        ("MMCS (ground truth)", |c| c.e.recovery.filter(|_| !c.training).map(|r| format!("{:.4}", r.mmcs))),
        ("recovered > 0.9", |c| c.e.recovery.filter(|_| !c.training).map(|r| format!("{:.4}", r.frac_above_0_9))),
        ("Zipf alpha", |c| c.e.zipf_fit.as_ref().filter(|_| !c.training).map(|z| format!("{:.4}", z.alpha))),
        ("Zipf beta", |c| c.e.zipf_fit.as_ref().filter(|_| !c.training).map(|z| format!("{:.3}", z.beta))),
        ("Zipf R^2 (all / middle)", |c| {
            let r = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or("-".into());
            c.e.zipf_fit.as_ref().filter(|_| !c.training).map(|z| format!("{} / {}", r(z.r2), r(z.r2_middle)))
        }),
        ("MCS dec mean / median", |c| against(c).map(|a| mcs_pair(a.decoder.summary.mean, a.decoder.summary.median))),
        ("MCS dec > 0.9 / < 0.5", |c| {
            against(c).map(|a| mcs_pair(a.decoder.summary.frac_above_0_9, a.decoder.summary.frac_below_0_5))
        }),
        ("MCS dec bimodality", |c| {
            against(c).and_then(|a| a.decoder.summary.shape.map(|s| f(s.bimodality_coefficient, 4).unwrap()))
        }),
        ("MCS enc mean / median", |c| against(c).map(|a| mcs_pair(a.encoder.summary.mean, a.encoder.summary.median))),
        ("MCS enc > 0.9 / < 0.5", |c| {
            against(c).map(|a| mcs_pair(a.encoder.summary.frac_above_0_9, a.encoder.summary.frac_below_0_5))
        }),
        ("MCS enc bimodality", |c| {
            against(c).and_then(|a| a.encoder.summary.shape.map(|s| f(s.bimodality_coefficient, 4).unwrap()))
        }),
        ("corr(MCS dec, alignment)", |c| {
            against(c).and_then(|a| a.decoder_mcs_vs_alignment).map(|r| format!("{r:.4}"))
        }),
        ("CE loss score", |c| ce(c, "ce_loss_score")),
        ("KL score", |c| ce(c, "kl_div_score")),
        ("CE loss clean", |c| ce(c, "ce_loss_without_sae")),
        ("CE loss with SAE", |c| ce(c, "ce_loss_with_sae")),
        ("CE loss zero-ablated", |c| ce(c, "ce_loss_with_ablation")),
        ("CE loss mean-ablated", |c| ce(c, "ce_loss_with_mean_ablation")),
        ("CE score vs mean abl.", |c| ce(c, "ce_loss_score_mean_ablation")),
        ("KL with SAE", |c| ce(c, "kl_div_with_sae")),
    ]
}

fn against<'a>(c: &'a Column) -> Option<&'a super::mcs::Against> {
    c.e.against.as_ref().filter(|_| !c.training)
}

fn mcs_pair(a: f64, b: f64) -> String {
    format!("{a:.4} / {b:.4}")
}

fn metrics<'a>(c: &'a Column) -> &'a crate::metrics::recon::ReconMetrics {
    match (c.training, &c.e.training) {
        (true, Some(t)) => t,
        _ => &c.e.exported,
    }
}

/// The table as cells: header row, then one row per metric that some column has.
pub fn table(evals: &[SaeEval]) -> Vec<Vec<String>> {
    let cols = columns(evals);
    let mut out = vec![std::iter::once("metric".to_string()).chain(cols.iter().map(|c| c.title.clone())).collect()];
    for (name, get) in rows() {
        let cells: Vec<Option<String>> = cols.iter().map(get).collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        out.push(
            std::iter::once(name.to_string())
                .chain(cells.into_iter().map(|c| c.unwrap_or_else(|| "".into())))
                .collect(),
        );
    }
    out
}

/// Plain-text table with aligned columns.
pub fn text_table(cells: &[Vec<String>]) -> String {
    let n = cells.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..n).map(|j| cells.iter().filter_map(|r| r.get(j)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for (i, r) in cells.iter().enumerate() {
        for (j, c) in r.iter().enumerate() {
            if j == 0 {
                let _ = write!(s, "{c:<w$}", w = widths[j]);
            } else {
                let _ = write!(s, "  {c:>w$}", w = widths[j]);
            }
        }
        s.push('\n');
        if i == 0 {
            s.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * n.saturating_sub(1)));
            s.push('\n');
        }
    }
    s
}

pub fn markdown_table(cells: &[Vec<String>]) -> String {
    let mut s = String::new();
    for (i, r) in cells.iter().enumerate() {
        let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(s, "| {} |", cells.join(" | "));
        if i == 0 {
            let _ = writeln!(
                s,
                "|{}",
                r.iter().enumerate().map(|(j, _)| if j == 0 { "---|" } else { "---:|" }).collect::<String>()
            );
        }
    }
    s
}

/// Distinct labels for the inputs: their directory names, suffixed where they repeat.
pub fn labels(paths: &[PathBuf]) -> Vec<String> {
    let base: Vec<String> = paths
        .iter()
        .map(|p| {
            let d = crate::export::load::checkpoint_dir(p);
            let d = d.canonicalize().unwrap_or(d);
            d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "sae".into())
        })
        .collect();
    let mut labels: Vec<String> = base
        .iter()
        .enumerate()
        .map(|(i, b)| if base.iter().filter(|x| *x == b).count() > 1 { format!("{b}-{}", i + 1) } else { b.clone() })
        .map(|s| s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect())
        .collect();
    // Numbering can meet another input's own name (`a/run`, `b/run` and `run-1` give run-1
    // twice), as can two names that differ only in replaced characters: a label names its
    // pictures, so a second one would overwrite the first's. Later ones get a further number.
    for i in 0..labels.len() {
        let mut n = 2;
        let stem = labels[i].clone();
        while labels[..i].contains(&labels[i]) || labels[i + 1..].contains(&labels[i]) && labels[i] != stem {
            labels[i] = format!("{stem}-{n}");
            n += 1;
        }
    }
    labels
}

/// A picture written, with its caption.
pub struct Picture {
    pub file: String,
    pub caption: String,
}

/// Draw the pictures of `evals` into `out`: overlaid when `compare`, else one set per SAE
/// (file names prefixed with the label when there are several).
pub fn pictures(evals: &[SaeEval], out: &Path, compare: bool) -> Result<Vec<Picture>> {
    let mut pics = vec![];
    if compare || evals.len() == 1 {
        let prefix = if evals.len() > 1 { "compare_" } else { "" };
        pics.extend(picture_set(evals, out, prefix)?);
    } else {
        for e in evals {
            pics.extend(picture_set(std::slice::from_ref(e), out, &format!("{}_", e.label))?);
        }
    }
    Ok(pics)
}

fn picture_set(evals: &[SaeEval], out: &Path, prefix: &str) -> Result<Vec<Picture>> {
    let mut pics = vec![];
    let who = if evals.len() == 1 { evals[0].label.clone() } else { format!("{} SAEs", evals.len()) };
    let mut put = |name: &str, caption: String| {
        let file = format!("{prefix}{name}.png");
        pics.push(Picture { file: file.clone(), caption });
        out.join(file)
    };

    // Training curves.
    let with_curves: Vec<&SaeEval> = evals.iter().filter(|e| !e.curves.is_empty()).collect();
    if !with_curves.is_empty() {
        let series = |get: fn(&super::run::CurvePoint) -> Option<f64>| -> Vec<Series> {
            with_curves
                .iter()
                .map(|e| Series {
                    label: e.label.clone(),
                    points: e.curves.iter().filter_map(|p| get(p).map(|v| (p.step, v))).collect(),
                })
                .collect()
        };
        let mut ev = series(|p| p.ev);
        if with_curves.len() == 1 {
            ev[0].label = "training batch".into();
            let held: Vec<(f64, f64)> =
                with_curves[0].curves.iter().filter_map(|p| p.eval_ev.map(|v| (p.step, v))).collect();
            if !held.is_empty() {
                ev.push(Series { label: "held-out".into(), points: held });
            }
        }
        let panels = [
            Panel {
                title: format!("loss ({who})"),
                x_label: "step".into(),
                y_label: "loss".into(),
                series: series(|p| p.loss),
                log_y: true,
            },
            Panel {
                title: "L0".into(),
                x_label: "step".into(),
                y_label: "L0".into(),
                series: series(|p| p.l0),
                log_y: false,
            },
            Panel {
                title: "explained variance".into(),
                x_label: "step".into(),
                y_label: "EV".into(),
                series: ev,
                log_y: false,
            },
        ];
        let path = put("training_curves", "Training loss, L0 and explained variance per logged step".into());
        plot::line_panels(&path, &panels)?;
    }

    // Feature density (log10, alive latents; dead ones counted in the caption).
    let dens: Vec<Sample> = evals
        .iter()
        .map(|e| Sample {
            label: e.label.clone(),
            values: e.exported.density.iter().filter(|p| **p > 0.0).map(|p| p.log10()).collect(),
        })
        .collect();
    let min_tokens = evals.iter().map(|e| e.exported.tokens).min().unwrap_or(1).max(1);
    let lo = -(min_tokens as f64).log10().ceil();
    let dead: Vec<String> = evals
        .iter()
        .map(|e| match evals.len() {
            1 => format!("{} dead", e.exported.dead),
            _ => format!("{}: {} dead", e.label, e.exported.dead),
        })
        .collect();
    let path = put("feature_density", "log10 feature density of the alive latents (dead latents in the title)".into());
    plot::histogram(
        &path,
        &dens,
        &HistSpec {
            title: format!("log10 feature density ({who})"),
            x_label: "log10(fraction of tokens the latent fires on)".into(),
            range: Some((lo, 0.0)),
            bins: 60,
            integer: false,
            note: Some(dead.join(", ")),
        },
    )?;

    // Zipf-Mandelbrot fit of the density-rank curve.
    let fits: Vec<(String, &[f64], &super::zipf_fit::ZipfFit)> = evals
        .iter()
        .filter_map(|e| e.zipf_fit.as_ref().map(|z| (e.label.clone(), e.exported.density.as_slice(), z)))
        .collect();
    if !fits.is_empty() {
        let path = put("zipf_fit", "Feature density by rank (log-log) with its Zipf-Mandelbrot fit".into());
        super::zipf_fit::picture(&path, &fits)?;
    }
    for e in evals {
        if let Some(a) = &e.against {
            let name = if evals.len() > 1 { format!("mcs_{}", e.label) } else { "mcs".into() };
            let path = put(
                &name,
                format!("Max cosine of {}'s latents to {}'s (decoder and encoder rows)", e.label, a.path.display()),
            );
            super::mcs::picture(&path, &e.label, a)?;
        }
    }

    // Alignment score.
    let al: Vec<Sample> =
        evals.iter().map(|e| Sample { label: e.label.clone(), values: e.weights.alignment.clone() }).collect();
    let path = put("alignment", "Alignment score a_i = W_enc_i . W_dec_i per latent".into());
    plot::histogram(
        &path,
        &al,
        &HistSpec {
            title: format!("alignment score W_enc_i . W_dec_i ({who})"),
            x_label: "alignment score".into(),
            range: None,
            bins: 60,
            integer: false,
            note: None,
        },
    )?;

    // Encoder/decoder cosine.
    let cs: Vec<Sample> =
        evals.iter().map(|e| Sample { label: e.label.clone(), values: e.weights.enc_dec_cosine.clone() }).collect();
    let path = put("enc_dec_cosine", "Cosine of each latent's encoder and decoder vectors".into());
    plot::histogram(
        &path,
        &cs,
        &HistSpec {
            title: format!("cos(W_enc_i, W_dec_i) ({who})"),
            x_label: "cosine".into(),
            range: Some((-1.0, 1.0)),
            bins: 80,
            integer: false,
            note: None,
        },
    )?;

    // Features per token.
    let fpt: Vec<Sample> = evals
        .iter()
        .map(|e| Sample {
            label: e.label.clone(),
            values: e
                .exported
                .features_per_token_hist
                .iter()
                .enumerate()
                .flat_map(|(n, &c)| std::iter::repeat_n(n as f64, c as usize))
                .collect(),
        })
        .collect();
    let max_l0 = evals.iter().map(|e| e.exported.features_per_token_hist.len()).max().unwrap_or(1);
    let path = put("features_per_token", "Number of active latents per token (exported sparsifier)".into());
    plot::histogram(
        &path,
        &fpt,
        &HistSpec {
            title: format!("active latents per token ({who})"),
            x_label: "active latents (L0 of the token)".into(),
            range: Some((0.0, max_l0.saturating_sub(1).max(1) as f64)),
            bins: 60,
            integer: max_l0 <= 120,
            note: None,
        },
    )?;
    Ok(pics)
}

/// `eval.json`, the pictures and `report.md` in `out`; returns the text table.
/// Write `eval.json`, `report.md` and the pictures of `evals` into `out` (checked by
/// [`super::out_dir::prepare`]); returns the text table and the files written. `eval.json`
/// comes last and lists them all.
pub fn write_outputs(evals: &[SaeEval], out: &Path, compare: bool, draw: bool) -> Result<(String, Vec<String>)> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let pics = if draw { pictures(evals, out, compare)? } else { vec![] };
    let mut files = vec![EVAL_FILE.to_string(), REPORT_FILE.to_string()];
    files.extend(pics.iter().map(|p| p.file.clone()));
    let doc = json!({
        "saetrain_version": env!("CARGO_PKG_VERSION"),
        "definitions": {
            "explained_variance": "1 - sum_b ||x_b - x_hat_b||^2 / sum_b ||x_b - mean(X)||^2 over the whole set",
            "explained_variance_legacy":
                "SAEBench explained_variance_legacy: mean over tokens of 1 - ||x_b - x_hat_b||^2 / ||x_b - mean(batch)||^2, mean per evaluation batch",
            "mse": "mean_b ||x_b - x_hat_b||^2 / d_in",
            "nmse": "sum_b ||x_b - x_hat_b||^2 / sum_b ||x_b - mean(X)||^2",
            "density": "fraction of evaluation tokens on which the latent fired",
            "alignment": "W_enc_i . W_dec_i",
            "enc_dec_cosine": "cos(W_enc_i, W_dec_i)",
            "near_zero": "|value| < 0.1",
            "near_one": "value > 0.9",
            "zipf_fit": "density of rank r (live latents, descending) = scale / (r + beta)^alpha: OLS of ln density on ln(r + beta), beta by grid + golden-section search on [0, 10 n]; r2 on all live ranks, r2_middle on ranks floor(n/10)+1 ..= n - floor(n/10); dead latents left out",
            "against": "per latent i of this SAE: mcs[i] = max_j cos(row_i, row_j of the --against SAE), decoder and encoder rows separately; argmax[i] = that j; bimodality_coefficient = Sarle's (G1^2 + 1) / (G2 + 3(n-1)^2/((n-2)(n-3))); *_vs_alignment = Pearson correlation with W_enc_i . W_dec_i",
        },
        "runs": evals,
        (super::out_dir::FILES_KEY): files,
    });
    let cells = table(evals);
    let mut md = String::new();
    let _ = writeln!(md, "# SAE evaluation\n");
    for e in evals {
        let _ = writeln!(
            md,
            "- **{}**: `{}` ({} layout, {}, d_in {}, d_sae {}{}{}); data: {}",
            e.label,
            e.path.display(),
            e.layout,
            e.architecture,
            e.d_in,
            e.d_sae,
            e.k.map(|k| format!(", k {k}")).unwrap_or_default(),
            e.unfinished(),
            e.data
        );
    }
    let _ = writeln!(md, "\n{}", markdown_table(&cells));
    let _ = writeln!(
        md,
        "Explained variance is `1 - sum||x - x_hat||^2 / sum||x - mean||^2` over the whole set; the legacy \
         form is SAEBench's per-token mean of `1 - ||x - x_hat||^2 / ||x - mean(batch)||^2`. Columns marked \
         `train:` use the training sparsifier on the same tokens (shown only where it differs from the exported \
         one). All numbers: `{EVAL_FILE}`.\n"
    );
    for p in &pics {
        let _ = writeln!(md, "## {}\n\n![{}]({})\n", p.caption, p.caption, p.file);
    }
    write_atomic(&out.join(REPORT_FILE), md.as_bytes())?;
    write_json_atomic(&out.join(EVAL_FILE), &doc)?;
    Ok((text_table(&cells), files))
}
