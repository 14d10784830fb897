//! The seeds' recipes as their papers define them (issue 10): Zipf feature choice that spends
//! B*k and starves no latent, aux_zipf's dying rule (Definition 3.1), several aux losses at once,
//! MC -> FC two-phase training, the papers' default aux losses, hybrid's cap at inference, and
//! both spellings of every value.

use clap::Parser;
use saetrain::config::{AuxKind, SparsifierKind, TrainConfig};
use saetrain::export::load::load_sae;
use saetrain::sparsify::{budget, threshold};
use std::path::Path;
use std::process::{Command, Output};

fn sae(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sae")).args(args).output().expect("run sae")
}

fn ok(o: &Output) {
    assert!(o.status.success(), "sae failed: {}", String::from_utf8_lossy(&o.stderr));
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Rows of synthetic held-out-like data for a loaded SAE of width d (fixed pattern).
fn rows(d: usize, n: usize) -> Vec<f32> {
    (0..n * d).map(|i| (((i * 7919) % 211) as f32 / 70.0 - 1.0).max(0.0)).collect()
}

// ---- 1. Zipf feature choice -------------------------------------------------------------------

#[test]
fn zipf_budgets_spend_exactly_bk_and_starve_no_latent() {
    // The paper's GPT-2 32x setting: the literal floor gives 75 % of latents m = 0 and
    // under-spends B*k.
    let (f, b, k) = (24_576usize, 1536usize, 32usize);
    let density: Vec<f32> = (0..f).map(|i| 1.0 / (1.0 + i as f32)).collect();
    let floor = budget::zipf_budgets(&density, b, k, 1.0, 6.8, b);
    assert!(floor.iter().filter(|&&m| m == 0).count() > f / 2, "the literal floor starves most latents");
    let x = budget::zipf_continuous(&density, b, k, 1.0, 6.8, b);
    assert!(x.iter().all(|&v| v > 0.0), "every latent has a non-zero expected budget");
    assert!((x.iter().sum::<f64>() - (b * k) as f64).abs() < 1e-6);
    let mut mean = vec![0f64; f];
    let draws = 200;
    for step in 0..draws {
        let m = budget::zipf_budgets_exact(&density, b, k, 1.0, 6.8, b, budget::rounding_offset(3, step));
        assert_eq!(m.iter().sum::<usize>(), b * k, "step {step} spends exactly B*k");
        for (j, (&mj, &xj)) in m.iter().zip(&x).enumerate() {
            assert!(mj == xj.floor() as usize || mj == xj.ceil() as usize, "latent {j}: m {mj} vs x {xj}");
            mean[j] += mj as f64 / draws as f64;
        }
    }
    // E[m_j] = x_j: over 200 draws the tail's average budget is near its expectation.
    let tail: f64 = mean[f / 2..].iter().sum();
    let want: f64 = x[f / 2..].iter().sum();
    assert!((tail - want).abs() < 0.05 * want, "tail budget {tail} vs expected {want}");
    // The cap is water-filled: a cap of 2 still spends B*k when F * 2 >= B*k.
    let m = budget::zipf_budgets_exact(&density, b, k, 1.0, 6.8, 2, 0.5);
    assert!(m.iter().all(|&v| v <= 2) && m.iter().sum::<usize>() == b * k);
    // Same seed and step, same budgets (resume), on every call.
    assert_eq!(budget::rounding_offset(3, 17), budget::rounding_offset(3, 17));
}

#[test]
fn unfired_latents_never_fire_at_inference() {
    let t = threshold::exported(&[0.5, 0.0, 2.0], &[true, false, true]);
    assert_eq!(t, vec![0.5, threshold::NEVER, 2.0]);
}

/// The issue's reproduction: Zipf feature choice at k = 4 exported an SAE with held-out L0 175.
#[test]
fn zipf_feature_choice_exports_an_sae_near_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("zipf");
    let o = sae(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--sparsifier",
        "wta",
        "--budget",
        "zipf",
        "--k",
        "4",
        "--d-sae",
        "1024",
        "--batch-size",
        "256",
        "--steps",
        "300",
        "--backend",
        "cpu",
        "--quiet",
    ]);
    ok(&o);
    let s = json(&out.join("summary.json"));
    let (l0, train_l0) = (s["eval"]["l0"].as_f64().unwrap(), s["eval_training_sparsifier"]["l0"].as_f64().unwrap());
    assert!((train_l0 - 4.0).abs() < 0.2, "training L0 {train_l0} should be k = 4 (B*k spent)");
    assert!(l0 < 8.0, "exported L0 {l0} for k = 4");
    assert!(s["eval"]["explained_variance"].as_f64().unwrap() > 0.0, "{s}");
}

// ---- 2. aux_zipf's dying latents ---------------------------------------------------------------

