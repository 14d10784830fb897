//! The `sae` binary end to end: option validation, config files, run-directory layout.

use safetensors::SafeTensors;
use std::path::Path;
use std::process::Command;

fn sae(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sae")).args(args).output().expect("run sae")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small, fast training run's flags.
const TINY: &[&str] = &[
    "--synth-d-in",
    "24",
    "--synth-features",
    "40",
    "--d-sae",
    "48",
    "--batch-size",
    "64",
    "--steps",
    "30",
    "--eval-tokens",
    "128",
    "--log-every",
    "10",
    "--quiet",
    "--threads",
    "1",
];

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec!["train", "--out", out.to_str().unwrap()];
    a.extend_from_slice(TINY);
    a.extend_from_slice(extra);
    sae(&a)
}

#[test]
fn invalid_settings_fail_before_training_and_name_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--sparsifier", "topk", "--k", "0"], "--k"),
        (&["--sparsifier", "topk", "--k", "49"], "--k"),
        (&["--sparsifier", "wta", "--rate", "0"], "--rate"),
        (&["--sparsifier", "wta", "--rate", "1.5"], "--rate"),
        (&["--sparsifier", "wta", "--rate", "-0.1"], "--rate"),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--d-sae", "0"], "--d-sae"),
        (&["--sparsifier", "nonsense"], "--sparsifier"),
        (&["--sparsifier", "jumprelu"], "--sparsifier"),
        (&["--steps", "0"], "--steps"),
        (&["--lr", "0"], "--lr"),
        (&["--d-in", "25"], "--d-in"),
    ];
    for (i, (flags, option)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("run{i}"));
        let o = train(&out, flags);
        assert!(!o.status.success(), "{flags:?} should fail");
        let e = stderr(&o);
        assert!(e.contains(option), "{flags:?}: error should name {option}: {e}");
        assert!(!out.join("sae_weights.safetensors").exists(), "{flags:?} left a checkpoint");
    }
}

#[test]
fn default_run_layout_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = train(&out, &["--eval-every", "10"]);
    assert!(o.status.success(), "train failed: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for key in ["L0", "MSE", "EV", "alive", "dead", "MMCS", "recovered>0.9"] {
        assert!(stdout.contains(key), "summary lacks {key}: {stdout}");
    }
    // SAELens layout: W_enc [d_in, d_sae], W_dec [d_sae, d_in], threshold for wta (JumpReLU).
    let bytes = std::fs::read(out.join("sae_weights.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("W_enc").unwrap().shape(), &[24, 48]);
    assert_eq!(st.tensor("W_dec").unwrap().shape(), &[48, 24]);
    assert_eq!(st.tensor("b_enc").unwrap().shape(), &[48]);
    assert_eq!(st.tensor("b_dec").unwrap().shape(), &[24]);
    assert_eq!(st.tensor("threshold").unwrap().shape(), &[48]);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "jumprelu");
    assert_eq!(cfg["d_in"], 24);
    assert_eq!(cfg["d_sae"], 48);
    // metrics: one line per logging step.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![10, 20, 30]);
    // held-out evaluation every 10 steps (the final one goes to summary.json)
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in ["l0", "explained_variance", "frac_alive", "dead", "frac_density_above_1pct", "median_log10_density"] {
        assert!(first["eval"].get(key).is_some(), "eval line lacks {key}: {first}");
    }
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert!(summary["recovery"]["mmcs"].as_f64().unwrap() > 0.0);
    // the resolved config is saved, and no temporary file is left behind.
    let resolved: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(resolved["d_sae"], 48);
    assert_eq!(resolved["d_in"], 24);
    assert_eq!(resolved["sparsifier"], "wta");
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "temporary file left: {name}");
    }
}

#[test]
fn topk_exports_as_saelens_topk_without_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = train(&out, &["--sparsifier", "topk", "--k", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "topk");
    assert_eq!(cfg["k"], 4);
    let bytes = std::fs::read(out.join("sae_weights.safetensors")).unwrap();
    assert!(SafeTensors::deserialize(&bytes).unwrap().tensor("threshold").is_err());
}

