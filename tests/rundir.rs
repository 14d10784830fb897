//! Run directories that never lie (issue 11): refusals, `--resume` option checks, the lock,
//! resuming a run killed before its first checkpoint, failed writes that leave no temporary and
//! the last good checkpoint, and the start-up sweep of stale temporaries. Every case drives the
//! `sae` binary as a user would.

mod common;

use common::cli::{ok, sae, sae_signalled_when, sae_with_file_size_limit, stderr, temporaries, train, TINY};
use std::path::Path;

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

/// A run directory's cfg.json and sae_weights.safetensors are its own SAE: another SAE, another
/// layout or a lossy `--k` export there would make the directory lie, `--overwrite` or not. Only
/// the run's own plain SAELens export may go there (and into a fresh directory, no flag needed).
#[test]
fn export_never_replaces_a_runs_own_sae() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok(&train(&a, &[]));
    ok(&train(&b, &["--seed", "3"]));
    let before = |d: &Path| {
        (std::fs::read(d.join("cfg.json")).unwrap(), std::fs::read(d.join("sae_weights.safetensors")).unwrap())
    };
    let (a0, b0) = (before(&a), before(&b));
    let export = |out: &Path, format: &str, extra: &[&str]| {
        let mut args = vec!["export", a.to_str().unwrap(), "--format", format, "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        sae(&args)
    };
    for extra in [&[][..], &["--overwrite"][..]] {
        let o = export(&b, "saelens", extra);
        assert!(!o.status.success(), "{extra:?}");
        assert!(
            stderr(&o).contains("another training run") && stderr(&o).contains("choose another --out"),
            "{}",
            stderr(&o)
        );
        for (format, more, says) in [
            ("sparsify", &["--k", "4"][..], "sparsify layout's cfg.json"),
            ("saelens", &["--k", "4"][..], "k 4 (lossy)"),
        ] {
            let mut args = extra.to_vec();
            args.extend_from_slice(more);
            let o = export(&a, format, &args);
            assert!(!o.status.success(), "{format} {args:?} into the run's own directory");
            assert!(stderr(&o).contains("holds a training run") && stderr(&o).contains(says), "{}", stderr(&o));
        }
    }
    assert_eq!((before(&a), before(&b)), (a0, b0), "neither run's SAE may change");
    // Into the run's own directory (its own SAE again), and into a new one: no flag needed.
    ok(&export(&a, "saelens", &[]));
    let fresh = dir.path().join("fresh");
    ok(&export(&fresh, "saelens", &[]));
    // A checkpoint that is not a run is not converted in place.
    let o = sae(&[
        "export",
        fresh.to_str().unwrap(),
        "--format",
        "sparsify",
        "--k",
        "4",
        "--out",
        fresh.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("is the checkpoint being exported"), "{}", stderr(&o));
    assert!(!fresh.join("sae.safetensors").exists());
}

/// dictionary_learning's `config.json` has a training run's name: that layout is refused in any
/// run directory, the run's own included and with `--overwrite`, and the run's config survives.
/// An earlier export of that layout is an export's directory, not a run's, when written and when
/// read.
#[test]
fn the_dictionary_learning_layout_never_replaces_a_runs_config() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok(&train(&a, &[]));
    ok(&train(&b, &["--seed", "3"]));
    let configs = [std::fs::read(a.join("config.json")).unwrap(), std::fs::read(b.join("config.json")).unwrap()];
    let export = |out: &Path, extra: &[&str]| {
        let mut args =
            vec!["export", a.to_str().unwrap(), "--format", "dictionary-learning", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        sae(&args)
    };
    for (out, extra) in [(&a, &[][..]), (&a, &["--overwrite"][..]), (&b, &[][..]), (&b, &["--overwrite"][..])] {
        let o = export(out, extra);
        assert!(!o.status.success(), "{out:?} {extra:?} must be refused");
        let e = stderr(&o);
        let says = if out == &a { "config.json would replace" } else { "another training run" };
        assert!(e.contains("training run") && e.contains(says), "{e}");
    }
    assert_eq!([std::fs::read(a.join("config.json")).unwrap(), std::fs::read(b.join("config.json")).unwrap()], configs);
    assert!(!a.join("ae.pt").exists() && !b.join("ae.pt").exists());
    let dl = dir.path().join("dl");
    ok(&export(&dl, &[]));
    let o = export(&dl, &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("is not empty") && stderr(&o).contains("--overwrite"),
        "{}",
        stderr(&o)
    );
    ok(&export(&dl, &["--overwrite"]));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dl.join("config.json")).unwrap()).unwrap();
    let class = cfg["trainer"]["dict_class"].as_str().unwrap_or_default();
    assert!(["AutoEncoderTopK", "JumpReluAutoEncoder", "AutoEncoder"].contains(&class), "{cfg}");
    assert!(temporaries(&dl).is_empty(), "{:?}", temporaries(&dl));
    // Read back: its config.json is not taken for a run's (no held-out set to regenerate), and
    // it converts to the SAELens layout.
    let o = sae(&["eval", dl.to_str().unwrap(), "--no-plots", "--out", dir.path().join("ev").to_str().unwrap()]);
    assert!(
        !o.status.success() && stderr(&o).contains("not a run directory") && stderr(&o).contains("give --data"),
        "{}",
        stderr(&o)
    );
    let conv = dir.path().join("conv");
    ok(&sae(&["export", dl.to_str().unwrap(), "--format", "saelens", "--out", conv.to_str().unwrap()]));
    let sl: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(conv.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(sl["saetrain"]["converted_from"], "dictionary_learning");
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
    // An export into the run's own directory would write the trainer's files beside it.
    let weights = std::fs::read(out.join("sae_weights.safetensors")).unwrap();
    let o = sae(&["export", out.to_str().unwrap(), "--format", "saelens", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains(&me), "{}", stderr(&o));
    let o =
        sae(&["export", out.to_str().unwrap(), "--format", "saelens", "--out", out.to_str().unwrap(), "--overwrite"]);
    assert!(!o.status.success() && stderr(&o).contains(&me), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("sae_weights.safetensors")).unwrap(), weights);
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
    drop(held);
    ok(&sae(&["train", "--resume", out.to_str().unwrap(), "--quiet"]));
    ok(&sae(&["export", out.to_str().unwrap(), "--format", "saelens", "--out", out.to_str().unwrap()]));
}