#[test]
fn dying_latents_follow_definition_3_1() {
    // F = 8, B = 10, k = 2: continuous Zipf densities by rank
    // 0.347 0.307 0.276 0.251 0.229 0.211 0.196 0.183; 0.6 x the last two: 0.118, 0.110.
    // (The plain two-latent case is tests/sparsify.rs::dying_latents_bottom_quarter_below_prediction.)
    let density = [0.5f32, 0.05, 0.4, 0.07, 0.3, 0.12, 0.2, 0.15];
    // Order: 0, 2, 4, 6, 7, 5, 3, 1 -> bottom quarter: 3 (rank 7, 0.07 < 0.118), 1 (rank 8, 0.05 < 0.110).
    assert_eq!(
        budget::dying_latents(&density, 10, 2, 1.0, 6.8),
        vec![false, true, false, true, false, false, false, false]
    );
    let density = [0.5f32, 0.115, 0.4, 0.07, 0.3, 0.12, 0.2, 0.15];
    // Order: 0, 2, 4, 6, 7, 5, 1, 3 -> latent 3 (rank 8, 0.07 < 0.110) dying; latent 1 (rank 7,
    // 0.115 < 0.118) dying too since every lower rank is.
    assert_eq!(
        budget::dying_latents(&density, 10, 2, 1.0, 6.8),
        vec![false, true, false, true, false, false, false, false]
    );
    let density = [0.5f32, 0.05, 0.4, 0.2, 0.3, 0.12, 0.2, 0.15];
    // Order: 0, 2, 4, 3, 6, 7, 5, 1 -> latent 1 (rank 8) dying; latent 5 (rank 7, 0.12 >= 0.118) is
    // not, which ends the run.
    assert_eq!(
        budget::dying_latents(&density, 10, 2, 1.0, 6.8),
        vec![false, true, false, false, false, false, false, false]
    );
}

#[test]
fn aux_zipf_finds_dying_latents_at_realistic_widths() {
    // d_sae 4096, B*k = 1024: the floored prediction of the bottom quarter is 0, so nothing was
    // ever "below 0.6 x prediction" and aux_zipf stayed inert.
    let f = 4096;
    let density: Vec<f32> = (0..f).map(|i| if i < 1300 { 0.01 } else { 0.0 }).collect();
    let dying = budget::dying_latents(&density, 256, 4, 1.0, 6.8);
    assert_eq!(dying.iter().filter(|&&d| d).count(), f / 4, "the whole dead bottom quarter is dying");
}

// ---- 3 and 5. aux losses: lists, the papers' defaults -----------------------------------------

#[test]
fn default_aux_losses_follow_the_papers() {
    let cfg = |s| TrainConfig { sparsifier: s, ..TrainConfig::default() };
    assert_eq!(cfg(SparsifierKind::Wta).aux_kinds(), vec![]);
    assert_eq!(cfg(SparsifierKind::Hybrid).aux_kinds(), vec![]);
    assert_eq!(cfg(SparsifierKind::Topk).aux_kinds(), vec![AuxKind::AuxK]);
    assert_eq!(cfg(SparsifierKind::MutualChoice).aux_kinds(), vec![AuxKind::AuxK, AuxKind::AuxZipf]);
    assert_eq!(cfg(SparsifierKind::Relu).aux_kinds(), vec![]);
}

#[test]
fn mutual_choice_trains_with_aux_k_and_aux_zipf_together() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mc");
    ok(&sae(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--sparsifier",
        "mutual-choice",
        "--aux",
        "aux-k,aux_zipf",
        "--dead-window",
        "256",
        "--d-sae",
        "512",
        "--batch-size",
        "128",
        "--steps",
        "60",
        "--backend",
        "cpu",
        "--quiet",
    ]));
    assert_eq!(json(&out.join("config.json"))["aux"], serde_json::json!(["aux_k", "aux_zipf"]));
    // An old config with one value still loads.
    let old = dir.path().join("old.json");
    std::fs::write(&old, r#"{"aux": "aux_k"}"#).unwrap();
    assert_eq!(TrainConfig::load(&old).unwrap().aux, Some(vec![AuxKind::AuxK]));
}

// ---- 4. MC -> FC ---------------------------------------------------------------------------------

#[test]
fn mc_then_fc_starts_phase_two_from_phase_ones_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("mc"), dir.path().join("fc"));
    let common = ["--d-sae", "256", "--k", "4", "--batch-size", "128", "--backend", "cpu", "--quiet"];
    let mut a = vec!["train", "--out", p1.to_str().unwrap(), "--sparsifier", "mutual_choice", "--steps", "40"];
    a.extend_from_slice(&common);
    ok(&sae(&a));
    let mut b = vec!["train", "--out", p2.to_str().unwrap(), "--sparsifier", "wta", "--budget", "zipf"];
    b.extend_from_slice(&["--aux", "none", "--steps", "20", "--init-from", p1.to_str().unwrap()]);
    b.extend_from_slice(&common);
    ok(&sae(&b));
    // Phase two's starting state is phase one's final parameters, bit for bit, with a fresh
    // optimiser and thresholds.
    let cfg2 = TrainConfig::load(&p2.join("config.json")).unwrap();
    let start = saetrain::train::init_from(&p1, &cfg2, cfg2.d_in.unwrap()).unwrap();
    let (end1, _) = saetrain::train::checkpoint::load(&p1).unwrap();
    assert_eq!(start.params.data, end1.params.data);
    // The densities as estimates: phase one's EMA (from 0, 40 steps) divided by its bias.
    let bias = 1.0 - (TrainConfig::load(&p1.join("config.json")).unwrap().density_decay as f32).powi(40);
    let want: Vec<f32> = end1.density.iter().map(|d| d / bias).collect();
    assert_eq!(start.density, want);
    assert!(start.adam_m.data.iter().all(|&v| v == 0.0) && start.step == 0 && start.theta_set.iter().all(|s| !s));
    // Shapes must match.
    let bad = dir.path().join("bad");
    let o = sae(&[
        "train",
        "--out",
        bad.to_str().unwrap(),
        "--d-sae",
        "128",
        "--init-from",
        p1.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("d_sae 256"));
}

