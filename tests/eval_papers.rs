//! What the papers measure (issue 13): cross-SAE maximum cosine similarity (the bimodality
//! paper) and the Zipf-Mandelbrot fit of feature densities (the MC/FC paper), each against a
//! plain f64 computation, and `sae eval --against` / `sae train --zipf-from` through the CLI.

mod common;

use common::cli::{ok, sae, stderr, train};
use saetrain::eval::mcs::{self, max_cosine, summarise};
use saetrain::eval::zipf_fit::{self, fit, r_squared};
use saetrain::export::saelens::RunTimeNorm;
use saetrain::export::ExportedSae;
use saetrain::util::stats::{pearson, shape};
use serde_json::{json, Value};
use std::path::Path;

/// Deterministic uniform values in [-1, 1).
fn uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The full F_A x F_B cosine matrix in f64, row by row: (max, first argmax, runner-up).
fn naive(a: &[f32], b: &[f32], d: usize) -> Vec<(f64, usize, f64)> {
    let norm = |r: &[f32]| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    a.chunks(d)
        .map(|ra| {
            let cos: Vec<f64> = b
                .chunks(d)
                .map(|rb| {
                    let dot: f64 = ra.iter().zip(rb).map(|(x, y)| *x as f64 * *y as f64).sum();
                    dot / (norm(ra) * norm(rb))
                })
                .collect();
            let best = (0..cos.len()).fold(0, |k, j| if cos[j] > cos[k] { j } else { k });
            let second = (0..cos.len()).filter(|&j| j != best).map(|j| cos[j]).fold(f64::NEG_INFINITY, f64::max);
            (cos[best], best, second)
        })
        .collect()
}

fn sae_with(d: usize, w_dec: Vec<f32>, w_enc: Vec<f32>) -> ExportedSae {
    let f = w_dec.len() / d;
    ExportedSae {
        d_in: d,
        d_sae: f,
        w_enc,
        b_enc: vec![0.0; f],
        w_dec,
        b_dec: vec![0.0; d],
        threshold: None,
        architecture: "standard".into(),
        k: None,
        per_token_cap: None,
        norm: RunTimeNorm::None,
    }
}

// ---- cross-SAE maximum cosine similarity -------------------------------------------------------

#[test]
fn mcs_blockwise_matches_the_full_matrix_on_awkward_sizes() {
    let (fa, fb, d) = (37, 53, 13);
    let a = uniform(1, fa * d);
    let b = uniform(2, fb * d);
    let want = naive(&a, &b, d);
    // Tiles that divide neither F, one row at a time, and one tile larger than both.
    for (ta, tb) in [(1, 1), (5, 7), (8, 52), (36, 53), (37, 54), (4096, 4096)] {
        let got = max_cosine(&a, &b, d, ta, tb);
        for (i, (w, g)) in want.iter().zip(got.value.iter().zip(&got.argmax)).enumerate() {
            assert!((w.0 - g.0).abs() < 1e-6, "tile {ta}x{tb}, row {i}: {} vs {}", g.0, w.0);
            // The argmax is the naive one wherever the runner-up is not within f32 rounding.
            if w.0 - w.2 > 1e-5 {
                assert_eq!(*g.1, w.1, "tile {ta}x{tb}, row {i}");
            }
        }
    }
}

