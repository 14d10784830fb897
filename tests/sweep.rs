//! `sae sweep` (issue 13 item 4): a 2 x 2 grid on the synthetic default, its table and pictures,
//! skipping finished runs, resuming an interrupted one and refusing a changed definition.

mod common;

use common::cli::{ok, sae, sae_signalled_when, stderr};
use std::path::Path;

const SHARED: &[&str] = &[
    "--synth-d-in",
    "16",
    "--synth-features",
    "32",
    "--d-sae",
    "64",
    "--batch-size",
    "64",
    "--steps",
    "50",
    "--eval-tokens",
    "256",
    "--backend",
    "cpu",
    "--quiet",
];

fn sweep(out: &Path, over: &[&str], extra: &[&str]) -> std::process::Output {
    let mut a = vec!["sweep", "--out", out.to_str().unwrap()];
    for o in over {
        a.extend(["--over", o]);
    }
    a.push("--");
    a.extend_from_slice(SHARED);
    a.extend_from_slice(extra);
    sae(&a)
}

const GRID: &[&str] = &["k=2,4", "sparsifier=topk,wta"];
const RUNS: [&str; 4] = ["k=2,sparsifier=topk", "k=2,sparsifier=wta", "k=4,sparsifier=topk", "k=4,sparsifier=wta"];

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn a_two_by_two_sweep_writes_its_runs_table_and_pictures_then_skips_resumes_and_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sw");
    ok(&sweep(&out, GRID, &[]));
    for r in RUNS {
        assert!(out.join(r).join("summary.json").is_file(), "{r}");
    }
    // The numbers: each row against the run's own `sae eval`, and FVU = 1 - EV.
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = res["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for (row, name) in runs.iter().zip(RUNS) {
        assert_eq!(row["name"], name);
        let e = saetrain::eval::run::evaluate(&out.join(name), name, &Default::default()).unwrap();
        assert_eq!(row["explained_variance"].as_f64().unwrap(), e.exported.explained_variance);
        assert_eq!(row["l0"].as_f64().unwrap(), e.exported.l0);
        assert_eq!(row["frac_dead"].as_f64().unwrap(), e.exported.dead as f64 / 64.0);
        assert_eq!(row["mmcs"].as_f64().unwrap(), e.recovery.unwrap().mmcs);
        let (ev, fvu) = (row["explained_variance"].as_f64().unwrap(), row["fvu"].as_f64().unwrap());
        assert!((ev + fvu - 1.0).abs() < 1e-12);
        assert_eq!(row["status"], "trained");
    }
    // topk keeps exactly k per token.
    assert_eq!(runs[0]["l0"].as_f64().unwrap(), 2.0);
    assert_eq!(runs[2]["l0"].as_f64().unwrap(), 4.0);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.starts_with("name,k,sparsifier,explained_variance,fvu"), "{csv}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for p in ["fvu", "explained_variance", "l0", "frac_dead", "mse", "mmcs"] {
        let bytes = std::fs::read(out.join(format!("sweep_{p}.png"))).unwrap();
        assert!(bytes.len() > 2000 && bytes.starts_with(b"\x89PNG"), "sweep_{p}.png");
        assert!(md.contains(&format!("(sweep_{p}.png)")), "report.md lacks {p}");
    }

    // Again: every run is skipped, nothing is rewritten.
    let w = out.join(RUNS[1]).join("sae_weights.safetensors");
    let before = mtime(&w);
    let o = sweep(&out, GRID, &[]);
    ok(&o);
    assert_eq!(stderr(&o).matches("finished earlier, skipped").count(), 4, "{}", stderr(&o));
    assert_eq!(mtime(&w), before);
    // An interrupted run (killed before it finished: no summary, no final weights) is resumed.
    let r = out.join(RUNS[3]);
    for f in ["summary.json", "trainer_state.safetensors", "sae_weights.safetensors", "cfg.json"] {
        std::fs::remove_file(r.join(f)).unwrap();
    }
    let o = sweep(&out, GRID, &[]);
    ok(&o);
    assert!(stderr(&o).contains(&format!("{}: interrupted earlier, resuming", RUNS[3])), "{}", stderr(&o));
    assert!(r.join("summary.json").is_file());
    assert_eq!(mtime(&w), before);

    // A changed grid or shared option is refused, naming the difference.
    let o = sweep(&out, &["k=2,8", "sparsifier=topk,wta"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("k=2,8") && stderr(&o).contains("mix results"), "{}", stderr(&o));
    let o = sweep(&out, GRID, &["--lr", "0.01"]);
    assert!(!o.status.success() && stderr(&o).contains("--lr 0.01"), "{}", stderr(&o));
    // Options that say how, not what, may change.
    ok(&sweep(&out, GRID, &["--threads", "1"]));

    // A point's directory holding a run trained there by hand with other settings is not this
    // sweep's: refused, naming the difference, instead of skipped into the table.
    let point = out.join(RUNS[0]);
    let mut a: Vec<&str> =
        vec!["train", "--out", point.to_str().unwrap(), "--overwrite", "--k", "2", "--sparsifier", "topk"];
    a.extend_from_slice(SHARED);
    let d_sae = a.iter().position(|x| *x == "--d-sae").unwrap();
    a[d_sae + 1] = "32";
    ok(&sae(&a));
    let o = sweep(&out, GRID, &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(RUNS[0]) && e.contains("--d-sae 32 (the point has 64)") && e.contains("not this sweep's run"),
        "{e}"
    );
    // While the sweep runs (holds its lock), a point it has not reached is not trained by hand.
    let held = saetrain::train::rundir::lock(&out).unwrap();
    let later = out.join("k=8,sparsifier=topk");
    let mut a: Vec<&str> = vec!["train", "--out", later.to_str().unwrap()];
    a.extend_from_slice(SHARED);
    let o = sae(&a);
    assert!(!o.status.success() && stderr(&o).contains("is a point of the sweep"), "{}", stderr(&o));
    assert!(!later.exists());
    drop(held);
}