/// aux_zipf in a run started `--init-from` another finds the dying latents at its first step:
/// the inherited densities are estimates already. (Corrected for an EMA started at 0 by the new
/// run's step count, they looked ~100x too large at step 1 and nothing was dying for ~90 steps.)
#[test]
fn aux_zipf_after_init_from_finds_dying_latents_from_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("mc"), dir.path().join("again"));
    let common = ["--d-sae", "512", "--k", "8", "--batch-size", "256", "--backend", "cpu", "--quiet"];
    let mut a = vec!["train", "--out", p1.to_str().unwrap(), "--sparsifier", "mutual_choice", "--steps", "300"];
    a.extend_from_slice(&common);
    ok(&sae(&a));
    let mut b = vec!["train", "--out", p2.to_str().unwrap(), "--sparsifier", "mutual_choice", "--aux", "aux-zipf"];
    b.extend_from_slice(&["--steps", "5", "--log-every", "1", "--init-from", p1.to_str().unwrap()]);
    b.extend_from_slice(&common);
    ok(&sae(&b));
    let log = std::fs::read_to_string(p2.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 1, "{log}");
    assert!(first["aux_loss"].as_f64().unwrap() > 0.0, "no dying latent at step 1: {log}");
}

// ---- 9. hybrid keeps its cap at inference --------------------------------------------------------

#[test]
fn hybrid_exports_its_per_token_cap_and_every_loader_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hybrid");
    ok(&sae(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--sparsifier",
        "hybrid",
        "--k",
        "4",
        "--k-max",
        "3",
        "--d-sae",
        "256",
        "--batch-size",
        "128",
        "--steps",
        "80",
        "--backend",
        "cpu",
        "--quiet",
    ]));
    let cfg = json(&out.join("cfg.json"));
    assert_eq!(cfg["architecture"], "jumprelu");
    assert_eq!(cfg["per_token_cap"], 3);
    assert!(cfg["per_token_cap_note"].as_str().unwrap().contains("SAELens"));
    let sae_ = load_sae(&out).unwrap();
    assert_eq!(sae_.per_token_cap, Some(3));
    let codes = sae_.encode(&rows(sae_.d_in, 200), 200).unwrap();
    let max = (0..200).map(|b| codes.row(b).0.len()).max().unwrap();
    assert!(max <= 3, "a token fired {max} latents past the cap of 3");
}

// ---- 8. both spellings ---------------------------------------------------------------------------

/// Every value the README's flag list shows is accepted by the CLI, in its spelling and in the
/// other one (dashes and underscores), and config files take both too.
#[test]
fn readme_flag_values_parse_in_both_spellings() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("Common training flags").expect("README lists the common flags");
    // The indented block after the heading's paragraph.
    let block: String = readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with("    "))
        .take_while(|l| l.starts_with("    "))
        .collect::<Vec<_>>()
        .join(" ");
    let words: Vec<&str> = block.split_whitespace().collect();
    let mut checked = 0;
    for (i, w) in words.iter().enumerate() {
        let (Some(flag), Some(value)) = (w.strip_prefix("--"), words.get(i + 1)) else { continue };
        if value.starts_with("--") || *value == "|" || *value == "N" || value.ends_with('/') || value.contains("NAME") {
            continue;
        }
        for v in value.split('|') {
            // Numbers have one spelling; names take dashes and underscores alike.
            let spellings = if v.chars().any(|c| c.is_ascii_digit()) {
                vec![v.to_string()]
            } else {
                vec![v.to_string(), v.replace('_', "-"), v.replace('-', "_")]
            };
            for spelling in spellings {
                let args = ["sae", "train", &format!("--{flag}"), &spelling];
                saetrain::cli::Cli::try_parse_from(args)
                    .unwrap_or_else(|e| panic!("README value --{flag} {spelling} is refused: {e}"));
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "only {checked} README values checked");
    for text in [
        r#"{"sparsifier": "mutual-choice", "aux": ["aux-k", "aux_zipf"], "b_dec_init": "geometric-median"}"#,
        r#"{"sparsifier": "mutual_choice", "threshold_mode": "per-latent", "backend": "cuda_emulator"}"#,
    ] {
        let p = std::env::temp_dir().join(format!("saetrain-spell-{}.json", std::process::id()));
        std::fs::write(&p, text).unwrap();
        let c = TrainConfig::load(&p).unwrap_or_else(|e| panic!("{text}: {e:#}"));
        assert_eq!(c.sparsifier, SparsifierKind::MutualChoice);
        let _ = std::fs::remove_file(p);
    }
}

// ---- 10. calibrated thresholds --------------------------------------------------------------------

#[test]
fn calibrated_thresholds_match_the_training_l0() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("batchtopk", &["--sparsifier", "batchtopk"][..]),
        ("mutual_choice", &["--sparsifier", "mutual_choice"][..]),
        ("wta", &["--sparsifier", "wta"][..]),
        ("wta_zipf", &["--sparsifier", "wta", "--budget", "zipf"][..]),
        ("hybrid", &["--sparsifier", "hybrid"][..]),
    ] {
        let out = dir.path().join(name);
        let mut a = vec!["train", "--out", out.to_str().unwrap(), "--k", "8", "--d-sae", "512", "--batch-size", "256"];
        a.extend_from_slice(&["--steps", "150", "--eval-tokens", "2048", "--backend", "cpu", "--quiet"]);
        a.extend_from_slice(extra);
        ok(&sae(&a));
        let s = json(&out.join("summary.json"));
        let c = &s["calibration"];
        // The synthetic stream never repeats a row: the default calibrates on its next rows.
        assert_eq!(c["rows"], "training", "{name}: {c}");
        let (target, got) = (c["target_l0"].as_f64().unwrap(), c["calibrated_l0"].as_f64().unwrap());
        assert!((got - target).abs() <= 0.05 * target, "{name}: calibrated L0 {got} vs training {target}: {c}");
        // On the held-out rows, which the thresholds were not fitted to, the exported SAE keeps
        // about what the training rule keeps there.
        let (held, held_rule) =
            (s["eval"]["l0"].as_f64().unwrap(), s["eval_training_sparsifier"]["l0"].as_f64().unwrap());
        assert!((held - held_rule).abs() <= 0.08 * held_rule, "{name}: held-out L0 {held} vs the rule's {held_rule}");
        let mode = if name.starts_with("wta") || name == "hybrid" { "per_latent" } else { "global" };
        assert_eq!(c["mode"], mode, "{name}");
        // cfg.json records it.
        let cfg = json(&out.join("cfg.json"));
        assert_eq!(cfg["metadata"]["threshold_calibration"], *c, "{name}");
    }
    // Calibrated on the held-out rows themselves, the summary's L0 is the fitted one, exactly.
    for sparsifier in ["batchtopk", "wta"] {
        let out = dir.path().join(format!("{sparsifier}_held_out"));
        let mut a = vec!["train", "--out", out.to_str().unwrap(), "--k", "8", "--d-sae", "512", "--batch-size", "256"];
        a.extend_from_slice(&["--steps", "150", "--eval-tokens", "2048", "--backend", "cpu", "--quiet"]);
        a.extend_from_slice(&["--sparsifier", sparsifier, "--threshold-calibration", "held-out"]);
        ok(&sae(&a));
        let s = json(&out.join("summary.json"));
        assert_eq!(s["calibration"]["rows"], "held_out");
        assert_eq!(s["eval"]["l0"], s["calibration"]["calibrated_l0"], "{sparsifier}: in-sample");
    }
    // The plain EMA stays available.
    let out = dir.path().join("ema");
    ok(&sae(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--sparsifier",
        "batchtopk",
        "--k",
        "8",
        "--d-sae",
        "512",
        "--batch-size",
        "256",
        "--steps",
        "150",
        "--threshold-calibration",
        "none",
        "--backend",
        "cpu",
        "--quiet",
    ]));
    assert!(json(&out.join("summary.json"))["calibration"].is_null());
}