#[test]
fn identical_saes_have_mcs_one_and_a_permuted_copy_is_matched() {
    let (f, d) = (37, 13);
    let a = uniform(3, f * d);
    let same = max_cosine(&a, &a, d, 5, 7);
    assert!(same.value.iter().all(|v| (v - 1.0).abs() < 1e-6), "{:?}", same.value);
    assert_eq!(same.argmax, (0..f).collect::<Vec<_>>());
    let s = summarise(&same.value);
    assert!((s.mean - 1.0).abs() < 1e-6 && s.frac_above_0_9 == 1.0 && s.frac_below_0_5 == 0.0);

    // B = A's rows permuted and rescaled (cosines ignore the norms): latent i is B's perm^-1(i).
    let perm: Vec<usize> = (0..f).map(|i| (i * 11 + 5) % f).collect(); // 11 is coprime to 37
    let mut b = vec![0f32; f * d];
    for (j, &i) in perm.iter().enumerate() {
        let scale = 0.5 + j as f32 * 0.1;
        for c in 0..d {
            b[j * d + c] = a[i * d + c] * scale;
        }
    }
    let m = max_cosine(&a, &b, d, 6, 10);
    for i in 0..f {
        assert!((m.value[i] - 1.0).abs() < 1e-6, "row {i}: {}", m.value[i]);
        assert_eq!(perm[m.argmax[i]], i, "row {i}");
    }
}

#[test]
fn against_loads_both_files_and_refuses_a_different_d_in() {
    let tmp = tempfile::tempdir().unwrap();
    let (fa, fb, d) = (37, 53, 13);
    let a = sae_with(d, uniform(4, fa * d), uniform(5, fa * d));
    let b = sae_with(d, uniform(6, fb * d), uniform(7, fb * d));
    let (pa, pb) = (tmp.path().join("a"), tmp.path().join("b"));
    a.save_saelens(&pa, json!({}), None).unwrap();
    b.save_saelens(&pb, json!({}), None).unwrap();
    let align = saetrain::metrics::recon::weight_metrics(&a.w_enc, &a.w_dec, d).alignment;
    let x = mcs::against(&pa, &pb, &align).unwrap();
    assert_eq!((x.d_sae, x.decoder.mcs.len()), (fb, fa));
    for (side, (ra, rb)) in [(&x.decoder, (&a.w_dec, &b.w_dec)), (&x.encoder, (&a.w_enc, &b.w_enc))] {
        let want = naive(ra, rb, d);
        for (w, g) in want.iter().zip(&side.mcs) {
            assert!((w.0 - g).abs() < 1e-6);
        }
        let vals: Vec<f64> = want.iter().map(|w| w.0).collect();
        let mean = vals.iter().sum::<f64>() / fa as f64;
        assert!((side.summary.mean - mean).abs() < 1e-6);
        let above = vals.iter().filter(|v| **v > 0.9).count() as f64 / fa as f64;
        let below = vals.iter().filter(|v| **v < 0.5).count() as f64 / fa as f64;
        assert_eq!((side.summary.frac_above_0_9, side.summary.frac_below_0_5), (above, below));
    }
    // Pearson's r of decoder MCS and alignment, by the textbook formula.
    let (mx, my) = (x.decoder.mcs.iter().sum::<f64>() / fa as f64, align.iter().sum::<f64>() / fa as f64);
    let cov: f64 = x.decoder.mcs.iter().zip(&align).map(|(p, q)| (p - mx) * (q - my)).sum();
    let vx: f64 = x.decoder.mcs.iter().map(|p| (p - mx).powi(2)).sum();
    let vy: f64 = align.iter().map(|q| (q - my).powi(2)).sum();
    assert!((x.decoder_mcs_vs_alignment.unwrap() - cov / (vx * vy).sqrt()).abs() < 1e-12);

    let c = sae_with(d + 1, uniform(8, fb * (d + 1)), uniform(9, fb * (d + 1)));
    let pc = tmp.path().join("c");
    c.save_saelens(&pc, json!({}), None).unwrap();
    let e = format!("{:#}", mcs::against(&pa, &pc, &align).unwrap_err());
    for s in [pa.display().to_string(), pc.display().to_string(), "d_in 13".into(), "d_in 14".into()] {
        assert!(e.contains(&s), "{e} lacks {s}");
    }
}