#[test]
fn sweep_refuses_bad_grids_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sw");
    for (over, says) in [
        (&["nope=1,2"][..], "not a training option"),
        (&["k=2,2"][..], "repeats"),
        (&["lr=1e-3,0.001"][..], "values '1e-3' and '0.001' are the same value"),
        (&["k=2,02"][..], "values '2' and '02' are the same value"),
        (&["k=2,x"][..], "field k: invalid type: string \"x\", expected usize"),
        (&["out=a,b"][..], "cannot be swept"),
        (&["k=2,4", "seed=1,2", "lr=0.1"][..], "one or two"),
        (&["sparsifier=topk,bogus"][..], "sparsifier=bogus"),
    ] {
        let o = sweep(&out, over, &[]);
        assert!(!o.status.success(), "{over:?}");
        assert!(stderr(&o).contains(says), "{over:?}: {}", stderr(&o));
    }
    let o = sweep(&out, &["k=2,4"], &["--k", "3"]);
    assert!(!o.status.success() && stderr(&o).contains("is swept"), "{}", stderr(&o));
    assert!(!out.join("k=2").exists());
}

#[test]
fn sigint_stops_the_sweep_with_a_checkpoint_and_the_same_command_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sw");
    let out_s = out.to_str().unwrap();
    // Runs long enough (about a second each) that the signal comes during the first.
    let mut args = vec!["sweep", "--out", out_s, "--over", "k=2,4", "--"];
    args.extend_from_slice(SHARED);
    let steps = args.iter().position(|a| *a == "--steps").unwrap();
    args[steps + 1] = "4000";
    let o = sae_signalled_when(&args, &out.join("k=2").join("metrics.jsonl"), &[libc::SIGINT], false);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{e}");
    assert!(e.contains("sweep stopped") && e.contains("interrupted after step") && e.contains("SIGINT"), "{e}");
    assert!(out.join("k=2").join("trainer_state.safetensors").is_file(), "no checkpoint: {e}");
    assert!(!out.join("k=2").join("summary.json").is_file() && !out.join("k=4").exists(), "{e}");
    assert!(!out.join("results.json").exists());
    let o = sae(&args);
    ok(&o);
    assert!(stderr(&o).contains("k=2: interrupted earlier, resuming"), "{}", stderr(&o));
    assert!(out.join("k=4").join("summary.json").is_file() && out.join("results.json").is_file());
}

