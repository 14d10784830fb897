//! Run directories that never lie (issue 11): refusals, `--resume` option checks, the lock,
//! and resuming a run killed before its first checkpoint. Every case drives the `sae` binary as
//! a user would.

use std::path::Path;
use std::process::{Command, Output};

fn sae(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sae")).args(args).output().expect("run sae")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tiny run (about a second) into `out` with extra flags.
fn train(out: &Path, extra: &[&str]) -> Output {
    let mut a = vec![
        "train",
        "--out",
        out.to_str().unwrap(),
        "--synth-d-in",
        "16",
        "--synth-features",
        "32",
        "--d-sae",
        "64",
        "--k",
        "4",
        "--batch-size",
        "64",
        "--steps",
        "20",
        "--eval-tokens",
        "256",
        "--backend",
        "cpu",
        "--quiet",
    ];
    a.extend_from_slice(extra);
    sae(&a)
}

fn ok(o: &Output) {
    assert!(o.status.success(), "sae failed: {}", stderr(o));
}

#[test]
fn train_refuses_a_directory_holding_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("config.json"), "{\"my\": \"own file\"}").unwrap();
    std::fs::write(out.join("notes.txt"), "precious").unwrap();
    for extra in [&[][..], &["--overwrite"][..]] {
        let o = train(&out, extra);
        assert!(!o.status.success(), "must refuse ({extra:?})");
        let e = stderr(&o);
        assert!(e.contains("notes.txt") && e.contains("mine"), "{e}");
    }
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "{\"my\": \"own file\"}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "precious");
}

#[test]
fn train_refuses_a_finished_run_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(&out, &[]));
    let before = std::fs::read(out.join("sae_weights.safetensors")).unwrap();
    let o = train(&out, &["--seed", "5"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("previous run") && e.contains("--overwrite") && e.contains("--resume"), "{e}");
    assert_eq!(std::fs::read(out.join("sae_weights.safetensors")).unwrap(), before, "refused run changed the weights");
    ok(&train(&out, &["--seed", "5", "--overwrite"]));
    assert_ne!(std::fs::read(out.join("sae_weights.safetensors")).unwrap(), before, "--overwrite trains anew");
    // An empty directory is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    ok(&train(&empty, &[]));
}

#[test]
fn export_refuses_another_runs_directory_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok(&train(&a, &[]));
    ok(&train(&b, &["--seed", "3"]));
    let b_cfg = std::fs::read(b.join("cfg.json")).unwrap();
    let export = |extra: &[&str]| {
        let mut args = vec!["export", a.to_str().unwrap(), "--format", "saelens", "--out", b.to_str().unwrap()];
        args.extend_from_slice(extra);
        sae(&args)
    };
    let o = export(&[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("another training run"), "{}", stderr(&o));
    assert_eq!(std::fs::read(b.join("cfg.json")).unwrap(), b_cfg);
    ok(&export(&["--overwrite"]));
    // Into the run's own directory, and into a new one: no flag needed.
    ok(&sae(&["export", a.to_str().unwrap(), "--format", "saelens", "--out", a.to_str().unwrap()]));
    let fresh = dir.path().join("fresh");
    ok(&sae(&["export", a.to_str().unwrap(), "--format", "saelens", "--out", fresh.to_str().unwrap()]));
}

#[test]
fn resume_refuses_options_that_conflict_with_the_saved_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(&out, &["--checkpoint-every", "10"]));
    let o = sae(&["train", "--resume", out.to_str().unwrap(), "--d-sae", "999", "--k", "5", "--steps", "30"]);
    assert!(!o.status.success(), "conflicting flags must be refused");
    let e = stderr(&o);
    assert!(e.contains("--d-sae 999") && e.contains("64") && e.contains("--k 5"), "{e}");
    assert!(!e.contains("--steps 30"), "--steps may change: {e}");
    // Extending the run is allowed, recorded, and kept for the next resume.
    ok(&sae(&["train", "--resume", out.to_str().unwrap(), "--steps", "30", "--quiet"]));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["steps"], 30);
    let log = std::fs::read_to_string(out.join("resumes.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(line["at_step"], 20);
    assert_eq!(line["changed"]["steps"], serde_json::json!([20, 30]));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 30);
}

#[test]
fn a_second_writer_is_refused_with_the_holders_pid() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(&out, &[]));
    let held = saetrain::train::rundir::lock(&out).unwrap();
    let me = std::process::id().to_string();
    let o = sae(&["train", "--resume", out.to_str().unwrap(), "--quiet"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&me), "should name the holder's pid {me}: {}", stderr(&o));
    let o = train(&out, &["--overwrite"]);
    assert!(!o.status.success() && stderr(&o).contains(&me), "{}", stderr(&o));
    drop(held);
    ok(&sae(&["train", "--resume", out.to_str().unwrap(), "--quiet"]));
}

#[test]
fn a_run_killed_before_its_first_checkpoint_resumes_from_step_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (full, killed) = (dir.path().join("full"), dir.path().join("killed"));
    ok(&train(&full, &[]));
    ok(&train(&killed, &[]));
    // What a kill before the first checkpoint leaves: the config and a partial metrics file.
    for f in ["trainer_state.safetensors", "sae_weights.safetensors", "cfg.json", "summary.json"] {
        std::fs::remove_file(killed.join(f)).unwrap();
    }
    ok(&sae(&["train", "--resume", killed.to_str().unwrap(), "--quiet"]));
    assert_eq!(
        std::fs::read(killed.join("sae_weights.safetensors")).unwrap(),
        std::fs::read(full.join("sae_weights.safetensors")).unwrap(),
        "resumed-from-zero run differs from the uninterrupted one"
    );
}