#[test]
fn bimodality_coefficient_and_pearson_against_hand_values() {
    // Two equal point masses, n = 8: m2 = 1/4, m3 = 0, m4 = 1/16, g2 = -2,
    // G2 = 7 (9 (-2) + 6) / (6 * 5) = -2.8, BC = 1 / (-2.8 + 3 * 49 / 30) = 1 / 2.1.
    let two = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
    let s = shape(&two).unwrap();
    assert!(s.skewness.abs() < 1e-15);
    assert!((s.excess_kurtosis + 2.8).abs() < 1e-12);
    assert!((s.bimodality_coefficient - 1.0 / 2.1).abs() < 1e-12);
    // [0, 0, 0, 1], n = 4: mean 1/4, m2 = 3/16, m3 = 3/32, m4 = 21/256; g1 = 2/sqrt(3),
    // G1 = g1 sqrt(12) / 2 = 2, g2 = 21/9 - 3 = -2/3, G2 = 3 (5 (-2/3) + 6) / 2 = 4,
    // BC = (4 + 1) / (4 + 27 / 2) = 2/7.
    let s = shape(&[0.0, 0.0, 0.0, 1.0]).unwrap();
    assert!((s.skewness - 2.0).abs() < 1e-12 && (s.excess_kurtosis - 4.0).abs() < 1e-12, "{s:?}");
    assert!((s.bimodality_coefficient - 2.0 / 7.0).abs() < 1e-12);
    assert!(shape(&[1.0, 1.0, 1.0, 1.0]).is_none() && shape(&[1.0, 2.0, 3.0]).is_none());
    // A bimodal sample scores above 5/9, a unimodal one below.
    let bi: Vec<f64> = (0..400).map(|i| if i % 2 == 0 { 0.1 } else { 0.95 } + 0.02 * ((i % 7) as f64 / 7.0)).collect();
    let uni: Vec<f64> = (0..400).map(|i| 0.5 + 0.1 * ((i as f64 * 0.37).sin() + (i as f64 * 0.11).cos())).collect();
    assert!(shape(&bi).unwrap().bimodality_coefficient > 5.0 / 9.0);
    assert!(shape(&uni).unwrap().bimodality_coefficient < 5.0 / 9.0);
    // Pearson: exact linear relations and a hand-computed case.
    assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap() - 1.0).abs() < 1e-15);
    assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-15);
    // x = [1,2,3,4], y = [1,3,2,4]: sum dx dy = 4, sum dx^2 = sum dy^2 = 5 -> 0.8
    assert!((pearson(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap() - 0.8).abs() < 1e-15);
    assert!(pearson(&[1.0, 1.0], &[1.0, 2.0]).is_none());
}

// ---- Zipf fit ---------------------------------------------------------------------------------

/// Densities `c / (r + beta)^alpha` for r = 1..n, in a scrambled order, with `dead` zeros.
fn zipf_densities(n: usize, alpha: f64, beta: f64, c: f64, dead: usize) -> Vec<f64> {
    let mut v: Vec<f64> = (1..=n).map(|r| c / (r as f64 + beta).powf(alpha)).collect();
    v.extend(std::iter::repeat_n(0.0, dead));
    let len = v.len();
    (0..len).map(|i| v[(i * 7919) % len]).collect::<Vec<_>>().into_iter().collect()
}

#[test]
fn zipf_fit_recovers_exact_alpha_and_beta() {
    for (n, alpha, beta, c) in
        [(4096, 1.0, 6.8, 0.5), (1000, 1.3, 0.0, 0.2), (3001, 0.7, 40.0, 2.0), (500, 2.0, 1.5, 1.0)]
    {
        // 7919 is prime, so the scramble is a permutation whenever len is not a multiple of it.
        let dens = zipf_densities(n, alpha, beta, c, 17);
        let f = fit(&dens).unwrap();
        assert_eq!((f.live, f.dead), (n, 17));
        assert!((f.alpha - alpha).abs() < 1e-6, "alpha {} vs {alpha}", f.alpha);
        assert!((f.beta - beta).abs() < 1e-4, "beta {} vs {beta}", f.beta);
        assert!((f.scale - c).abs() < 1e-5 * c, "scale {} vs {c}", f.scale);
        assert!(f.r2.unwrap() > 1.0 - 1e-12 && f.r2_middle.unwrap() > 1.0 - 1e-10, "{f:?}");
        assert!(!f.beta_at_bound);
    }
}