#[test]
fn a_diverging_point_is_recorded_and_the_sweep_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sw");
    // Adam's first step moves every weight by about lr: 1e37 overflows at once.
    let grid = &["lr=0.001,1e37"];
    let o = sweep(&out, grid, &[]);
    ok(&o);
    let e = stderr(&o);
    assert!(e.contains("lr=1e37: loss became") && e.contains("recorded as diverged"), "{e}");
    let why: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("lr=1e37").join("diverged.json")).unwrap()).unwrap();
    assert!(why["step"].is_u64() && why["loss"].is_string(), "{why}");
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = res["runs"].as_array().unwrap();
    assert_eq!((runs[0]["status"].as_str(), runs[1]["status"].as_str()), (Some("trained"), Some("diverged")));
    assert!(runs[0]["explained_variance"].is_f64() && runs[1]["explained_variance"].is_null());
    assert_eq!(runs[1]["diverged"], why);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert!(csv.lines().nth(2).unwrap().ends_with(",,,,,,,diverged"), "{csv}");
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("`lr=1e37` diverged: loss became"));
    assert!(out.join("sweep_fvu.png").is_file());
    // Again: neither is trained; the diverged one is said to be, with how to retry it.
    let o = sweep(&out, grid, &[]);
    ok(&o);
    assert!(stderr(&o).contains("lr=1e37: diverged earlier (loss became"), "{}", stderr(&o));
    assert!(stderr(&o).contains("remove") && stderr(&o).contains("finished earlier, skipped"), "{}", stderr(&o));
    // Its directory is a run directory of ours: --overwrite replaces it, diverged.json included.
    let run = out.join("lr=1e37");
    let mut a = vec!["train", "--out", run.to_str().unwrap(), "--overwrite"];
    a.extend_from_slice(SHARED);
    ok(&sae(&a));
    assert!(!run.join("diverged.json").exists() && run.join("summary.json").is_file());
}

/// A sweep holds out every point alike: a new sweep records whole token windows in sweep.json;
/// one defined before that was recorded, continued now, trains its new points with the layout of
/// the points it has started (here the earlier 256-row blocks), so that their held-out rows, and
/// so their metrics, are alike.
#[test]
fn a_continued_sweep_holds_out_new_points_like_its_earlier_ones() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("acts");
    ok(&sae(&["data", "synth", "--out", data.to_str().unwrap(), "--tokens", "2100", "--d-in", "16"]));
    // A harvest's manifest: windows of 7 rows.
    let manifest = data.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["extra"] = serde_json::json!({ "rows_per_window": 7, "context_length": 8 });
    std::fs::write(&manifest, m.to_string()).unwrap();
    let json = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let out = t.path().join("sweep");
    let run = || {
        let mut a = vec!["sweep", "--out", out.to_str().unwrap(), "--over", "k=2,4", "--"];
        a.extend(["--data", data.to_str().unwrap(), "--d-sae", "32", "--batch-size", "64", "--steps", "20"]);
        a.extend(["--eval-tokens", "600", "--backend", "cpu", "--quiet"]);
        ok(&sae(&a));
    };
    run();
    assert_eq!(json(&out.join("sweep.json"))["base"]["held_out_windows"], true);
    for p in ["k=2", "k=4"] {
        assert_eq!(json(&out.join(p).join("config.json"))["held_out_windows"], true, "{p}");
        let data = json(&out.join(p).join("summary.json"))["data"].as_str().unwrap().to_string();
        assert!(data.contains("1498 training rows, 602 held out"), "{p}: 86 windows of 7: {data}");
    }
    // As a sweep from before: no layout in sweep.json or in k=2's config.json, and k=4 not yet run.
    let strip = |p: &Path| {
        let mut v = json(p);
        let o = if v.get("base").is_some() { &mut v["base"] } else { &mut v };
        o.as_object_mut().unwrap().remove("held_out_windows");
        std::fs::write(p, v.to_string()).unwrap();
    };
    strip(&out.join("sweep.json"));
    strip(&out.join("k=2").join("config.json"));
    // Its checkpoint from before too: those recorded no config.
    let (state, mut meta) = saetrain::train::checkpoint::load(&out.join("k=2")).unwrap();
    meta.config = None;
    // ... and a data position of the layout its config now says (blocks of 256 rows: 1500
    // training rows), as such a run would have written.
    meta.position["train_rows"] = serde_json::json!(1500);
    meta.position["window"] = serde_json::json!(0);
    meta.position["offset"] = serde_json::json!(0);
    saetrain::train::checkpoint::save(&out.join("k=2"), &state, &meta).unwrap();
    std::fs::remove_dir_all(out.join("k=4")).unwrap();
    run();
    assert_eq!(json(&out.join("sweep.json"))["base"]["held_out_windows"], false, "recorded now");
    assert_eq!(json(&out.join("k=4").join("config.json"))["held_out_windows"], false);
    let data = json(&out.join("k=4").join("summary.json"))["data"].as_str().unwrap().to_string();
    assert!(data.contains("1500 training rows, 600 held out"), "blocks of 256, as k=2's: {data}");
    // Recorded, the layout stays; a third invocation changes nothing.
    run();
    assert_eq!(json(&out.join("sweep.json"))["base"]["held_out_windows"], false);
}