/// SAELens's jumprelu ignores hybrid's per-token cap: the calibration reports what the exported
/// thresholds do without it, and says so in cfg.json. Checked against the exported SAE with the
/// cap removed, encoded by the inference loader on the same (held-out) rows.
#[test]
fn hybrid_calibration_measures_the_file_without_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hybrid");
    let mut a = vec!["train", "--out", out.to_str().unwrap(), "--k", "8", "--d-sae", "512", "--batch-size", "256"];
    a.extend_from_slice(&["--steps", "150", "--eval-tokens", "2048", "--backend", "cpu", "--quiet"]);
    a.extend_from_slice(&["--sparsifier", "hybrid", "--threshold-calibration", "held-out"]);
    ok(&sae(&a));
    let c = &json(&out.join("summary.json"))["calibration"];
    let u = &c["without_cap"];
    let cap = u["cap"].as_u64().unwrap() as usize;
    let mut uncapped = load_sae(&out).unwrap();
    assert_eq!(uncapped.per_token_cap, Some(cap));
    uncapped.per_token_cap = None;
    let cfg = TrainConfig::load(&out.join("config.json")).unwrap();
    let held_out = saetrain::data::open_source(&cfg).unwrap().eval_batches(cfg.eval_tokens).unwrap();
    let (mut tokens, mut nnz, mut over) = (0usize, 0usize, 0usize);
    for b in &held_out {
        let codes = uncapped.encode(&b.to_f32(), b.rows).unwrap();
        for r in 0..b.rows {
            let n = codes.row(r).0.len();
            nnz += n;
            over += (n > cap) as usize;
        }
        tokens += b.rows;
    }
    assert_eq!(tokens, 2048);
    let l0 = nnz as f64 / tokens as f64;
    let frac = over as f64 / tokens as f64;
    assert!((u["l0"].as_f64().unwrap() - l0).abs() <= 2.0 / tokens as f64, "{u} vs L0 {l0}");
    assert!((u["frac_tokens_over_cap"].as_f64().unwrap() - frac).abs() <= 2.0 / tokens as f64, "{u} vs {frac}");
    // At k 8 and a cap of 2k the cap binds on a real share of tokens, and only adds latents.
    assert!(frac > 0.01 && l0 > c["calibrated_l0"].as_f64().unwrap(), "{c}");
    let note = json(&out.join("cfg.json"))["per_token_cap_note"].as_str().unwrap().to_string();
    assert!(note.contains(&format!("{:.1}% of tokens", 100.0 * frac)), "{note}");
    // Only hybrid has a cap.
    let wta = dir.path().join("wta");
    let mut a = vec!["train", "--out", wta.to_str().unwrap(), "--k", "8", "--d-sae", "128", "--batch-size", "256"];
    a.extend_from_slice(&[
        "--steps",
        "20",
        "--eval-tokens",
        "512",
        "--backend",
        "cpu",
        "--quiet",
        "--sparsifier",
        "wta",
    ]);
    ok(&sae(&a));
    let c = &json(&wta.join("summary.json"))["calibration"];
    assert!(c.is_object() && c.get("without_cap").is_none(), "{c}");
}