/// The step a stopped run names in "interrupted after step N".
fn stopped_at(e: &str) -> u64 {
    let rest = e.split("interrupted after step ").nth(1).unwrap_or_else(|| panic!("no stop step: {e}"));
    rest.split(';').next().unwrap().parse().unwrap()
}

#[test]
fn sigint_sigterm_and_sighup_stop_a_run_after_its_step_with_a_checkpoint_that_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // An inherited ignore of SIGINT (a script's background command) is kept: SIGTERM stops it.
    for (signals, ignored, status) in [
        (&[libc::SIGINT][..], false, 130),
        (&[libc::SIGTERM][..], false, 143),
        (&[libc::SIGHUP][..], false, 129),
        (&[libc::SIGINT, libc::SIGTERM][..], true, 143),
    ] {
        let out = dir.path().join(format!("run{}{ignored}", signals[0]));
        // Far more steps than it will take, and no periodic checkpoint before the signal.
        let mut args = vec!["train", "--out", out.to_str().unwrap()];
        args.extend_from_slice(TINY);
        let steps = args.iter().position(|a| *a == "--steps").unwrap();
        args[steps + 1] = "10000000";
        args.extend_from_slice(&["--log-every", "1", "--checkpoint-every", "5000000"]);
        let o = sae_signalled_when(&args, &out.join("metrics.jsonl"), signals, ignored);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(status), "{e}");
        let by = match status {
            130 => "stopped by SIGINT",
            129 => "stopped by SIGHUP",
            _ => "stopped by SIGTERM",
        };
        assert!(e.contains(by) && !(ignored && e.contains("SIGINT")), "{e}");
        assert!(e.contains("--resume") && e.contains(out.to_str().unwrap()) && e.contains("stopped by SIG"), "{e}");
        let n = stopped_at(&e);
        assert!(n >= 1, "{e}");
        assert!(out.join("trainer_state.safetensors").is_file() && out.join("sae_weights.safetensors").is_file());
        assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
        // The checkpoint is at the step it stopped at: the resume starts there.
        let more = (n + 10).to_string();
        ok(&sae(&["train", "--resume", out.to_str().unwrap(), "--steps", &more, "--quiet"]));
        let log = std::fs::read_to_string(out.join("resumes.jsonl")).unwrap();
        let line: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
        assert_eq!(line["at_step"], n, "{log}");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["steps"], n + 10);
    }
}