#[test]
fn config_file_is_read_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let toml_path = dir.path().join("c.toml");
    std::fs::write(&toml_path, "sparsifier = \"batchtopk\"\nk = 3\nd_sae = 40\nlr = 0.002\n").unwrap();
    let out = dir.path().join("run");
    let mut a = vec!["train", "--config", toml_path.to_str().unwrap(), "--out", out.to_str().unwrap()];
    a.extend_from_slice(TINY);
    // TINY passes --d-sae 48 on the command line: it must win over the file's 40.
    let o = sae(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let resolved: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(resolved["sparsifier"], "batchtopk");
    assert_eq!(resolved["k"], 3);
    assert_eq!(resolved["d_sae"], 48);
    assert_eq!(resolved["lr"], 0.002);

    let json_path = dir.path().join("c.json");
    std::fs::write(&json_path, r#"{"sparsifier": "topk", "k": 0}"#).unwrap();
    let o = sae(&["train", "--config", json_path.to_str().unwrap(), "--out", dir.path().join("r2").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--k"), "{}", stderr(&o));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "sparsifer = \"topk\"\n").unwrap();
    let o = sae(&["train", "--config", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("bad.toml") && e.contains("sparsifer"), "error should name file and key: {e}");
}

#[test]
fn resume_of_missing_run_is_a_clear_error() {
    let o = sae(&["train", "--resume", "/nonexistent/run"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/run"), "{}", stderr(&o));
}

/// The CUDA backend through the whole trainer (data, steps, held-out eval, theta, export), its
/// kernels run by the host emulator: the same run as on the CPU, within rounding.
#[test]
fn cuda_backend_on_the_emulator_trains_like_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = |p: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(p.join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let weights = |p: &Path, name: &str| -> Vec<f32> {
        let bytes = std::fs::read(p.join("sae_weights.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        bytemuck::pod_collect_to_vec(st.tensor(name).unwrap().data())
    };
    for sparsifier in ["batchtopk", "wta"] {
        let (cpu, emu) = (dir.path().join(format!("cpu-{sparsifier}")), dir.path().join(format!("emu-{sparsifier}")));
        for (out, backend) in [(&cpu, "cpu"), (&emu, "cuda-emulator")] {
            let o = train(out, &["--backend", backend, "--sparsifier", sparsifier]);
            assert!(o.status.success(), "{backend}: {}", stderr(&o));
        }
        let (mc, me) = (metrics(&cpu), metrics(&emu));
        assert_eq!(mc.len(), me.len());
        for (c, e) in mc.iter().zip(&me) {
            for key in ["loss", "l0", "ev"] {
                let (a, b) = (c[key].as_f64().unwrap(), e[key].as_f64().unwrap());
                assert!(
                    (a - b).abs() <= 1e-3 * a.abs().max(1.0),
                    "{sparsifier} step {}: {key} {a} (cpu) vs {b}",
                    c["step"]
                );
            }
        }
        for name in ["W_dec", "W_enc", "b_enc", "b_dec", "threshold"] {
            let (a, b) = (weights(&cpu, name), weights(&emu, name));
            let worst = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst <= 1e-3, "{sparsifier} {name}: max difference {worst}");
        }
    }
}

/// `cfg.json` metadata of a run directory or export.
fn metadata(dir: &Path) -> serde_json::Value {
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cfg.json")).unwrap()).unwrap();
    c["metadata"].clone()
}

/// Where the SAE belongs (model, hook, layer, context, BOS) goes from the shards' manifest
/// (as `scripts/harvest.py` writes it) into the run's `cfg.json` and on into its exports; the
/// built-in synthetic data leaves those fields null.
#[test]
fn manifest_model_and_hook_reach_cfg_json_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("acts");
    let d = data.to_str().unwrap();
    let o = sae(&["data", "synth", "--out", d, "--tokens", "2048", "--d-in", "24", "--features", "40"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mp = data.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&mp).unwrap()).unwrap();
    m["model"] = "HuggingFaceTB/SmolLM2-135M".into();
    m["layer"] = 3.into();
    m["hook"] = "blocks.3.hook_resid_post".into();
    m["extra"] = serde_json::json!({"context_length": 64, "prepend_bos": true});
    std::fs::write(&mp, serde_json::to_string_pretty(&m).unwrap()).unwrap();

    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let mut args = vec!["train", "--out", r, "--data", d, "--d-sae", "48", "--batch-size", "64", "--steps", "5"];
    args.extend_from_slice(&["--eval-tokens", "256", "--backend", "cpu", "--quiet"]);
    let o = sae(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = |md: &serde_json::Value| {
        assert_eq!(md["model_name"], "HuggingFaceTB/SmolLM2-135M", "{md}");
        assert_eq!(md["hook_name"], "blocks.3.hook_resid_post", "{md}");
        assert_eq!(md["hook_layer"], 3, "{md}");
        assert_eq!(md["context_size"], 64, "{md}");
        assert_eq!(md["prepend_bos"], true, "{md}");
    };
    want(&metadata(&run));
    assert_eq!(metadata(&run)["dataset_path"], d);

    // From the run (rebuilt from its trainer state), then from that export (a conversion).
    let mut from = run.clone();
    for name in ["export", "converted"] {
        let out = dir.path().join(name);
        let o = sae(&["export", from.to_str().unwrap(), "--format", "saelens", "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        want(&metadata(&out));
        from = out;
    }

    // The layer follows from a blocks.L hook when the manifest has no `layer`.
    m["layer"] = serde_json::Value::Null;
    std::fs::write(&mp, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let run2 = dir.path().join("run2");
    args[2] = run2.to_str().unwrap();
    let o = sae(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    want(&metadata(&run2));

    // Built-in synthetic data: nothing to say where the SAE belongs.
    let syn = dir.path().join("syn");
    let o = sae(&["train", "--out", syn.to_str().unwrap(), "--steps", "3", "--synth-d-in", "24", "--d-sae", "48"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = metadata(&syn);
    for k in ["model_name", "hook_name", "hook_layer", "context_size"] {
        assert!(md[k].is_null(), "{k}: {md}");
    }
    assert_eq!(md["dataset_path"], "synthetic");
}

/// `sae eval RUN --model M` runs the compiled-in scripts/ce_eval.py with `--python` and reports
/// its numbers; here the interpreter is a stand-in that checks its arguments and writes a fixed
/// result (the real script is exercised on a real model by scripts/test_ce_e2e.sh).
#[test]
fn eval_with_a_model_runs_the_ce_script_and_reports_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = sae(&["train", "--out", run.to_str().unwrap(), "--steps", "3", "--synth-d-in", "24", "--d-sae", "48"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let fake = dir.path().join("fake-python");
    let log = dir.path().join("args.txt");
    std::fs::write(
        &fake,
        format!(
            r#"#!/bin/sh
echo "$@" > {log}
grep -q "def main" "$1" || exit 3
[ -f "$(dirname "$1")/saetrain_hooks.py" ] || exit 4
while [ $# -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done
printf '{{"ce_loss_score": 0.875, "kl_div_score": 0.75, "ce_loss_without_sae": 3.0, "ce_loss_with_sae": 3.5, "ce_loss_with_ablation": 7.0}}' > "$out"
"#,
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = run.to_str().unwrap();
    let o =
        sae(&["eval", r, "--model", "m.gguf", "--hook", "blocks.2.hook_resid_pre", "--python", fake.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("CE loss score") && stdout.contains("0.8750") && stdout.contains("0.7500"), "{stdout}");
    let args = std::fs::read_to_string(&log).unwrap();
    assert!(args.contains(&format!("--sae {r}")) && args.contains("--model m.gguf"), "{args}");
    assert!(args.contains("--hook blocks.2.hook_resid_pre"), "{args}");
    let report = std::fs::read_to_string(run.join("eval/report.md")).unwrap();
    assert!(report.contains("CE loss with SAE") && report.contains("3.5000"), "{report}");
    let ev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval/eval.json")).unwrap()).unwrap();
    assert_eq!(ev["runs"][0]["ce_eval"]["ce_loss_score"], 0.875);
    // Kept beside the run: a later `sae eval` without a model (and without Python) reports it.
    let o = sae(&["eval", r, "--no-plots"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("0.8750"));

    // An interpreter that writes nothing (no torch: the script prints "skipped") is an error.
    std::fs::write(&fake, "#!/bin/sh\necho skipped: torch is not installed\n").unwrap();
    let o = sae(&["eval", r, "--model", "m", "--python", fake.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("wrote no result"), "{}", stderr(&o));
}