/// Calibration on the training stream draws the rows the stream gives next and leaves its
/// position where it was; `auto` falls back to the held-out rows once those next rows are ones
/// the SAE has trained on (a second pass over shards), and `training` is then still available.
#[test]
fn calibration_rows_come_from_the_training_stream_without_moving_it() {
    use saetrain::data::{cli::synth, format::Dtype, open_source, synthetic::SynthSpec};
    use saetrain::sparsify::threshold::Calibration;
    use saetrain::train::calibrate;
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    let spec = SynthSpec { d_in: 16, n_features: 40, mean_active: 3.0, zipf: 1.0, noise: 0.01, seed: 3 };
    synth(&shards, &spec, 3000, Dtype::Float32, 1000, false, &|| Ok(())).unwrap();
    for data in [None, Some(shards.clone())] {
        for prefetch in [0, 2] {
            let cfg = TrainConfig {
                sparsifier: SparsifierKind::Batchtopk,
                batch_size: 200,
                eval_tokens: 500,
                data: data.clone(),
                prefetch,
                synth_d_in: 16,
                ..TrainConfig::default()
            };
            let what = format!("data {data:?}, prefetch {prefetch}");
            let mut source = open_source(&cfg).unwrap();
            let held_out = source.eval_batches(cfg.eval_tokens).unwrap();
            source.next_batch().unwrap();
            let at = source.position();
            let (rows, from) = calibrate::rows(&cfg, source.as_mut(), &held_out).unwrap();
            assert_eq!(from, Calibration::Training, "{what}");
            assert_eq!(rows.len(), 3, "{what}: 500 rows in batches of 200");
            assert_eq!(source.position(), at, "{what}: the stream did not move");
            let next: Vec<_> = (0..3).map(|_| source.next_batch().unwrap()).collect();
            assert_eq!(rows.as_ref(), &next[..], "{what}: the stream's next batches");
            assert!(rows.iter().all(|b| !held_out.contains(b)), "{what}");
            if data.is_some() {
                // 4 of the first pass's 12.5 batches (2500 training rows) are drawn: 3 more stay
                // in it; after 7 more, the next 3 cross into the second pass, rows trained on.
                let (_, from) = calibrate::rows(&cfg, source.as_mut(), &held_out).unwrap();
                assert_eq!(from, Calibration::Training, "{what}: still the first pass");
                for _ in 0..7 {
                    source.next_batch().unwrap();
                }
                let (rows, from) = calibrate::rows(&cfg, source.as_mut(), &held_out).unwrap();
                assert_eq!((from, rows.as_ref()), (Calibration::HeldOut, &held_out[..]), "{what}: auto");
                let forced = TrainConfig { threshold_calibration: Calibration::Training, ..cfg.clone() };
                let (rows, from) = calibrate::rows(&forced, source.as_mut(), &held_out).unwrap();
                assert_eq!((from, rows.len()), (Calibration::Training, 3), "{what}: asked for");
            }
        }
    }
    // End to end: a run over its shards twice calibrates on the held-out rows, and its summary
    // counts the passes.
    let out = dir.path().join("two_passes");
    let mut a = vec!["train", "--data", shards.to_str().unwrap(), "--out", out.to_str().unwrap()];
    a.extend_from_slice(&["--sparsifier", "batchtopk", "--k", "4", "--d-sae", "64", "--batch-size", "200"]);
    a.extend_from_slice(&["--eval-tokens", "500", "--steps", "30", "--backend", "cpu", "--quiet"]);
    ok(&sae(&a));
    let s = json(&out.join("summary.json"));
    assert_eq!(s["calibration"]["rows"], "held_out", "{s}");
    assert_eq!(s["data_stats"]["epochs"], 2, "6000 rows drawn from 2500: {s}");
}

// ---- 6. the bimodality paper's setting -------------------------------------------------------------

#[test]
fn free_decoder_norms_and_l1_warmup() {
    let dir = tempfile::tempdir().unwrap();
    let norms = |run: &Path| -> Vec<f32> {
        let (state, _) = saetrain::train::checkpoint::load(run).unwrap();
        state.params.w_dec().chunks(state.shape().d_in).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect()
    };
    let mut runs = vec![];
    for (name, extra) in [
        ("unit", &[][..]),
        ("free", &["--decoder-norm", "free", "--l1-warmup-steps", "20"][..]),
        ("free_aligned", &["--decoder-norm", "free", "--aligned"][..]),
    ] {
        let out = dir.path().join(name);
        let mut a = vec!["train", "--out", out.to_str().unwrap(), "--sparsifier", "relu", "--d-sae", "256"];
        a.extend_from_slice(&[
            "--batch-size",
            "128",
            "--steps",
            "60",
            "--lr",
            "3e-3",
            "--log-every",
            "1",
            "--backend",
            "cpu",
        ]);
        a.push("--quiet");
        a.extend_from_slice(extra);
        ok(&sae(&a));
        runs.push(out);
    }
    assert!(norms(&runs[0]).iter().all(|n| (n - 1.0).abs() < 1e-4), "unit decoder rows");
    for run in &runs[1..] {
        let n = norms(run);
        let spread = n.iter().cloned().fold(f32::MIN, f32::max) - n.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 1e-3, "{}: free decoder norms did not move (spread {spread})", run.display());
    }
    // The L1 term rises linearly from 0: (step+1)/20 of its weight on the first step.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(runs[1].join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let l1 = |i: usize| lines[i]["l1_loss"].as_f64().unwrap();
    assert!(l1(0) > 0.0 && l1(0) < 0.2 * l1(30), "L1 at step 1 {} vs step 31 {}", l1(0), l1(30));
}

// ---- 5. the WTA paper's theta phase ---------------------------------------------------------------