/// A second signal while the first one's checkpoint is being written quits at once (128 + the
/// second signal), says so, and removes the partial trainer state; the run is large (a 400 MB
/// trainer state) so that the second signal comes while that temporary exists.
#[test]
fn a_second_signal_during_the_checkpoint_quits_and_removes_its_temporary() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut caught = 0;
    for (attempt, (first, second)) in
        [(libc::SIGTERM, libc::SIGHUP), (libc::SIGINT, libc::SIGTERM)].into_iter().enumerate()
    {
        let out = dir.path().join(format!("run{attempt}"));
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_sae"));
        c.args(["train", "--out", out.to_str().unwrap(), "--synth-d-in", "256", "--synth-features", "512"]);
        c.args(["--d-sae", "65536", "--k", "8", "--batch-size", "64", "--steps", "10000000", "--eval-tokens", "256"]);
        c.args(["--log-every", "1", "--checkpoint-every", "5000000", "--backend", "cpu"]);
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls (signal).
        unsafe {
            c.pre_exec(|| {
                for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::signal(s, libc::SIG_DFL);
                }
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        let kill = |sig| {
            // SAFETY: kill only signals our own child, not yet waited for.
            assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
        };
        let t = std::time::Instant::now();
        while !out.join("metrics.jsonl").exists() {
            assert!(t.elapsed().as_secs() < 120, "the run did not start");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        kill(first);
        let mut seen = false;
        while t.elapsed().as_secs() < 120 && !seen && !out.join("trainer_state.safetensors").exists() {
            seen = !temporaries(&out).is_empty();
            if !seen {
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
        }
        if seen {
            kill(second);
        }
        let o = child.wait_with_output().unwrap();
        let e = stderr(&o);
        if seen && o.status.code() == Some(128 + second) {
            caught += 1;
            assert!(e.contains("quit at once; the files being written are removed"), "{e}");
            assert!(temporaries(&out).is_empty(), "left behind: {:?}", temporaries(&out));
        } else {
            // The checkpoint was written before the second signal landed: it stopped after its step.
            assert_eq!(o.status.code(), Some(128 + first), "{e}");
            assert!(out.join("trainer_state.safetensors").is_file() && temporaries(&out).is_empty(), "{e}");
        }
    }
    assert!(caught > 0, "no second signal landed while the checkpoint was written in 2 attempts");
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

/// A finished run whose trainer state was deleted (to save space) cannot continue; resuming it
/// would have trained it again from step 0 over its SAE. Refused, and the SAE is untouched.
#[test]
fn resume_without_the_trainer_state_never_replaces_a_written_sae() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(&out, &[]));
    std::fs::remove_file(out.join("trainer_state.safetensors")).unwrap();
    let before = std::fs::read(out.join("sae_weights.safetensors")).unwrap();
    let o = sae(&["train", "--resume", out.to_str().unwrap(), "--steps", "40", "--quiet"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("trainer_state.safetensors is missing") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(out.join("sae_weights.safetensors")).unwrap(), before);
    assert!(!out.join("resumes.jsonl").exists());
}

#[test]
fn a_failed_checkpoint_write_names_the_file_leaves_no_temporary_and_the_last_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(&out, &["--checkpoint-every", "10"]));
    let good = std::fs::read(out.join("trainer_state.safetensors")).unwrap();
    // Extend it to 40 steps with every file limited to 16 KiB: the config and metrics fit, the
    // 27 KB trainer state of the checkpoint at step 30 does not (EFBIG half-way through).
    let run = out.to_str().unwrap();
    let o = sae_with_file_size_limit(16 * 1024, &["train", "--resume", run, "--steps", "40", "--quiet"]);
    assert!(!o.status.success(), "a failed checkpoint write must fail the run");
    let e = stderr(&o);
    let target = out.join("trainer_state.safetensors").display().to_string();
    assert!(e.contains(&target) && e.contains("File too large"), "the error must name {target}: {e}");
    assert_eq!(temporaries(&out), Vec::<String>::new(), "the failed write left its temporary");
    assert_eq!(std::fs::read(out.join("trainer_state.safetensors")).unwrap(), good, "last good checkpoint changed");
    let (_, meta) = saetrain::train::checkpoint::load(&out).expect("the last good checkpoint loads");
    assert_eq!(meta.step, 20);
    ok(&sae(&["train", "--resume", run, "--steps", "40", "--quiet"]));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 40);
}