#[test]
fn zipf_fit_recovers_noisy_alpha_within_tolerance() {
    // Multiplicative log-normal noise, sigma 0.05 (Box-Muller on the test's uniform values).
    let (n, alpha, beta) = (4096, 1.1, 6.8);
    let u = uniform(11, 2 * n);
    let noise: Vec<f64> = (0..n)
        .map(|i| {
            let (u1, u2) = ((u[2 * i] as f64 + 1.0) / 2.0 + 1e-12, (u[2 * i + 1] as f64 + 1.0) / 2.0);
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect();
    let mut dens: Vec<f64> = (1..=n).map(|r| 0.3 / (r as f64 + beta).powf(alpha)).collect();
    dens.iter_mut().zip(&noise).for_each(|(p, z)| *p *= (0.05 * z).exp());
    let f = fit(&dens).unwrap();
    assert!((f.alpha - alpha).abs() < 0.02, "alpha {}", f.alpha);
    assert!((f.beta - beta).abs() < 2.0, "beta {}", f.beta);
    assert!(f.r2.unwrap() > 0.99, "{f:?}");

    // The search found the least-squares beta: no beta on a fine brute-force grid does better.
    let mut live = dens.clone();
    live.sort_by(|a, b| b.total_cmp(a));
    let y: Vec<f64> = live.iter().map(|p| p.ln()).collect();
    let sse = |b: f64| {
        let x: Vec<f64> = (1..=n).map(|r| (r as f64 + b).ln()).collect();
        let (mx, my) = (x.iter().sum::<f64>() / n as f64, y.iter().sum::<f64>() / n as f64);
        let sxy: f64 = x.iter().zip(&y).map(|(p, q)| (p - mx) * (q - my)).sum();
        let sxx: f64 = x.iter().map(|p| (p - mx).powi(2)).sum();
        let s = sxy / sxx;
        x.iter().zip(&y).map(|(p, q)| (q - (my - s * mx) - s * p).powi(2)).sum::<f64>()
    };
    let at = sse(f.beta);
    for k in 0..=400 {
        let b = 0.05 * k as f64;
        assert!(sse(b) >= at * (1.0 - 1e-9), "beta {b} beats the fit's {}", f.beta);
    }
}

#[test]
fn zipf_r_squared_matches_the_plain_formula() {
    let (n, alpha, beta) = (997, 1.2, 3.0);
    let u = uniform(12, n);
    let dens: Vec<f64> = (1..=n).map(|r| 0.1 / (r as f64 + beta).powf(alpha) * (0.1 * u[r - 1] as f64).exp()).collect();
    let f = fit(&dens).unwrap();
    let mut live = dens.clone();
    live.sort_by(|a, b| b.total_cmp(a));
    let y: Vec<f64> = live.iter().map(|p| p.ln()).collect();
    let yhat: Vec<f64> = (1..=n).map(|r| f.scale.ln() - f.alpha * (r as f64 + f.beta).ln()).collect();
    let plain = |y: &[f64], h: &[f64]| {
        let m = y.iter().sum::<f64>() / y.len() as f64;
        let res: f64 = y.iter().zip(h).map(|(a, b)| (a - b).powi(2)).sum();
        let tot: f64 = y.iter().map(|a| (a - m).powi(2)).sum();
        1.0 - res / tot
    };
    assert!((f.r2.unwrap() - plain(&y, &yhat)).abs() < 1e-10);
    // Least squares with an intercept: R^2 is the squared correlation of ln p and ln(r + beta).
    let x: Vec<f64> = (1..=n).map(|r| (r as f64 + f.beta).ln()).collect();
    assert!((f.r2.unwrap() - pearson(&x, &y).unwrap().powi(2)).abs() < 1e-10);
    // The middle segment: ranks floor(n/10)+1 ..= n - floor(n/10), here 100 ..= 898.
    assert_eq!(f.middle_ranks, (100, 898));
    assert!((f.r2_middle.unwrap() - plain(&y[99..898], &yhat[99..898])).abs() < 1e-10);
    assert_eq!(r_squared(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), Some(1.0));
    assert_eq!(r_squared(&[2.0, 2.0], &[1.0, 3.0]), None);
    // Equal densities: the flat law and no R^2.
    let flat = fit(&[0.25; 10]).unwrap();
    assert_eq!((flat.alpha, flat.r2), (0.0, None));
}

#[test]
fn zipf_fit_picture_is_a_png() {
    let tmp = tempfile::tempdir().unwrap();
    let dens = zipf_densities(300, 1.0, 5.0, 0.3, 4);
    let f = fit(&dens).unwrap();
    let p = tmp.path().join("zipf_fit.png");
    zipf_fit::picture(&p, &[("run".into(), dens.as_slice(), &f)]).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert!(bytes.len() > 2000 && bytes.starts_with(b"\x89PNG"));
}

// ---- through the CLI ---------------------------------------------------------------------------

fn json_of(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A tiny run (`common::cli::TINY`) with some of its flags given other values.
fn train_replacing(out: &Path, replace: &[(&str, &str)], extra: &[&str]) {
    let mut a: Vec<&str> = vec!["train", "--out", out.to_str().unwrap()];
    let tiny = common::cli::TINY;
    let mut i = 0;
    while i < tiny.len() {
        let r = replace.iter().find(|(k, _)| *k == tiny[i]);
        a.push(tiny[i]);
        if tiny.get(i + 1).is_some_and(|v| !v.starts_with("--")) {
            a.push(r.map(|(_, v)| *v).unwrap_or(tiny[i + 1]));
            i += 1;
        }
        i += 1;
    }
    a.extend_from_slice(extra);
    ok(&sae(&a));
}

fn is_png(p: &Path) {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(bytes.len() > 2000 && bytes.starts_with(b"\x89PNG"), "{}", p.display());
}

#[test]
fn eval_against_writes_mcs_and_zipf_fit_to_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok(&train(&a, &["--sparsifier", "topk"]));
    train_replacing(&b, &[("--d-sae", "48")], &["--sparsifier", "topk", "--seed", "1"]);
    let out = tmp.path().join("ev");
    let o = sae(&["eval", a.to_str().unwrap(), "--against", b.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    ok(&o);
    let table = String::from_utf8_lossy(&o.stdout);
    for row in ["MCS dec mean", "MCS enc mean", "MCS dec bimodality", "corr(MCS dec, alignment)", "Zipf alpha"] {
        assert!(table.contains(row), "stdout lacks {row}: {table}");
    }
    let j = json_of(&out.join("eval.json"));
    let x = &j["runs"][0]["against"];
    assert_eq!(x["d_sae"], 48);
    assert_eq!(x["decoder"]["mcs"].as_array().unwrap().len(), 64);
    assert_eq!(x["encoder"]["argmax"].as_array().unwrap().len(), 64);
    assert!(x["decoder"]["summary"]["shape"]["bimodality_coefficient"].is_number());
    assert!(x["decoder_mcs_vs_alignment"].is_number());
    // The numbers agree with the weights on disk.
    let (sa, sb) = (saetrain::export::load::load_sae(&a).unwrap(), saetrain::export::load::load_sae(&b).unwrap());
    let want = naive(&sa.w_dec, &sb.w_dec, 16);
    for (w, g) in want.iter().zip(x["decoder"]["mcs"].as_array().unwrap()) {
        assert!((w.0 - g.as_f64().unwrap()).abs() < 1e-6);
    }
    let z = &j["runs"][0]["zipf_fit"];
    assert!(z["alpha"].is_number() && z["beta"].is_number() && z["r2"].is_number() && z["r2_middle"].is_number());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for p in ["mcs", "zipf_fit"] {
        is_png(&out.join(format!("{p}.png")));
        assert!(md.contains(&format!("({p}.png)")), "report.md lacks {p}.png");
    }
    assert!(md.contains("MCS dec mean") && md.contains("Zipf R^2"));

    // A and B of different widths: an error naming both files and both widths.
    let c = tmp.path().join("c");
    train_replacing(&c, &[("--synth-d-in", "12")], &[]);
    let o = sae(&["eval", a.to_str().unwrap(), "--against", c.to_str().unwrap(), "--no-plots"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("d_in 16") && e.contains("d_in 12") && e.contains(c.to_str().unwrap()), "{e}");
}

#[test]
fn train_zipf_from_takes_the_fit_saves_it_and_resumes_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    ok(&train(&src, &["--sparsifier", "topk"]));
    let s = src.to_str().unwrap();
    let fc = ["--sparsifier", "wta", "--budget", "zipf", "--zipf-from", s];

    // No eval.json yet: the run is evaluated, and the fit is that of `sae eval`'s numbers. With
    // --threads too: the evaluation once took rayon's global pool before training could size it.
    let want = saetrain::eval::zipf_fit::fit_of_run(&src).unwrap().0;
    let b = tmp.path().join("b");
    let o = train(&b, &[&fc[..], &["--threads", "2"]].concat());
    ok(&o);
    assert!(stderr(&o).contains("--zipf-from") && stderr(&o).contains("held-out tokens"), "{}", stderr(&o));
    let cfg = json_of(&b.join("config.json"));
    assert_eq!(cfg["zipf_alpha"].as_f64().unwrap(), want.alpha);
    assert_eq!(cfg["zipf_beta"].as_f64().unwrap(), want.beta);
    assert_eq!(cfg["zipf_from"], s);

    // With eval.json holding a fit, that fit is used (marked values prove it).
    ok(&sae(&["eval", s, "--no-plots"]));
    let ev = src.join("eval").join("eval.json");
    let mut j = json_of(&ev);
    assert!((j["runs"][0]["zipf_fit"]["alpha"].as_f64().unwrap() - want.alpha).abs() < 1e-12);
    j["runs"][0]["zipf_fit"]["alpha"] = json!(1.25);
    j["runs"][0]["zipf_fit"]["beta"] = json!(3.5);
    std::fs::write(&ev, j.to_string()).unwrap();
    let c = tmp.path().join("c");
    let o = train(&c, &fc);
    ok(&o);
    assert!(stderr(&o).contains("eval.json"), "{}", stderr(&o));
    let cfg = json_of(&c.join("config.json"));
    assert_eq!((cfg["zipf_alpha"].as_f64().unwrap(), cfg["zipf_beta"].as_f64().unwrap()), (1.25, 3.5));

    // A resume keeps the saved values (it does not refit, even when the source's fit changed).
    j["runs"][0]["zipf_fit"]["alpha"] = json!(2.0);
    std::fs::write(&ev, j.to_string()).unwrap();
    ok(&sae(&["train", "--resume", c.to_str().unwrap(), "--steps", "30", "--quiet"]));
    let cfg = json_of(&c.join("config.json"));
    assert_eq!(cfg["zipf_alpha"].as_f64().unwrap(), 1.25);

    // Conflicts name both options; a run that uses no Zipf law refuses the flag.
    let d = tmp.path().join("d");
    let o = train(&d, &[&fc[..], &["--zipf-alpha", "1.1"]].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--zipf-from") && stderr(&o).contains("--zipf-alpha"), "{}", stderr(&o));
    let toml = tmp.path().join("c.toml");
    std::fs::write(&toml, "zipf_beta = 9.0\n").unwrap();
    let o = train(&d, &[&fc[..], &["--config", toml.to_str().unwrap()]].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--zipf-from") && stderr(&o).contains("zipf_beta 9"), "{}", stderr(&o));
    let o = train(&d, &["--sparsifier", "topk", "--zipf-from", s]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("uses no Zipf law"), "{}", stderr(&o));
}