#[test]
fn wta_theta_phase_filters_by_threshold_before_the_budgets() {
    use saetrain::backend::cpu::CpuBackend;
    use saetrain::model::{init, Shape, TrainState};
    let (d, f, rows) = (12, 40, 64);
    let cfg = TrainConfig {
        sparsifier: SparsifierKind::Wta,
        d_in: Some(d),
        d_sae: f,
        batch_size: rows,
        rate: Some(0.25),
        threshold_start: Some(0),
        wta_theta_steps: 5,
        ..TrainConfig::default()
    };
    assert!(!saetrain::sparsify::plan::in_theta_phase(&cfg, 0), "no threshold measured at step 0");
    assert!(saetrain::sparsify::plan::in_theta_phase(&cfg, 1) && saetrain::sparsify::plan::in_theta_phase(&cfg, 5));
    assert!(!saetrain::sparsify::plan::in_theta_phase(&cfg, 6));
    let x: Vec<f32> = (0..rows * d).map(|i| ((i * 37 % 23) as f32 / 11.0) - 0.5).collect();
    let mut state = TrainState::new(init::tied(Shape::new(d, f), 1, false));
    state.step = 2;
    // Latent 0's threshold is above everything, latent 1's at 0.5; the others unset (no filter).
    state.theta[0] = 1e9;
    state.theta[1] = 0.5;
    state.theta_set[0] = true;
    state.theta_set[1] = true;
    let mut be = CpuBackend::new(cfg.clone(), state.clone()).unwrap();
    let codes = be.gradients(&x, rows, true).unwrap().codes;
    let kept =
        |i: u32| -> Vec<f32> { codes.idx.iter().zip(&codes.val).filter(|(&j, _)| j == i).map(|(_, &v)| v).collect() };
    assert!(kept(0).is_empty(), "latent 0 is above no threshold");
    assert!(kept(1).iter().all(|&v| v > 0.5), "latent 1 kept {:?}", kept(1));
    assert!(codes.nnz() > kept(1).len(), "unfiltered latents still compete");
    // Outside the phase the plain rule keeps latent 0 again.
    state.step = 9;
    let mut be = CpuBackend::new(cfg, state).unwrap();
    let codes = be.gradients(&x, rows, true).unwrap().codes;
    assert!(codes.idx.contains(&0));
}

// ---- 7. MC/FC section 5: per-token normalisation, AdamW, gradient clipping -----------------------

/// Raw rows far from normalised: an offset, a scale, a zero row and a constant row.
fn raw_rows(d: usize, n: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..n * d).map(|i| 3.0 + 5.0 * (((i * 7919) % 211) as f32 / 105.0 - 1.0)).collect();
    x[..d].fill(0.0);
    x[d..2 * d].fill(2.5);
    x
}

#[test]
fn per_token_normalisation_gives_centred_unit_rows() {
    use saetrain::config::Normalize;
    use saetrain::data::normalize::per_token;
    let d = 16;
    let (y, stats) = per_token(&raw_rows(d, 50), d);
    for (b, row) in y.chunks(d).enumerate() {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!(mean.abs() < 1e-7, "row {b}: mean {mean}");
        match b {
            0 | 1 => {
                assert!(row.iter().all(|&v| v == 0.0) && stats[b].norm == 0.0, "row {b} (zero / constant) stays 0")
            }
            _ => assert!((norm - 1.0).abs() < 1e-6, "row {b}: norm {norm}"),
        }
    }
    // The pipeline applies it to training and held-out batches alike.
    let cfg = TrainConfig { normalize: Normalize::PerToken, batch_size: 64, synth_d_in: d, ..TrainConfig::default() };
    let mut src = saetrain::data::open_source(&cfg).unwrap();
    let mut batches = vec![src.next_batch().unwrap()];
    batches.extend(src.eval_batches(100).unwrap());
    for b in &batches {
        for row in b.to_f32().chunks(d) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            assert!(mean.abs() < 1e-6 && (norm - 1.0).abs() < 1e-5, "mean {mean}, norm {norm}");
        }
    }
    // Both spellings on the command line and in config files; `--normalize` alone and the bools
    // of older config files keep their meaning.
    let parse = |args: &[&str]| {
        let mut a = vec!["sae", "train"];
        a.extend_from_slice(args);
        match saetrain::cli::Cli::try_parse_from(a).unwrap().command {
            saetrain::cli::Command::Train(t) => t.cfg.normalize,
            _ => unreachable!(),
        }
    };
    assert_eq!(parse(&["--normalize", "per-token"]), Normalize::PerToken);
    assert_eq!(parse(&["--normalize", "per_token"]), Normalize::PerToken);
    assert_eq!(parse(&["--normalize"]), Normalize::Global);
    assert_eq!(parse(&[]), Normalize::None);
    let dir = tempfile::tempdir().unwrap();
    for (text, want) in [
        ("normalize = true", Normalize::Global),
        ("normalize = false", Normalize::None),
        ("normalize = \"per-token\"", Normalize::PerToken),
        ("normalize = \"per_token\"", Normalize::PerToken),
    ] {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        assert_eq!(TrainConfig::load(&p).unwrap().normalize, want, "{text}");
    }
    std::fs::write(dir.path().join("c.toml"), "normalize = \"layer\"").unwrap();
    let e = format!("{:#}", TrainConfig::load(&dir.path().join("c.toml")).unwrap_err());
    assert!(e.contains("normalize") && e.contains("per_token"), "{e}");
}