/// Plant temporaries in `dir`: ours of a dead writer (must go), ours of a live writer and the
/// user's look-alikes (must stay). Returns (stale, kept).
fn plant_temporaries(dir: &Path, stale_names: &[&str]) -> (Vec<String>, Vec<String>) {
    // A pid no process has (checked rather than assumed).
    let dead = 999_999u32;
    assert!(!Path::new(&format!("/proc/{dead}")).exists(), "pid {dead} is alive here");
    let live = std::process::id();
    let stale: Vec<String> = stale_names.iter().map(|n| format!(".{n}.{dead}.tmp")).collect();
    let kept: Vec<String> = [
        format!(".trainer_state.safetensors.{live}.tmp"), // a live writer's
        ".notes.tmp".into(),
        "x.tmp".into(),
        format!(".notes.{dead}.tmp"), // our pattern, but not a file we write
    ]
    .into();
    for n in stale.iter().chain(&kept) {
        std::fs::write(dir.join(n), b"partial").unwrap();
    }
    (stale, kept)
}

fn assert_swept(dir: &Path, stale: &[String], kept: &[String], what: &str) {
    for n in stale {
        assert!(!dir.join(n).exists(), "{what}: stale {n} was not removed");
    }
    for n in kept {
        assert!(dir.join(n).exists(), "{what}: {n} must not be touched");
    }
}

#[test]
fn stale_temporaries_of_dead_writers_are_swept_at_start_up_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    // Resume: a kill -9 during a checkpoint left the state's and the weights' temporaries.
    let out = dir.path().join("run");
    ok(&train(&out, &[]));
    let (stale, kept) = plant_temporaries(&out, &["trainer_state.safetensors", "sae_weights.safetensors"]);
    ok(&sae(&["train", "--resume", out.to_str().unwrap(), "--steps", "25", "--quiet"]));
    assert_swept(&out, &stale, &kept, "train --resume");

    // A new run into a directory holding only a dead writer's temporary.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    std::fs::write(fresh.join(".config.json.999999.tmp"), b"{").unwrap();
    ok(&train(&fresh, &[]));
    assert_eq!(temporaries(&fresh), Vec::<String>::new(), "new run");

    // Export into the run's own directory after an export was killed.
    for n in &kept {
        std::fs::remove_file(out.join(n)).unwrap();
    }
    let (stale, kept) = plant_temporaries(&out, &["cfg.json", "sae_weights.safetensors"]);
    let run = out.to_str().unwrap();
    ok(&sae(&["export", run, "--format", "saelens", "--out", run]));
    assert_swept(&out, &stale, &kept, "export");
}

/// A signal during `sae export` ends it at once (status 128 + the signal) and removes the
/// temporary it was writing; before, the default action killed it and left a partial file of
/// the model's size behind. The export is a large one (128 MB), so that the signal comes while its
/// temporary exists: the test waits for that file to appear.
#[test]
fn a_signal_during_an_export_removes_the_temporary_being_written() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let sae = common::constant_topk_sae(512, 32768, 0.01);
    let src = dir.path().join("src");
    sae.save_saelens(&src, serde_json::json!({}), None).unwrap();
    drop(sae);
    let mut caught = 0;
    for (attempt, sig) in [(0, libc::SIGINT), (1, libc::SIGTERM), (2, libc::SIGINT), (3, libc::SIGTERM)] {
        let out = dir.path().join(format!("out{attempt}"));
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_sae"));
        c.args(["export", src.to_str().unwrap(), "--format", "saelens", "--out", out.to_str().unwrap()]);
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls (signal).
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        let t = std::time::Instant::now();
        let mut seen = false;
        while t.elapsed().as_secs() < 60 && !seen {
            seen = !temporaries(&out).is_empty();
            if !seen {
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
        }
        if seen {
            // SAFETY: kill only signals our own child, not yet waited for.
            assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
        }
        let o = child.wait_with_output().unwrap();
        if seen && o.status.code() == Some(128 + sig) {
            caught += 1;
            assert!(stderr(&o).contains("stopped; the files being written are removed"), "{}", stderr(&o));
            assert!(temporaries(&out).is_empty(), "left behind: {:?}", temporaries(&out));
        } else {
            // The export finished before the signal landed: it must then be whole.
            assert!(o.status.success(), "{}", stderr(&o));
            assert!(temporaries(&out).is_empty());
        }
    }
    assert!(caught > 0, "no signal landed during the write in 4 attempts");
}

