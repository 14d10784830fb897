//! Training history (issue 13 item 3): `--keep-checkpoints N` keeps the SAE every N steps,
//! `history.jsonl` summarises weights and densities, `sae eval --history RUN` draws both; kept
//! checkpoints survive `--resume` after a kill and go with `--overwrite`.

mod common;

use common::cli::{ok, sae, stderr, train};
use saetrain::train::history::{Histogram, HistoryLine, ALIGNMENT_RANGE, QUANTILES};
use std::path::Path;

/// `common::cli::TINY` with its own `--steps 20` left out (each test says how many).
fn tiny(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--out", out.to_str().unwrap()].map(String::from).to_vec();
    let t = common::cli::TINY;
    let mut i = 0;
    while i < t.len() {
        if t[i] == "--steps" {
            i += 2;
            continue;
        }
        a.push(t[i].to_string());
        i += 1;
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn train_steps(out: &Path, extra: &[&str]) -> std::process::Output {
    let a = tiny(out, extra);
    sae(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn kept(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Plain f64: per latent `W_enc_i . W_dec_i` of F x d row-major matrices.
fn plain_alignment(w_enc: &[f32], w_dec: &[f32], d: usize) -> Vec<f64> {
    w_enc
        .chunks(d)
        .zip(w_dec.chunks(d))
        .map(|(e, w)| e.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum())
        .collect()
}

fn plain_quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pos = q * (s.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    if i + 1 < s.len() {
        s[i] * (1.0 - f) + s[i + 1] * f
    } else {
        s[i]
    }
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}: {a} vs {b}");
}

#[test]
fn kept_checkpoints_and_history_match_plain_computations_and_load_in_eval() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(&train_steps(&run, &["--steps", "30", "--keep-checkpoints", "10", "--log-every", "5", "--sparsifier", "topk"]));
    assert_eq!(kept(&run), ["step_000010", "step_000020", "step_000030"]);
    for k in kept(&run) {
        for f in ["cfg.json", "sae_weights.safetensors", "config.json"] {
            assert!(run.join("checkpoints").join(&k).join(f).is_file(), "{k}/{f}");
        }
    }
    // The last kept checkpoint is the run's final SAE.
    assert_eq!(
        std::fs::read(run.join("checkpoints/step_000030/sae_weights.safetensors")).unwrap(),
        std::fs::read(run.join("sae_weights.safetensors")).unwrap()
    );
    // history.jsonl: a line per logging step; the last one against the final trainer state.
    let lines: Vec<HistoryLine> = std::fs::read_to_string(run.join("history.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().map(|l| l.step).collect::<Vec<_>>(), [5, 10, 15, 20, 25, 30]);
    let (state, meta) = saetrain::train::checkpoint::load(&run).unwrap();
    let a = plain_alignment(state.params.w_enc(), state.params.w_dec(), meta.d_in);
    let last = lines.last().unwrap();
    close(last.alignment.mean, a.iter().sum::<f64>() / a.len() as f64, 1e-9, "alignment mean");
    for (i, q) in QUANTILES.iter().enumerate() {
        close(last.alignment.quantiles[i], plain_quantile(&a, *q), 1e-9, "alignment quantile");
    }
    let (lo, hi, n) = ALIGNMENT_RANGE;
    let mut counts = vec![0u64; n];
    for v in &a {
        let i = ((v - lo) / ((hi - lo) / n as f64)).floor() as usize;
        counts[i.min(n - 1)] += 1;
    }
    assert_eq!(last.alignment.hist.counts, counts);
    assert_eq!(last.alignment.frac_above_0_9, a.iter().filter(|x| **x > 0.9).count() as f64 / a.len() as f64);
    let dens: Vec<f64> = state.density.iter().map(|p| *p as f64).collect();
    close(last.density.quantiles[2], plain_quantile(&dens, 0.5), 1e-12, "median density");
    close(last.density.mean, dens.iter().sum::<f64>() / dens.len() as f64, 1e-12, "mean density");
    assert_eq!(Histogram::of([-1.0, 0.0, 0.5, 1.0, 2.0, f64::NAN], (0.0, 1.0, 2)).counts, [1, 2]);

    // A kept checkpoint loads in `sae eval` (its config regenerates the held-out set).
    let ev = dir.path().join("ev10");
    ok(&sae(&["eval", run.join("checkpoints/step_000010").to_str().unwrap(), "--out", ev.to_str().unwrap()]));
    let e10 = json(&ev.join("eval.json"));

    // `sae eval --history`: table, pictures, numbers.
    let o = sae(&["eval", "--history", run.to_str().unwrap()]);
    ok(&o);
    let out = run.join("eval-history");
    let doc = json(&out.join("eval.json"));
    let cps = doc["history"]["checkpoints"].as_array().unwrap();
    assert_eq!(cps.iter().map(|c| c["step"].as_u64().unwrap()).collect::<Vec<_>>(), [10, 20, 30]);
    close(
        cps[0]["explained_variance"].as_f64().unwrap(),
        e10["runs"][0]["exported"]["explained_variance"].as_f64().unwrap(),
        1e-12,
        "EV of step 10",
    );
    let sae30 = saetrain::export::load::load_sae(&run.join("checkpoints/step_000030")).unwrap();
    let a30 = plain_alignment(&sae30.w_enc, &sae30.w_dec, sae30.d_in);
    close(cps[2]["alignment"]["mean"].as_f64().unwrap(), a30.iter().sum::<f64>() / a30.len() as f64, 1e-9, "ckpt");
    close(cps[2]["l0"].as_f64().unwrap(), 4.0, 0.0, "topk L0");
    assert_eq!(doc["history"]["log"].as_array().unwrap().len(), 6);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| 20 |") && md.contains("Kept checkpoints"), "{md}");
    for p in ["history_alignment", "history_density"] {
        let bytes = std::fs::read(out.join(format!("{p}.png"))).unwrap();
        assert!(bytes.len() > 2000 && bytes.starts_with(b"\x89PNG"), "{p}.png");
        assert!(md.contains(&format!("({p}.png)")), "report.md lacks {p}");
    }

    // --overwrite removes the kept checkpoints with the rest of the run, and the run's own
    // evaluations, which describe the SAE it replaces; a file of the user's among them is not
    // the tool's to remove, so it refuses then.
    std::fs::write(run.join("eval-history/notes.txt"), "mine").unwrap();
    let o = train(&run, &["--overwrite"]);
    assert!(!o.status.success() && stderr(&o).contains("eval-history"), "{}", stderr(&o));
    std::fs::remove_file(run.join("eval-history/notes.txt")).unwrap();
    ok(&train(&run, &["--overwrite"]));
    assert!(kept(&run).is_empty() && !run.join("checkpoints").exists());
    assert!(!run.join("eval-history").exists(), "the earlier SAE's evaluation goes with it");
}

#[test]
fn a_run_without_history_degrades_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(&train(&run, &["--history-every", "0"]));
    let o = sae(&["eval", "--history", run.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("no training history") && e.contains("--keep-checkpoints"), "{e}");
    // With history.jsonl but no kept checkpoints: the pictures from the log, and a note.
    let run2 = dir.path().join("run2");
    ok(&train(&run2, &["--log-every", "5"]));
    let o = sae(&["eval", "--history", run2.to_str().unwrap(), "--out", dir.path().join("h").to_str().unwrap()]);
    ok(&o);
    assert!(stderr(&o).contains("no kept checkpoints"), "{}", stderr(&o));
    assert!(std::fs::read(dir.path().join("h/history_alignment.png")).unwrap().starts_with(b"\x89PNG"));
    assert!(std::fs::read(dir.path().join("h/history_density.png")).unwrap().starts_with(b"\x89PNG"));
}

#[test]
fn resume_after_a_kill_keeps_the_kept_checkpoints_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let args = tiny(&run, &["--steps", "1000000", "--keep-checkpoints", "10", "--checkpoint-every", "10"]);
    /// Killed however the test ends, so that a failed assertion leaves no trainer running.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Child(std::process::Command::new(env!("CARGO_BIN_EXE_sae")).args(&args).spawn().unwrap());
    let t0 = std::time::Instant::now();
    // Both the kept checkpoint of step 30 and a trainer state at least that far (written
    // separately, so one can exist without the other for a moment).
    let state_at_30 = || saetrain::train::checkpoint::load(&run).is_ok_and(|(_, m)| m.step >= 30);
    while !(run.join("checkpoints/step_000030/config.json").is_file() && state_at_30()) {
        assert!(t0.elapsed().as_secs() < 60, "no kept checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    drop(child); // SIGKILL
    let (_, meta) = saetrain::train::checkpoint::load(&run).unwrap();
    let s = meta.step;
    let before: Vec<(String, Vec<u8>)> = kept(&run)
        .into_iter()
        .filter(|k| saetrain::train::history::parse_kept(k).unwrap() <= s)
        .map(|k| {
            let b = std::fs::read(run.join("checkpoints").join(&k).join("sae_weights.safetensors")).unwrap();
            (k, b)
        })
        .collect();
    let names: Vec<&String> = before.iter().map(|(k, _)| k).collect();
    assert!(before.len() >= 3, "kept checkpoints up to step {s}: {names:?}");
    let steps = (s + 25).to_string();
    ok(&sae(&["train", "--resume", run.to_str().unwrap(), "--steps", &steps, "--quiet"]));
    for (k, b) in &before {
        let now = std::fs::read(run.join("checkpoints").join(k).join("sae_weights.safetensors")).unwrap();
        assert_eq!(&now, b, "{k} changed on resume");
    }
    let want: Vec<String> = (1..)
        .map(|i| i * 10)
        .take_while(|x| *x <= s + 25)
        .chain([s + 25])
        .map(saetrain::train::history::kept_name)
        .collect();
    assert_eq!(kept(&run), want);
    let hist: Vec<u64> = std::fs::read_to_string(run.join("history.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert!(hist.windows(2).all(|w| w[0] < w[1]), "history steps repeat or go back: {hist:?}");
    assert_eq!(*hist.last().unwrap(), s + 25);
}