/// A plain reimplementation of SAELens's forward pass on raw rows: `layer_norm` with the
/// unbiased std and eps 1e-5 (sae_lens/saes/sae.py, run_time_activation_ln_in), then the
/// architecture's encoder on the file's weights, in f64.
fn saelens_topk_codes(sae: &saetrain::export::ExportedSae, x: &[f32], k: usize) -> Vec<Vec<(u32, f64)>> {
    let (d, f) = (sae.d_in, sae.d_sae);
    x.chunks(d)
        .map(|row| {
            let mu = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let std = (row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / (d - 1) as f64).sqrt();
            let y: Vec<f64> = row.iter().map(|&v| (v as f64 - mu) / (std + 1e-5)).collect();
            let mut pre: Vec<(u32, f64)> = (0..f)
                .map(|i| {
                    let w = &sae.w_enc[i * d..(i + 1) * d];
                    let p: f64 = (0..d).map(|j| (y[j] - sae.b_dec[j] as f64) * w[j] as f64).sum();
                    (i as u32, p + sae.b_enc[i] as f64)
                })
                .collect();
            pre.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut kept: Vec<(u32, f64)> = pre.into_iter().take(k).filter(|p| p.1 > 0.0).collect();
            kept.sort_by_key(|p| p.0);
            kept
        })
        .collect()
}

#[test]
fn per_token_runs_export_saes_that_normalise_raw_rows() {
    use saetrain::backend::{cpu::CpuBackend, Backend, InferMode};
    use saetrain::data::{normalize, Batch};
    use saetrain::export::saelens::RunTimeNorm;
    let dir = tempfile::tempdir().unwrap();
    for sparsifier in ["topk", "wta"] {
        let out = dir.path().join(sparsifier);
        ok(&sae(&[
            "train",
            "--out",
            out.to_str().unwrap(),
            "--sparsifier",
            sparsifier,
            "--normalize",
            "per-token",
            "--k",
            "4",
            "--d-sae",
            "128",
            "--synth-d-in",
            "32",
            "--batch-size",
            "128",
            "--steps",
            "40",
            "--backend",
            "cpu",
            "--quiet",
        ]));
        let cfg_json = json(&out.join("cfg.json"));
        assert_eq!(cfg_json["normalize_activations"], "layer_norm", "{sparsifier}");
        assert!(cfg_json["saetrain"]["per_token_normalize"]["note"].as_str().unwrap().contains("SAELens"));
        let exported = load_sae(&out).unwrap();
        assert_eq!(exported.norm, RunTimeNorm::LayerNorm { eps: 0.0 });

        // The loader on raw rows = the backend (the run's state, exported sparsifier) on the
        // normalised rows, codes and (mapped back) reconstructions.
        let (d, n) = (exported.d_in, 200);
        let x = raw_rows(d, n);
        let cfg = TrainConfig::load(&out.join("config.json")).unwrap();
        let (state, _) = saetrain::train::checkpoint::load(&out).unwrap();
        let mut backend = CpuBackend::new(cfg, state).unwrap();
        let (xn, stats) = normalize::per_token(&x, d);
        let inf = backend.infer(&Batch::from_f32(n, d, xn), InferMode::Exported).unwrap();
        let (codes, x_hat) = exported.forward(&x, n).unwrap();
        assert!(codes.nnz() > 0, "{sparsifier}: no codes");
        assert_eq!(codes.idx, inf.codes.idx, "{sparsifier}: the loader's codes on raw rows");
        for (a, b) in codes.val.iter().zip(&inf.codes.val) {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{sparsifier}: {a} vs {b}");
        }
        let mut want = inf.x_hat.clone();
        normalize::denormalize(&mut want, &stats, d);
        for (a, b) in x_hat.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{sparsifier}: x_hat {a} vs {b}");
        }
        // A SAELens user feeding raw rows with layer_norm (eps 1e-5) gets the same codes: the
        // eps moves the inputs by 1e-5 sqrt(d - 1) / ||x - mean|| relative, far below the gaps here.
        if sparsifier == "topk" {
            let theirs = saelens_topk_codes(&exported, &x, 4);
            for (b, row) in theirs.iter().enumerate() {
                let (ix, vs) = codes.row(b);
                assert_eq!(ix, row.iter().map(|p| p.0).collect::<Vec<_>>().as_slice(), "row {b}");
                for (a, (_, v)) in vs.iter().zip(row) {
                    assert!((*a as f64 - v).abs() < 1e-3 * v.abs().max(1.0), "row {b}: {a} vs SAELens {v}");
                }
            }
        }
        // `sae eval` reads the run on raw activations: exported and training rules agree (topk).
        let e = saetrain::eval::run::evaluate(&out, "r", &saetrain::eval::run::EvalOptions::default()).unwrap();
        let (ex, tr) = (e.exported.explained_variance, e.training.as_ref().unwrap().explained_variance);
        if sparsifier == "topk" {
            assert!((ex - tr).abs() < 1e-4, "exported EV {ex} vs training EV {tr}");
        }
        assert!(ex > 0.0, "{sparsifier}: exported EV {ex} on raw rows");
    }
    // A SAELens layer_norm file from elsewhere loads with SAELens's eps; the sparsify layout,
    // which has no normalisation, is refused for a per-token SAE.
    let other = dir.path().join("other");
    let mut c = json(&dir.path().join("topk").join("cfg.json"));
    c.as_object_mut().unwrap().remove("saetrain");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("cfg.json"), c.to_string()).unwrap();
    std::fs::copy(dir.path().join("topk").join("sae_weights.safetensors"), other.join("sae_weights.safetensors"))
        .unwrap();
    assert_eq!(load_sae(&other).unwrap().norm, RunTimeNorm::LayerNorm { eps: 1e-5 });
    let o = sae(&[
        "export",
        dir.path().join("topk").to_str().unwrap(),
        "--format",
        "sparsify",
        "--out",
        dir.path().join("sp").to_str().unwrap(),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("per-token"));
}