/// A relative `--data` is recorded as an absolute path, so that `--resume` (and `sae eval`) from
/// another directory find the data. A run recorded with a relative path (before) resumes from
/// elsewhere when `--data` gives the path from there (recorded in resumes.jsonl), and the
/// same data under another spelling is no change at all.
#[test]
fn a_relative_data_path_resumes_from_another_directory() {
    use saetrain::data::{format::write_npy, Dtype};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir_all(root.join("rel")).unwrap();
    std::fs::create_dir_all(root.join("elsewhere")).unwrap();
    let x: Vec<f32> = (0..2048 * 16).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5).collect();
    write_npy(&root.join("rel/a.npy"), Dtype::Float32, 2048, 16, &x).unwrap();
    let run_in = |cwd: &Path, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sae")).args(args).current_dir(cwd).output().unwrap()
    };
    let train_args = [
        "train",
        "--data",
        "rel/a.npy",
        "--out",
        "run",
        "--d-sae",
        "32",
        "--k",
        "4",
        "--batch-size",
        "64",
        "--steps",
        "20",
        "--eval-tokens",
        "256",
        "--checkpoint-every",
        "10",
        "--backend",
        "cpu",
        "--quiet",
    ];
    ok(&run_in(&root, &train_args));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("run/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["data"], root.join("rel/a.npy").to_str().unwrap());
    let run = root.join("run");
    ok(&run_in(&root.join("elsewhere"), &["train", "--resume", run.to_str().unwrap(), "--steps", "30", "--quiet"]));
    ok(&run_in(&root.join("elsewhere"), &["eval", run.to_str().unwrap(), "--no-plots"]));
    // The same file by another spelling: not a change.
    let o = run_in(&root, &["train", "--resume", "run", "--data", "./rel/../rel/a.npy", "--steps", "40", "--quiet"]);
    ok(&o);
    assert!(!std::fs::read_to_string(run.join("resumes.jsonl")).unwrap().contains("\"data\""));
    // A config recorded with a relative path: from elsewhere it no longer leads to the data, and
    // --data with the path from here is taken (and recorded).
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    cfg["data"] = "rel/a.npy".into();
    std::fs::write(run.join("config.json"), cfg.to_string()).unwrap();
    let o = run_in(&root.join("elsewhere"), &["train", "--resume", run.to_str().unwrap(), "--steps", "50", "--quiet"]);
    assert!(!o.status.success() && stderr(&o).contains("rel/a.npy"), "{}", stderr(&o));
    let abs = root.join("rel/a.npy");
    let args =
        ["train", "--resume", run.to_str().unwrap(), "--data", abs.to_str().unwrap(), "--steps", "50", "--quiet"];
    ok(&run_in(&root.join("elsewhere"), &args));
    let log = std::fs::read_to_string(run.join("resumes.jsonl")).unwrap();
    assert!(log.lines().last().unwrap().contains("\"data\""), "{log}");
}

