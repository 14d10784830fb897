//! Hostile but fair use of `sae train | eval | export` (issue 11), one row per case: what is set
//! up, the command, whether it must succeed, what stderr must say and what must hold after.
//! Failed writes are real ones: the child runs under a file-size limit (see
//! `common::cli::sae_with_file_size_limit`).

mod common;

use common::cli::{ok, sae, sae_with_file_size_limit, stderr, temporaries, train};
use saetrain::data::format::write_npy;
use saetrain::data::Dtype;
use std::path::Path;
use std::process::Output;

struct Case {
    name: &'static str,
    /// Builds the case in the directory; returns the command line after `sae`.
    setup: fn(&Path) -> Vec<String>,
    /// Limit on the size of every file the command writes (bytes).
    file_size_limit: Option<u64>,
    succeeds: bool,
    /// Each must appear in stderr.
    says: &'static [&'static str],
    /// What must hold afterwards (panics otherwise).
    after: fn(&Path, &Output),
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// [`s`], where a local named `s` hides it.
fn s_(p: &Path) -> String {
    s(p)
}

/// `rows` x 16 float32 activations; every `nan_every`-th row (when > 0) holds a NaN.
fn acts(path: &Path, rows: usize, nan_every: usize) {
    let d = 16;
    let mut x: Vec<f32> = (0..rows * d).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5).collect();
    if nan_every > 0 {
        for r in (nan_every / 2..rows).step_by(nan_every) {
            x[r * d + 3] = f32::NAN;
        }
    }
    write_npy(path, Dtype::Float32, rows, d, &x).unwrap();
}

/// Train flags for data on disk (d_in 16).
fn train_on(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--data", &s(data), "--out", &s(out)].map(String::from).into();
    let rest = ["--d-sae", "64", "--k", "4", "--batch-size", "64", "--steps", "40", "--eval-tokens", "256"];
    a.extend(rest.iter().chain(&["--backend", "cpu", "--quiet"]).chain(extra).map(|x| x.to_string()));
    a
}

fn no_temporaries(dir: &Path) {
    assert_eq!(temporaries(dir), Vec::<String>::new(), "temporaries left in {}", dir.display());
}

fn nothing(_: &Path, _: &Output) {}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