/// A fresh CPU backend on a tied initialisation (d 16, F 64), free decoder norms so that the
/// optimiser's effect on W_dec is not hidden by the renormalisation.
fn optimiser_backend(cfg: TrainConfig, step: u64, v: f32) -> saetrain::backend::cpu::CpuBackend {
    use saetrain::model::{init, Shape, TrainState};
    let mut params = init::tied(Shape::new(16, 64), 5, false);
    params.parts_mut().b_enc.iter_mut().enumerate().for_each(|(i, b)| *b = 0.01 * (i % 5) as f32);
    params.parts_mut().b_dec.iter_mut().enumerate().for_each(|(i, b)| *b = 0.1 * i as f32 - 0.5);
    let mut state = TrainState::new(params);
    state.step = step;
    state.adam_v.data.fill(v);
    saetrain::backend::cpu::CpuBackend::new(cfg, state).unwrap()
}

fn optimiser_cfg() -> TrainConfig {
    TrainConfig {
        sparsifier: SparsifierKind::Topk,
        d_sae: 64,
        d_in: Some(16),
        k: 4,
        aux: Some(vec![AuxKind::None]),
        decoder_norm: saetrain::config::DecoderNorm::Free,
        ..TrainConfig::default()
    }
}

#[test]
fn adamw_decays_the_weights_but_not_the_biases() {
    use saetrain::model::Params;
    use saetrain::sparse::SparseCodes;
    let (lr, wd) = (0.01f32, 0.5);
    let mut be = optimiser_backend(TrainConfig { weight_decay: wd, ..optimiser_cfg() }, 0, 0.0);
    let before = be.state_ref().params.clone();
    // A zero gradient: Adam's own update is 0, what moves is torch.optim.AdamW's p *= 1 - lr * wd.
    be.apply(Params::zeros(before.shape), &SparseCodes::empty(8, 64), 8, lr);
    let after = &be.state_ref().params;
    let factor = (1.0 - lr as f64 * wd) as f32;
    let (a, b) = (after.parts(), before.parts());
    for (name, got, was, decayed) in [
        ("W_enc", a.w_enc, b.w_enc, true),
        ("b_enc", a.b_enc, b.b_enc, false),
        ("W_dec", a.w_dec, b.w_dec, true),
        ("b_dec", a.b_dec, b.b_dec, false),
    ] {
        for (g, w) in got.iter().zip(was) {
            let want = if decayed { w * factor } else { *w };
            assert_eq!(*g, want, "{name}: {g} vs {want}");
        }
    }
    // Options: flags and config keys, errors naming them.
    let c =
        saetrain::cli::Cli::try_parse_from(["sae", "train", "--weight-decay", "0.1", "--grad-clip", "1.5"]).unwrap();
    let saetrain::cli::Command::Train(t) = c.command else { unreachable!() };
    assert_eq!((t.cfg.weight_decay, t.cfg.grad_clip), (0.1, 1.5));
    for (cfg, flag) in [
        (TrainConfig { weight_decay: -1.0, ..TrainConfig::default() }, "--weight-decay"),
        (TrainConfig { grad_clip: f64::NAN, ..TrainConfig::default() }, "--grad-clip"),
    ] {
        assert!(cfg.validate().unwrap_err().to_string().contains(flag), "{flag}");
    }
}

#[test]
fn grad_clip_bounds_the_update() {
    use saetrain::backend::Backend;
    use saetrain::data::Batch;
    // A gradient spike (inputs 50x their usual size) at a late step whose second moments are
    // those of gradients of norm C: clipped to C, the update obeys the bound
    // ||dp|| <= step_size (1 - beta1) C / sqrt(beta2 v); unclipped it is far larger.
    let (rows, d, n, lr) = (128usize, 16usize, 2 * 64 * 16 + 64 + 16, 1e-3f32);
    let x: Vec<f32> = rows_of(d, rows).iter().map(|v| 50.0 * v).collect();
    let batch = Batch::from_f32(rows, d, x.clone());
    let mut probe = optimiser_backend(optimiser_cfg(), 10_000, 0.0);
    let g = probe.gradients(&x, rows, false).unwrap().grad.data;
    let norm = g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let clip = norm / 1000.0;
    let v = (clip * clip / n as f64) as f32; // per-element second moment of a norm-C gradient
    let t = 10_001f64;
    let step_size = lr as f64 * (1.0 - 0.999f64.powf(t)).sqrt() / (1.0 - 0.9f64.powf(t));
    let bound = step_size * 0.1 * clip / (0.999 * v as f64).sqrt();
    let mut moved = vec![];
    for c in [0.0, clip] {
        let mut be = optimiser_backend(TrainConfig { grad_clip: c, ..optimiser_cfg() }, 10_000, v);
        let before = be.state_ref().params.data.clone();
        be.step(&batch, lr).unwrap();
        let after = &be.state_ref().params.data;
        moved.push(after.iter().zip(&before).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt());
        // The gradient Adam saw: m = (1 - beta1) g_clipped from zero moments.
        let m = be.state_ref().adam_m.data.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() / 0.1;
        let seen = if c > 0.0 { clip } else { norm };
        assert!((m - seen).abs() < 1e-3 * seen, "clip {c}: Adam saw a gradient of norm {m}, expected {seen}");
    }
    assert!(moved[1] <= bound * 1.001, "clipped update {} above the bound {bound}", moved[1]);
    assert!(moved[0] > 10.0 * bound, "unclipped update {} vs bound {bound}: the spike should show", moved[0]);
}

/// Rows with a fixed pattern and non-zero mean (inputs of the optimiser tests).
fn rows_of(d: usize, n: usize) -> Vec<f32> {
    (0..n * d).map(|i| (((i * 7919) % 211) as f32 / 70.0 - 1.0).max(0.0) + 0.1).collect()
}