/// A resume continues the run its checkpoint is of: a config.json edited since (or a trainer
/// state copied from another run) is refused with every difference named, and a damaged trainer
/// state is refused naming the tensor, instead of resuming into a NaN blamed on --lr.
#[test]
fn resume_refuses_an_edited_config_and_a_damaged_trainer_state() {
    use saetrain::train::checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&train(&out, &["--checkpoint-every", "10"]));
    let config = out.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&original).unwrap();
    c["lr"] = serde_json::json!(0.5);
    c["seed"] = serde_json::json!(7);
    std::fs::write(&config, c.to_string()).unwrap();
    let resume = || sae(&["train", "--resume", out.to_str().unwrap(), "--steps", "30", "--quiet"]);
    let o = resume();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("lr 0.5 (the checkpoint was trained with") && e.contains("seed 7") && e.contains("edited"),
        "{e}"
    );
    std::fs::write(&config, &original).unwrap();
    let (mut state, meta) = checkpoint::load(&out).unwrap();
    state.adam_v.data[3] = f32::NAN;
    checkpoint::save(&out, &state, &meta).unwrap();
    let o = resume();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("tensor 'adam_v' holds NaN at index 3") && e.contains("damaged"), "{e}");
    state.adam_v.data[3] = 0.0;
    checkpoint::save(&out, &state, &meta).unwrap();
    ok(&resume());
}

/// A refused `sae train --out` leaves the user's directory as it was (no lock file), and a
/// dangling symbolic link as --out says so.
#[test]
fn a_refused_out_is_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "x").unwrap();
    for extra in [&[][..], &["--overwrite"][..]] {
        let o = train(&mine, extra);
        assert!(!o.status.success(), "{extra:?}");
        let names: Vec<String> =
            std::fs::read_dir(&mine).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        assert_eq!(names, ["notes.txt"], "{extra:?}");
    }
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
    let o = train(&link, &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("is a symbolic link to") && stderr(&o).contains("nowhere"),
        "{}",
        stderr(&o)
    );
}

/// A sweep killed while writing its own files (sweep.json, the results, the report, a picture)
/// leaves temporaries: the next run of the sweep removes them, as train, export and eval do.
#[test]
fn a_sweep_sweeps_the_temporaries_of_its_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let sw = dir.path().join("sw");
    let mut a = vec!["sweep", "--over", "lr=0.001", "--out", sw.to_str().unwrap(), "--no-plots", "--"];
    a.extend_from_slice(TINY);
    ok(&sae(&a));
    let (stale, _) = plant_temporaries(&sw, &["results.csv", "sweep.json", "report.md", "sweep_fvu.png"]);
    ok(&sae(&a));
    assert_swept(&sw, &stale, &[], "sweep");
}

/// Two exports, or two evaluations, into one directory: the second is refused while the first
/// holds the directory (a lock on the directory itself, so no `.sae.lock` makes it look like a
/// run), and a new --out left by a refused export is removed again.
#[test]
fn an_export_or_eval_into_a_directory_another_process_writes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(&train(&run, &[]));
    for (what, out) in [("export", dir.path().join("x")), ("eval", dir.path().join("ev"))] {
        std::fs::create_dir(&out).unwrap();
        let held = saetrain::util::dirlock::lock_dir(&out, "test").unwrap();
        let o = match what {
            "export" => sae(&["export", run.to_str().unwrap(), "--format", "saelens", "--out", out.to_str().unwrap()]),
            _ => sae(&["eval", run.to_str().unwrap(), "--no-plots", "--out", out.to_str().unwrap()]),
        };
        assert!(!o.status.success() && stderr(&o).contains("another sae process is writing there"), "{}", stderr(&o));
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "{what} wrote into a locked directory");
        drop(held);
        std::fs::remove_dir(&out).unwrap();
    }
    // A refused export (here: its input is no SAE) leaves no new --out behind.
    let x = dir.path().join("x");
    let o = sae(&["export", dir.path().to_str().unwrap(), "--format", "saelens", "--out", x.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(!x.exists(), "the refused export left {}", x.display());
}

/// Shards a `sae data synth` is still writing (it holds the directory's lock) are not trained on.
#[test]
fn train_refuses_data_that_is_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    ok(&sae(&["data", "synth", "--out", ds.to_str().unwrap(), "--tokens", "2000", "--d-in", "16"]));
    let held = saetrain::train::rundir::lock(&ds).unwrap();
    let out = dir.path().join("run");
    let args = ["train", "--data", ds.to_str().unwrap(), "--out", out.to_str().unwrap(), "--steps", "5"];
    let args = [&args[..], &["--batch-size", "64", "--eval-tokens", "256", "--quiet"]].concat();
    let o = sae(&args);
    assert!(!o.status.success() && stderr(&o).contains("is being written now"), "{}", stderr(&o));
    drop(held);
    ok(&sae(&args));
}