const CASES: &[Case] = &[
    Case {
        name: "a manifest value of the wrong type names its field",
        setup: |d| {
            std::fs::create_dir(d.join("ds")).unwrap();
            acts(&d.join("ds/a.npy"), 1024, 0);
            acts(&d.join("ds/b.npy"), 1024, 0);
            let m = r#"{"d_in": 16, "dtype": "float32", "shards": [{"file": "a.npy", "rows": 1024}, {"file": "b.npy", "rows": "1024"}]}"#;
            std::fs::write(d.join("ds/manifest.json"), m).unwrap();
            train_on(&d.join("ds"), &d.join("run"), &[])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["manifest.json", "field shards[1].rows", "invalid type: string \"1024\""],
        after: |d, _| assert!(!d.join("run/trainer_state.safetensors").exists()),
    },
    Case {
        name: "an optional manifest field this tool reads, of the wrong type, is refused (not ignored)",
        setup: |d| {
            std::fs::create_dir(d.join("ds")).unwrap();
            acts(&d.join("ds/a.npy"), 1024, 0);
            let m = r#"{"d_in": 16, "dtype": "float32", "shards": [{"file": "a.npy", "rows": 1024}], "extra": {"rows_per_window": "128"}}"#;
            std::fs::write(d.join("ds/manifest.json"), m).unwrap();
            train_on(&d.join("ds"), &d.join("run"), &[])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["manifest.json", "field extra.rows_per_window = \"128\"", "expected a positive integer"],
        after: |d, _| assert!(!d.join("run/trainer_state.safetensors").exists()),
    },
    Case {
        name: "a config file value of the wrong type names its field",
        setup: |d| {
            std::fs::write(d.join("c.json"), r#"{"k": 4, "lr": "fast"}"#).unwrap();
            ["train", "--config", &s(&d.join("c.json")), "--out", &s(&d.join("run")), "--steps", "5"]
                .map(String::from)
                .into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["c.json", "field lr: invalid type: string \"fast\", expected f64"],
        after: |d, _| assert!(!d.join("run").exists()),
    },
    Case {
        name: "a line of metrics.jsonl that is not JSON is skipped with a note naming it",
        setup: |d| {
            acts(&d.join("acts.npy"), 2048, 0);
            trained(d, "run", &[]);
            let m = d.join("run/metrics.jsonl");
            let mut text = std::fs::read_to_string(&m).unwrap();
            text.insert_str(text.find('\n').unwrap() + 1, "{\"step\": 3, \"lo\n");
            std::fs::write(&m, text).unwrap();
            ["eval", &s(&d.join("run")), "--out", &s(&d.join("ev"))].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &["note:", "metrics.jsonl: skipped line 2: they are not JSON"],
        after: |d, _| assert!(d.join("ev/eval.json").is_file()),
    },
    Case {
        name: "--tensor with .npy data is refused",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            let mut a = train_on(&d.join("acts.npy"), &d.join("run"), &[]);
            a.extend(["--tensor".into(), "acts".into()]);
            a
        },
        file_size_limit: None,
        succeeds: false,
        says: &["--tensor acts", "acts.npy", ".safetensors"],
        after: |d, _| assert!(!d.join("run").join("trainer_state.safetensors").exists()),
    },
    Case {
        name: "a manifest entry outside the dataset directory is said to escape it",
        setup: |d| {
            acts(&d.join("good.npy"), 1024, 0);
            std::fs::create_dir(d.join("ds")).unwrap();
            let m = r#"{"d_in": 16, "dtype": "float32", "shards": [{"file": "../good.npy", "rows": 1024}]}"#;
            std::fs::write(d.join("ds/manifest.json"), m).unwrap();
            train_on(&d.join("ds"), &d.join("run"), &[])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["../good.npy", "escapes the dataset directory", "manifest.json"],
        after: nothing,
    },
    Case {
        name: "a manifest entry in a sub-directory is found by its path",
        setup: |d| {
            std::fs::create_dir_all(d.join("ds/part")).unwrap();
            acts(&d.join("ds/part/a.npy"), 1024, 0);
            let m = r#"{"d_in": 16, "dtype": "float32", "shards": [{"file": "part/a.npy", "rows": 1024}]}"#;
            std::fs::write(d.join("ds/manifest.json"), m).unwrap();
            ["data", "inspect", &s(&d.join("ds"))].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &[],
        after: nothing,
    },
    Case {
        name: "export from a run with corrupt weights says it rebuilds from the trainer state",
        setup: |d| {
            ok(&train(&d.join("run"), &[]));
            std::fs::write(d.join("run/sae_weights.safetensors"), b"\x08\0\0\0\0\0\0\0garbage!").unwrap();
            ["export", &s(&d.join("run")), "--format", "saelens", "--out", &s(&d.join("exp"))].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &["note:", "sae_weights.safetensors", "trainer_state.safetensors"],
        after: |d, _| {
            saetrain::export::load::load_sae(&d.join("exp")).unwrap();
        },
    },
    Case {
        name: "skipped NaN/Inf batches are reported at the end, even with --quiet",
        setup: |d| {
            acts(&d.join("nan.npy"), 2048, 150);
            train_on(&d.join("nan.npy"), &d.join("run"), &[])
        },
        file_size_limit: None,
        succeeds: true,
        says: &["warning:", "NaN/Inf"],
        after: |d, o| {
            let e = stderr(o);
            let n: u64 = e.split("skipped ").nth(1).and_then(|t| t.split(' ').next()).unwrap().parse().unwrap();
            let last = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
            let line: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
            assert!(n > 0 && line["data"]["skipped_nonfinite_batches"] == n, "{e} vs {line}");
        },
    },
    Case {
        name: "a manifest listing one shard twice is refused (its held-out rows would be trained on)",
        setup: |d| {
            std::fs::create_dir(d.join("ds")).unwrap();
            acts(&d.join("ds/a.npy"), 1024, 0);
            let m = r#"{"d_in": 16, "dtype": "float32", "shards": [{"file": "a.npy", "rows": 1024}, {"file": "./a.npy", "rows": 1024}]}"#;
            std::fs::write(d.join("ds/manifest.json"), m).unwrap();
            train_on(&d.join("ds"), &d.join("run"), &[])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["the same file as", "a.npy", "listed twice in", "manifest.json"],
        after: |d, _| assert!(!d.join("run/trainer_state.safetensors").exists()),
    },
    Case {
        name: "data that is mostly rows of zeros keeps its other rows (the norm cut takes their median)",
        setup: |d| {
            let (rows, dd) = (1024, 16);
            let x: Vec<f32> = (0..rows * dd)
                .map(|i| if (i / dd) % 5 < 3 { 0.0 } else { ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5 })
                .collect();
            write_npy(&d.join("zeros.npy"), Dtype::Float32, rows, dd, &x).unwrap();
            train_on(&d.join("zeros.npy"), &d.join("run"), &[])
        },
        file_size_limit: None,
        succeeds: true,
        says: &["warning:", "are all zeros", "median norm of the others"],
        after: |d, _| {
            let s = json(&d.join("run/summary.json"));
            assert_eq!(s["data_stats"]["excluded_large_norm_rows"], 0, "{s}");
            let ev = s["eval"]["explained_variance"].as_f64().unwrap();
            assert!(ev < 0.999, "an SAE of the nonzero rows, not of zeros: EV {ev}");
        },
    },
    Case {
        name: "data whose rows are all zeros is refused: there is nothing to train on",
        setup: |d| {
            write_npy(&d.join("zeros.npy"), Dtype::Float32, 1024, 16, &vec![0.0; 1024 * 16]).unwrap();
            train_on(&d.join("zeros.npy"), &d.join("run"), &[])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["zeros.npy", "rows sampled at open is all zeros"],
        after: |d, _| assert!(!d.join("run/trainer_state.safetensors").exists()),
    },
    Case {
        name: "--eval-tokens 0 reports no held-out metrics instead of a perfect EV",
        setup: |d| {
            let mut a: Vec<String> = ["train", "--out", &s(&d.join("run"))].map(String::from).into();
            a.extend(common::cli::TINY.iter().map(|x| x.to_string()));
            let at = a.iter().position(|x| x == "--eval-tokens").unwrap();
            a[at + 1] = "0".into();
            a
        },
        file_size_limit: None,
        succeeds: true,
        says: &[],
        after: |d, o| {
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(out.contains("held-out: none (--eval-tokens 0)") && !out.contains("EV "), "{out}");
            let s = json(&d.join("run/summary.json"));
            assert!(s["eval"]["explained_variance"].is_null(), "{}", s["eval"]);
            // The synthetic held-out set is drawn apart from training: its evaluation works (it
            // said "invalid --tokens 0"), at eval's default size.
            let o = sae(&["eval", &s_(&d.join("run")), "--no-plots", "--out", &s_(&d.join("ev"))]);
            assert!(o.status.success(), "{}", stderr(&o));
            assert_eq!(json(&d.join("ev/eval.json"))["runs"][0]["exported"]["tokens"], 8192);
            // On shards it trained on every row: refused with the reason, pointing at --data.
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "shards", &["--eval-tokens", "0"]);
            let o = sae(&["eval", &s_(&d.join("shards")), "--no-plots", "--out", &s_(&d.join("ev2"))]);
            let e = stderr(&o);
            assert!(!o.status.success() && e.contains("held out no rows") && e.contains("--data"), "{e}");
        },
    },
    Case {
        name: "eval --data on a separate evaluation set may use more than half of it",
        setup: |d| {
            ok(&train(&d.join("run"), &[]));
            acts(&d.join("evalset.npy"), 2048, 0);
            let (run, data, ev) = (s(&d.join("run")), s(&d.join("evalset.npy")), s(&d.join("ev")));
            ["eval", &run, "--data", &data, "--tokens", "1800", "--no-plots", "--out", &ev].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &[],
        after: |d, _| {
            let tokens = json(&d.join("ev/eval.json"))["runs"][0]["exported"]["tokens"].as_u64().unwrap();
            assert_eq!(tokens, 1800);
        },
    },
    Case {
        name: "eval --out a directory of the user's is refused without --overwrite; with it only the evaluation's files change",
        setup: |d| {
            ok(&train(&d.join("run"), &[]));
            std::fs::create_dir(d.join("docs")).unwrap();
            std::fs::write(d.join("docs/report.md"), "precious").unwrap();
            std::fs::write(d.join("docs/notes.txt"), "mine").unwrap();
            let (run, docs) = (s(&d.join("run")), s(&d.join("docs")));
            let o = sae(&["eval", &run, "--out", &docs, "--no-plots"]);
            assert!(!o.status.success(), "refused without --overwrite");
            assert_eq!(std::fs::read_to_string(d.join("docs/report.md")).unwrap(), "precious");
            assert!(!d.join("docs/eval.json").exists());
            ["eval", &run, "--out", &docs, "--no-plots", "--overwrite"].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &[],
        after: |d, _| {
            assert_ne!(std::fs::read_to_string(d.join("docs/report.md")).unwrap(), "precious");
            assert_eq!(std::fs::read_to_string(d.join("docs/notes.txt")).unwrap(), "mine");
            assert_eq!(json(&d.join("docs/eval.json"))["files"], serde_json::json!(["eval.json", "report.md"]));
        },
    },
    Case {
        name: "eval --out another run's directory, or its eval/, is refused even with --overwrite",
        setup: |d| {
            ok(&train(&d.join("a"), &[]));
            ok(&train(&d.join("b"), &["--seed", "3"]));
            let (a, b) = (s(&d.join("a")), s(&d.join("b")));
            let o = sae(&["eval", &a, "--out", &b, "--no-plots", "--overwrite"]);
            assert!(!o.status.success() && stderr(&o).contains("holds a training run"), "{}", stderr(&o));
            ["eval", &a, "--out", &s(&d.join("b/eval")), "--no-plots", "--overwrite"].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["is where the evaluation of the run", "--zipf-from"],
        after: |d, _| {
            assert!(!d.join("b/eval").exists() && !d.join("b/eval.json").exists());
            ok(&sae(&["eval", &s(&d.join("b")), "--out", &s(&d.join("b/eval")), "--no-plots"]));
        },
    },
    Case {
        name: "eval of several inputs, one broken: each failure is named, the others are evaluated, no report is written",
        setup: |d| {
            ok(&train(&d.join("a"), &[]));
            ok(&train(&d.join("b"), &["--seed", "3"]));
            std::fs::create_dir(d.join("c")).unwrap();
            std::fs::write(d.join("c/cfg.json"), "{}").unwrap();
            std::fs::write(d.join("c/sae_weights.safetensors"), b"not a safetensors file").unwrap();
            let (a, b, c, ev) = (s(&d.join("a")), s(&d.join("b")), s(&d.join("c")), s(&d.join("ev")));
            ["eval", &a, &c, &b, "--no-plots", "--out", &ev].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["1 of the 3 inputs could not be evaluated", "no report was written", "/c/sae_weights.safetensors"],
        after: |d, _| assert!(!d.join("ev/eval.json").exists()),
    },
    Case {
        name: "eval of an SAE whose outputs overflow f32 warns that its numbers mean nothing",
        setup: |d| {
            let sae = common::constant_topk_sae(16, 32, 3e38);
            sae.save_saelens(&d.join("huge"), serde_json::json!({}), None).unwrap();
            acts(&d.join("acts.npy"), 512, 0);
            let (h, a, ev) = (s(&d.join("huge")), s(&d.join("acts.npy")), s(&d.join("ev")));
            ["eval", &h, "--data", &a, "--no-plots", "--out", &ev].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &["warning:", "/huge", "overflow", "say nothing about the SAE's quality"],
        after: nothing,
    },
    Case {
        name: "a second evaluation into the same directory removes the first's files it does not write",
        setup: |d| {
            ok(&train(&d.join("run"), &[]));
            let run = s(&d.join("run"));
            ok(&sae(&["eval", &run]));
            assert!(d.join("run/eval/feature_density.png").exists());
            // A killed writer's temporary of a picture.
            std::fs::write(d.join("run/eval/.alignment.png.999999999.tmp"), b"half").unwrap();
            ["eval", &run, "--no-plots"].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &["removed", ".alignment.png.999999999.tmp"],
        after: |d, _| {
            let mut names: Vec<String> = std::fs::read_dir(d.join("run/eval"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(names, ["eval.json", "report.md"]);
        },
    },
    Case {
        name: "a failed PNG write names the file and leaves the previous picture whole",
        setup: |d| {
            ok(&train(&d.join("run"), &[]));
            let (run, ev) = (s(&d.join("run")), s(&d.join("ev")));
            ok(&sae(&["eval", &run, "--out", &ev]));
            ["eval", &run, "--out", &ev].map(String::from).into()
        },
        // eval.json (12 KB) fits; training_curves.png (about 290 KB) does not.
        file_size_limit: Some(20 * 1024),
        succeeds: false,
        says: &["/ev/.eval-staging/training_curves.png", "File too large"],
        after: |d, _| {
            no_temporaries(&d.join("ev"));
            for e in std::fs::read_dir(d.join("ev")).unwrap().flatten() {
                let (p, bytes) = (e.path(), std::fs::read(e.path()).unwrap());
                if p.extension().is_some_and(|x| x == "png") {
                    assert!(bytes.ends_with(b"IEND\xaeB`\x82"), "{} is truncated", p.display());
                }
            }
        },
    },
    Case {
        name: "a failed export write names the file and leaves no temporary",
        setup: |d| {
            ok(&train(&d.join("run"), &[]));
            ["export", &s(&d.join("run")), "--format", "saelens", "--out", &s(&d.join("exp"))].map(String::from).into()
        },
        // The 9 KB weights do not fit.
        file_size_limit: Some(4096),
        succeeds: false,
        says: &["/exp/sae_weights.safetensors", "File too large"],
        after: |d, _| no_temporaries(&d.join("exp")),
    },
    Case {
        name: "data synth into a non-empty directory is refused and touches nothing",
        setup: |d| {
            std::fs::create_dir(d.join("ds")).unwrap();
            acts(&d.join("ds").join("acts_00000.npy"), 64, 0);
            std::fs::copy(d.join("ds").join("acts_00000.npy"), d.join("orig.npy")).unwrap();
            synth(&d.join("ds"), &[])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["is not empty (acts_00000.npy)", "--overwrite"],
        after: |d, _| {
            let ds = d.join("ds");
            assert_eq!(std::fs::read(ds.join("acts_00000.npy")).unwrap(), std::fs::read(d.join("orig.npy")).unwrap());
            assert!(!ds.join("manifest.json").exists() && !ds.join("ground_truth.npy").exists());
        },
    },
    Case {
        name: "data synth --overwrite refuses a harvested dataset (same shard names) and touches nothing",
        setup: |d| {
            let ds = d.join("ds");
            std::fs::create_dir(&ds).unwrap();
            acts(&ds.join("acts_00000.npy"), 64, 0);
            std::fs::copy(ds.join("acts_00000.npy"), d.join("orig.npy")).unwrap();
            let m = r#"{"format": "saetrain-activations", "version": 1, "model": "SmolLM2-135M", "d_in": 16,
                "dtype": "float32", "shards": [{"file": "acts_00000.npy", "rows": 64}]}"#;
            std::fs::write(ds.join("manifest.json"), m).unwrap();
            synth(&ds, &["--overwrite"])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["no synthetic dataset of ours", "model \"synthetic\""],
        after: |d, _| {
            let ds = d.join("ds");
            assert_eq!(std::fs::read(ds.join("acts_00000.npy")).unwrap(), std::fs::read(d.join("orig.npy")).unwrap());
            assert!(std::fs::read_to_string(ds.join("manifest.json")).unwrap().contains("SmolLM2"));
        },
    },
    Case {
        name: "data synth --overwrite replaces its own dataset, stale shards included, and not a file of the user's",
        setup: |d| {
            let ds = d.join("ds");
            ok(&sae(&synth(&ds, &["--tokens", "3000"]).iter().map(String::as_str).collect::<Vec<_>>()));
            synth(&ds, &["--overwrite"])
        },
        file_size_limit: None,
        succeeds: true,
        says: &[],
        after: |d, _| {
            let ds = d.join("ds");
            let mut names: Vec<String> =
                std::fs::read_dir(&ds).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            names.sort();
            assert_eq!(names, [".sae.lock", "acts_00000.npy", "ground_truth.npy", "manifest.json"]);
            assert!(json(&ds.join("manifest.json"))["total_rows"] == 500);
            // A file of the user's beside it is refused by name, and stays.
            std::fs::write(ds.join("notes.txt"), "mine").unwrap();
            let o = sae(&synth(&ds, &["--overwrite"]).iter().map(String::as_str).collect::<Vec<_>>());
            assert!(!o.status.success() && stderr(&o).contains("notes.txt is not part"), "{}", stderr(&o));
            assert!(ds.join("manifest.json").is_file() && ds.join("notes.txt").is_file());
        },
    },
    Case {
        name: "a failed shard write of data synth names the file and leaves no partial shard, no temporary",
        setup: |d| synth(&d.join("ds"), &[]),
        // A shard of 500 x 16 floats is 32 KB.
        file_size_limit: Some(16_384),
        succeeds: false,
        says: &["acts_00000.npy", "File too large"],
        after: |d, _| {
            no_temporaries(&d.join("ds"));
            assert!(!d.join("ds").join("acts_00000.npy").exists() && !d.join("ds").join("manifest.json").exists());
        },
    },
    Case {
        name: "a data synth that fails at its last file removes the shards it wrote, so a retry is not refused",
        // Five shards of 100 x 16 floats (6.4 KB) fit; the ground truth, 2048 x 16 (128 KB), does not.
        setup: |d| synth(&d.join("ds"), &["--shard-tokens", "100", "--features", "2048"]),
        file_size_limit: Some(16_384),
        succeeds: false,
        says: &["ground_truth.npy", "File too large"],
        after: |d, _| {
            let left: Vec<String> = std::fs::read_dir(d.join("ds"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n != ".sae.lock")
                .collect();
            assert!(left.is_empty(), "left behind: {left:?}");
            ok(&sae(&synth(&d.join("ds"), &[]).iter().map(String::as_str).collect::<Vec<_>>()));
        },
    },
    Case {
        name: "eval of a run that diverged says so instead of 'not an SAE checkpoint'",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            let o = sae(&train_on(&d.join("acts.npy"), &d.join("run"), &["--lr", "1e37"])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>());
            assert!(!o.status.success() && stderr(&o).contains("loss became"), "{}", stderr(&o));
            ["eval", &s(&d.join("run"))].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["a run that diverged (loss became", "diverged.json", "wrote no SAE"],
        after: nothing,
    },
    Case {
        name: "eval of a directory that holds no SAE names it once",
        setup: |d| {
            std::fs::create_dir(d.join("empty")).unwrap();
            ["eval", &s(&d.join("empty"))].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["not an SAE checkpoint", "sae_weights.safetensors"],
        after: |d, o| {
            let e = stderr(o);
            assert_eq!(e.matches(&s(&d.join("empty"))).count(), 1, "{e}");
        },
    },
    Case {
        name: "a negative number after a flag is its value, checked by the option (not clap's 'unexpected argument')",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            train_on(&d.join("acts.npy"), &d.join("run"), &["--lr", "-1"])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["invalid --lr -1: must be positive"],
        after: |d, _| assert!(!d.join("run").join("config.json").exists()),
    },
    Case {
        name: "--overwrite --init-from its own --out is refused before anything is deleted",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            let mut a = train_on(&d.join("acts.npy"), &d.join("run"), &["--overwrite"]);
            a.extend(["--init-from".into(), s(&d.join("run"))]);
            a
        },
        file_size_limit: None,
        succeeds: false,
        says: &["is this run's own --out"],
        after: |d, _| assert!(d.join("run/trainer_state.safetensors").is_file() && d.join("run/summary.json").is_file()),
    },
    Case {
        name: "a data path or --out that is a loop of symbolic links is said to be one",
        setup: |d| {
            std::os::unix::fs::symlink(d.join("b"), d.join("a")).unwrap();
            std::os::unix::fs::symlink(d.join("a"), d.join("b")).unwrap();
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            let o = sae(&["eval", &s(&d.join("run")), "--out", &s(&d.join("a")), "--no-plots"]);
            assert!(!o.status.success() && stderr(&o).contains("--out") && stderr(&o).contains("in a loop"), "{}", stderr(&o));
            train_on(&d.join("a"), &d.join("r2"), &[])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["data path", "is a symbolic link in a loop (", "/a -> ", "/b -> "],
        after: |d, _| assert!(!d.join("r2").exists()),
    },
    Case {
        name: "a learning rate that overflows Adam's moments while the loss stays finite is a divergence, not a damaged run",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            train_on(&d.join("acts.npy"), &d.join("run"), &["--lr", "1e6"])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["the trainer state stopped being finite by step 40", "tensor 'adam_v' holds inf", "lower --lr"],
        after: |d, _| {
            let why = json(&d.join("run/diverged.json"));
            assert!(why["state"].as_str().unwrap().contains("adam_v") && why["step"] == 40, "{why}");
            // No checkpoint that eval, export and --resume would refuse as damaged.
            assert!(!d.join("run/trainer_state.safetensors").exists() && !d.join("run/summary.json").exists());
        },
    },
    Case {
        name: "--init-from a run that has not finished says so",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "src", &[]);
            // As a run stopped at step 40 of 400.
            edit_config(&d.join("src"), "steps", 400.into());
            let mut a = train_on(&d.join("acts.npy"), &d.join("run"), &[]);
            a.extend(["--init-from".into(), s(&d.join("src"))]);
            a
        },
        file_size_limit: None,
        succeeds: true,
        says: &["note: --init-from", "has trained 40 of its 400 steps", "starting from that checkpoint"],
        after: |d, _| assert!(d.join("run/summary.json").is_file()),
    },
    Case {
        name: "eval of an export on the data it was trained on says the rows are training rows",
        setup: |d| {
            acts(&d.join("acts.npy"), 2048, 0);
            trained(d, "run", &[]);
            let o = sae(&["export", &s(&d.join("run")), "--format", "saelens", "--out", &s(&d.join("ex"))]);
            assert!(o.status.success(), "{}", stderr(&o));
            ["eval", &s(&d.join("ex")), "--data", &s(&d.join("acts.npy")), "--out", &s(&d.join("ev")), "--no-plots"]
                .map(String::from)
                .into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &["holds the data the SAE in", "they are not held-out ones"],
        after: |d, _| {
            let data = json(&d.join("ev/eval.json"))["runs"][0]["data"].as_str().unwrap().to_string();
            assert!(data.contains("the SAE was trained on this data: these rows are not held out"), "{data}");
        },
    },
    Case {
        name: "--overwrite with an --init-from that cannot be used leaves the run it would replace",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "old", &[]);
            trained(d, "wide", &["--d-sae", "128"]);
            let mut a = train_on(&d.join("acts.npy"), &d.join("old"), &["--overwrite"]);
            a.extend(["--init-from".into(), s(&d.join("wide"))]);
            a
        },
        file_size_limit: None,
        succeeds: false,
        says: &["--init-from", "d_sae 128"],
        after: |d, _| assert!(d.join("old/trainer_state.safetensors").is_file() && d.join("old/summary.json").is_file()),
    },
    Case {
        name: "bench --json into a run directory is refused (it replaced the run's config.json)",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            let a = ["bench", "step", "--d-in", "16", "--d-sae", "32", "--batch", "64", "--k", "4", "--steps", "1"];
            let mut a: Vec<String> = a.map(String::from).into();
            a.extend(["--sparsifier".into(), "topk".into(), "--json".into(), s(&d.join("run/config.json"))]);
            a
        },
        file_size_limit: None,
        succeeds: false,
        says: &["holds a run, whose files are its own"],
        after: |d, _| {
            saetrain::config::TrainConfig::load(&d.join("run/config.json")).unwrap();
        },
    },
    Case {
        name: "bench --json onto an existing file needs --overwrite",
        setup: |d| {
            std::fs::write(d.join("notes.txt"), "mine").unwrap();
            let a = ["bench", "sparsifiers", "--batch", "64", "--d-sae", "32", "--k", "4", "--reps", "1", "--json"];
            let mut a: Vec<String> = a.map(String::from).into();
            a.push(s(&d.join("notes.txt")));
            a
        },
        file_size_limit: None,
        succeeds: false,
        says: &["the file exists; add --overwrite"],
        after: |d, _| assert_eq!(std::fs::read_to_string(d.join("notes.txt")).unwrap(), "mine"),
    },
    Case {
        name: "export of a run whose config.json was edited after its checkpoint is refused",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            edit_config(&d.join("run"), "k", serde_json::json!(16));
            ["export", &s(&d.join("run")), "--format", "saelens", "--out", &s(&d.join("x"))].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["sae export", "config.json says k 16 (the checkpoint was trained with 4)"],
        after: |d, _| assert!(!d.join("x").exists(), "the refused export left its --out"),
    },
    Case {
        name: "eval of a run whose config.json now holds out other rows is refused",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            edit_config(&d.join("run"), "eval_tokens", serde_json::json!(512));
            ["eval", &s(&d.join("run")), "--no-plots"].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["sae eval", "eval_tokens 512 (the checkpoint was trained with 256)"],
        after: |d, _| assert!(!d.join("run/eval").exists(), "a refused eval left a directory"),
    },
    Case {
        name: "eval of a run whose data gained a shard is refused (the split moved onto training rows)",
        setup: |d| {
            std::fs::create_dir(d.join("ds")).unwrap();
            acts(&d.join("ds/a.npy"), 1024, 0);
            let o = sae(&train_on(&d.join("ds"), &d.join("run"), &[]).iter().map(String::as_str).collect::<Vec<_>>());
            assert!(o.status.success(), "{}", stderr(&o));
            acts(&d.join("ds/b.npy"), 512, 0);
            ["eval", &s(&d.join("run")), "--no-plots"].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["is not what the run trained on", "training rows", "--data"],
        after: nothing,
    },
    Case {
        name: "an evaluation killed while writing leaves pictures that the next one removes",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            // What a killed `sae eval --out ev` leaves: its record of what was there before (nothing)
            // and a picture no eval.json lists.
            std::fs::create_dir(d.join("ev")).unwrap();
            std::fs::write(d.join("ev/.eval-pending.json"), r#"{"present": []}"#).unwrap();
            std::fs::write(d.join("ev/other_alignment.png"), "half a picture").unwrap();
            ["eval", &s(&d.join("run")), "--no-plots", "--out", &s(&d.join("ev"))].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &[],
        after: |d, _| {
            let mut left: Vec<String> = std::fs::read_dir(d.join("ev"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            assert_eq!(left, ["eval.json", "report.md"]);
        },
    },
    Case {
        name: "a lock file planted as a link is refused, and the file it points at is left alone",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            std::fs::write(d.join("important.txt"), "keep").unwrap();
            std::fs::remove_file(d.join("run/.sae.lock")).unwrap();
            std::os::unix::fs::symlink(d.join("important.txt"), d.join("run/.sae.lock")).unwrap();
            ["train", "--resume", &s(&d.join("run")), "--steps", "50", "--quiet"].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["is a symbolic link"],
        after: |d, _| assert_eq!(std::fs::read_to_string(d.join("important.txt")).unwrap(), "keep"),
    },
    Case {
        name: "data synth refuses a NaN --zipf",
        setup: |d| synth(&d.join("ds"), &["--zipf", "nan"]),
        file_size_limit: None,
        succeeds: false,
        says: &["invalid --zipf NaN"],
        after: |d, _| assert!(!d.join("ds").join("manifest.json").exists()),
    },
    Case {
        name: "data synth refuses more active features than features",
        setup: |d| synth(&d.join("ds"), &["--active", "100", "--features", "10"]),
        file_size_limit: None,
        succeeds: false,
        says: &["invalid --active 100", "at most --features (10)"],
        after: nothing,
    },
    Case {
        name: "an --overwrite export in another layout removes the old layout's files, so eval reads the new SAE",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            trained(d, "run2", &["--d-sae", "32"]);
            let o = sae(&["export", &s(&d.join("run")), "--format", "saelens", "--out", &s(&d.join("x"))]);
            assert!(o.status.success(), "{}", stderr(&o));
            ["export", &s(&d.join("run2")), "--format", "dictionary-learning", "--out", &s(&d.join("x")), "--overwrite"]
                .map(String::from)
                .into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &["removed", "sae_weights.safetensors (another layout's export"],
        after: |d, _| {
            let x = d.join("x");
            assert!(!x.join("cfg.json").exists() && !x.join("sae_weights.safetensors").exists());
            assert_eq!(saetrain::export::load::load_sae(&x).unwrap().d_sae, 32);
        },
    },
    Case {
        name: "export into a run's checkpoints folder is refused",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            let out = d.join("run/checkpoints/mine");
            ["export", &s(&d.join("run")), "--format", "saelens", "--out", &s(&out), "--overwrite"].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["is inside the checkpoints/ folder of the training run"],
        after: |d, _| assert!(!d.join("run/checkpoints/mine").exists()),
    },
    Case {
        name: "an evaluation whose writing fails half way leaves the earlier evaluation whole",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            let o = sae(&["eval", &s(&d.join("run")), "--out", &s(&d.join("ev"))]);
            assert!(o.status.success(), "{}", stderr(&o));
            std::fs::copy(d.join("ev/eval.json"), d.join("before.json")).unwrap();
            trained(d, "run2", &["--d-sae", "32"]);
            // The pictures are larger than the limit: the first one fails after report.md is written.
            ["eval", &s(&d.join("run2")), "--out", &s(&d.join("ev")), "--overwrite"].map(String::from).into()
        },
        file_size_limit: Some(16_384),
        succeeds: false,
        says: &[],
        after: |d, _| {
            let ev = d.join("ev");
            assert_eq!(std::fs::read(ev.join("eval.json")).unwrap(), std::fs::read(d.join("before.json")).unwrap());
            assert!(!ev.join(".eval-staging").exists(), "the staging folder was left");
            no_temporaries(&ev);
            let o = sae(&["eval", &s(&d.join("run2")), "--out", &s(&ev), "--overwrite", "--no-plots"]);
            assert!(o.status.success(), "{}", stderr(&o));
        },
    },
    Case {
        name: "a damaged kept checkpoint is named by eval --history, not skipped silently",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &["--steps", "60", "--keep-checkpoints", "5", "--checkpoint-every", "20"]);
            let dirs: Vec<_> = std::fs::read_dir(d.join("run/checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();
            let victim = dirs.iter().min().unwrap();
            std::fs::remove_file(victim.join("sae_weights.safetensors")).unwrap();
            ["eval", &s(&d.join("run")), "--history", "--no-plots"].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: true,
        says: &["is left out: it has no sae_weights.safetensors"],
        after: nothing,
    },
    Case {
        name: "a held-out set larger than the machine's memory is refused before anything is written",
        setup: |d| {
            ["train", "--out", &s(&d.join("run")), "--synth-d-in", "16", "--d-sae", "64", "--eval-tokens", "99999999999999"]
                .map(String::from)
                .into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["invalid --eval-tokens 99999999999999", "lower --eval-tokens"],
        after: |d, _| assert!(!d.join("run").exists()),
    },
    Case {
        name: "data synth refuses values f16 cannot hold",
        setup: |d| synth(&d.join("ds"), &["--dtype", "f16", "--noise", "1e6"]),
        file_size_limit: None,
        succeeds: false,
        says: &["--dtype f16 cannot hold these values", "--noise"],
        after: |d, _| assert!(!d.join("ds").join("manifest.json").exists() && !d.join("ds/acts_00000.npy").exists()),
    },
    Case {
        name: "a FIFO as --config is refused, not read forever",
        setup: |d| {
            let fifo = d.join("cfg.toml");
            assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
            ["train", "--config", &s(&fifo), "--out", &s(&d.join("run"))].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["not a regular file"],
        after: nothing,
    },
    Case {
        name: "bench memory with an enormous --gb ends, within the workspace's limit",
        setup: |_| ["bench", "memory", "--gb", "1e30"].map(String::from).into(),
        file_size_limit: None,
        succeeds: true,
        says: &[],
        after: |_, o| {
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(out.contains("at d_in=4096, batch=8192: 523264"), "{out}");
        },
    },
    Case {
        name: "--init-from an export says it is an export, not a run",
        setup: |d| {
            acts(&d.join("acts.npy"), 1024, 0);
            trained(d, "run", &[]);
            let o = sae(&["export", &s(&d.join("run")), "--format", "saelens", "--out", &s(&d.join("ex"))]);
            assert!(o.status.success(), "{}", stderr(&o));
            train_on(&d.join("acts.npy"), &d.join("run2"), &["--init-from", &s(&d.join("ex"))])
        },
        file_size_limit: None,
        succeeds: false,
        says: &["an exported SAE, not a training run"],
        after: |d, _| assert!(!d.join("run2").exists()),
    },
    Case {
        name: "a resume whose data was moved says where the data must be",
        setup: |d| {
            std::fs::create_dir(d.join("ds")).unwrap();
            acts(&d.join("ds/acts.npy"), 1024, 0);
            let o = sae(&train_on(&d.join("ds/acts.npy"), &d.join("run"), &[]).iter().map(String::as_str).collect::<Vec<_>>());
            assert!(o.status.success(), "{}", stderr(&o));
            std::fs::rename(d.join("ds"), d.join("moved")).unwrap();
            ["train", "--resume", &s(&d.join("run")), "--steps", "80", "--quiet"].map(String::from).into()
        },
        file_size_limit: None,
        succeeds: false,
        says: &["the run reads its data from", "ds/acts.npy", "put it back there"],
        after: nothing,
    },
    Case {
        name: "bench refuses a step of nothing",
        setup: |_| ["bench", "step", "--d-sae", "0", "--steps", "1"].map(String::from).into(),
        file_size_limit: None,
        succeeds: false,
        says: &["invalid --d-sae 0"],
        after: nothing,
    },
];

/// Train `d/name` on `d/acts.npy` (train_on's flags and `extra`); panics unless it succeeds.
fn trained(d: &Path, name: &str, extra: &[&str]) {
    let mut a = train_on(&d.join("acts.npy"), &d.join(name), &[]);
    // `extra` replaces a flag's value where train_on gives it.
    for pair in extra.chunks(2) {
        match a.iter().position(|x| x == pair[0]) {
            Some(i) => a[i + 1] = pair[1].to_string(),
            None => a.extend(pair.iter().map(|x| x.to_string())),
        }
    }
    let o = sae(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Set `key` in `run/config.json` by hand (as a user editing it).
fn edit_config(run: &Path, key: &str, v: serde_json::Value) {
    let p = run.join("config.json");
    let mut c = json(&p);
    c[key] = v;
    std::fs::write(&p, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

/// `sae data synth` into `out`: 500 rows of d_in 16 in shards of 1000 (one shard) unless `extra`
/// says otherwise.
fn synth(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["data", "synth", "--out", &s(out), "--d-in", "16"].map(String::from).into();
    if !extra.contains(&"--shard-tokens") {
        a.extend(["--shard-tokens".to_string(), "1000".to_string()]);
    }
    if !extra.contains(&"--tokens") {
        a.extend(["--tokens".to_string(), "500".to_string()]);
    }
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

#[test]
fn hostile_cases() {
    let mut failed = vec![];
    for case in CASES {
        let dir = tempfile::tempdir().unwrap();
        let args = (case.setup)(dir.path());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = match case.file_size_limit {
            Some(limit) => sae_with_file_size_limit(limit, &args),
            None => sae(&args),
        };
        let e = stderr(&o);
        let mut why = vec![];
        if o.status.success() != case.succeeds {
            why.push(format!("exit {:?}, expected success = {}", o.status.code(), case.succeeds));
        }
        why.extend(case.says.iter().filter(|w| !e.contains(*w)).map(|w| format!("stderr lacks {w:?}")));
        if why.is_empty() {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (case.after)(dir.path(), &o)));
            if let Err(p) = r {
                let msg = p.downcast_ref::<String>().cloned().or(p.downcast_ref::<&str>().map(|s| s.to_string()));
                why.push(format!("after: {}", msg.unwrap_or_default()));
            }
        }
        if !why.is_empty() {
            failed.push(format!("{}: {}\n  sae {}\n  stderr: {}", case.name, why.join("; "), args.join(" "), e.trim()));
        }
    }
    assert!(failed.is_empty(), "{} of {} hostile cases failed:\n{}", failed.len(), CASES.len(), failed.join("\n"));
}

/// A shard truncated on disk while a run reads it (a user re-running `numpy.save` onto it): the run
/// stops with an error naming the file instead of dying of SIGBUS ("Bus error"), checkpoints the
/// steps it trained, and resumes once the file is whole again.
#[test]
fn a_shard_truncated_under_a_running_train_stops_it_with_a_checkpoint_and_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("acts.npy"), dir.path().join("run"));
    acts(&data, 65536, 0); // 4 MB: its pages are read throughout an epoch
    let whole = std::fs::read(&data).unwrap();
    let mut args = train_on(&data, &out, &["--log-every", "1", "--checkpoint-every", "5"]);
    let steps = args.iter().position(|a| a == "--steps").unwrap();
    args[steps + 1] = "10000000".into();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !out.join("trainer_state.safetensors").exists() {
        assert!(t.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::OpenOptions::new().write(true).open(&data).unwrap().set_len(4096).unwrap();
    // Its own 120 s from the truncation (a loaded machine may take long to the first checkpoint).
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && t.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    let e = stderr(&o);
    assert!(!killed, "still running 120 s after the truncation: {e}");
    assert_eq!(o.status.code(), Some(1), "a clean error exit, not a signal ({:?}): {e}", o.status);
    assert!(e.contains(&s(&data)) && e.contains("truncated") && e.contains("it now has 4096 bytes"), "{e}");
    let n: u64 = e.split("interrupted after step ").nth(1).and_then(|r| r.split(';').next()).unwrap().parse().unwrap();
    assert!(n >= 5 && e.contains(&format!("--resume {}", s(&out))), "{e}");
    no_temporaries(&out);
    // The file made whole again, the run resumes from the step it stopped at.
    std::fs::write(&data, &whole).unwrap();
    let more = (n + 10).to_string();
    ok(&sae(&["train", "--resume", &s(&out), "--steps", &more, "--quiet"]));
    let log = std::fs::read_to_string(out.join("resumes.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(line["at_step"], n, "{log}");
    assert_eq!(json(&out.join("summary.json"))["steps"], n + 10);
}

/// Ctrl-C (and SIGTERM, SIGHUP) during `sae data synth`: the shards written are removed, the
/// directory is as it was found, the exit status is the shell's for the signal, and the same
/// command then runs to the end.
#[test]
fn a_signal_during_data_synth_removes_the_shards_it_wrote_so_the_same_command_starts_over() {
    use common::cli::sae_signalled_when;
    for (sig, status, by) in
        [(libc::SIGINT, 130, "stopped by SIGINT"), (libc::SIGTERM, 143, "stopped by SIGTERM"), (libc::SIGHUP, 129, "")]
    {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds");
        // 20,000 shards of 1000 rows: far longer than the signal takes to come.
        let args = synth(&ds, &["--tokens", "20000000"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = sae_signalled_when(&args, &ds.join("acts_00000.npy"), &[sig], false);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(status), "{e}");
        assert!(e.contains(by) && e.contains("removed again") && e.contains("of 20000 shards"), "{e}");
        let left: Vec<_> = std::fs::read_dir(&ds).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.iter().all(|n| n == ".sae.lock"), "left behind: {left:?}");
        // The same command (no --overwrite) finds nothing to refuse.
        let again = synth(&ds, &[]);
        ok(&sae(&again.iter().map(String::as_str).collect::<Vec<_>>()));
        assert!(ds.join("manifest.json").is_file());
    }
}
