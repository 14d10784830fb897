//! Evaluation metrics against hand-computed values, the SAE loaders (round trips and refusals),
//! the `sae eval` / `sae export` drivers on a tiny run, and the pictures.

use saetrain::config::{BackendChoice, SparsifierKind, TrainConfig};
use saetrain::eval::report::write_outputs;
use saetrain::eval::run::{evaluate, EvalOptions};
use saetrain::export::load::{load_sae, load_sae_with_layout, Layout, SPARSIFY_WEIGHTS_FILE};
use saetrain::export::saelens::{serialize_f32, transpose, RunTimeNorm, CFG_FILE, WEIGHTS_FILE};
use saetrain::export::ExportedSae;
use saetrain::metrics::recon::{reconstruction_metrics, weight_metrics};
use saetrain::metrics::recovery::recovery;
use saetrain::sparse::SparseCodes;
use serde_json::json;
use std::path::Path;

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-6 * b.abs().max(1.0), "{a} != {b}");
}

/// d = 2, F = 3, hand-picked weights (see `tiny_forward_and_metrics` for the numbers).
fn tiny_sae(architecture: &str) -> ExportedSae {
    ExportedSae {
        d_in: 2,
        d_sae: 3,
        w_enc: vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        b_enc: vec![0.0, 0.0, -1.0],
        w_dec: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8],
        b_dec: vec![0.0, 0.0],
        threshold: None,
        architecture: architecture.into(),
        k: None,
        per_token_cap: None,
        norm: RunTimeNorm::None,
    }
}

const X: [f32; 6] = [1.0, 0.0, 0.0, 2.0, 1.0, 1.0];

#[test]
fn tiny_forward_and_metrics() {
    let sae = tiny_sae("standard");
    // pre = x W_enc^T + b_enc: [1,0,0], [0,2,1], [1,1,1]; ReLU keeps strictly positive entries.
    let (codes, x_hat) = sae.forward(&X, 3).unwrap();
    assert_eq!(codes.to_dense(), vec![1.0, 0.0, 0.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0]);
    // x_hat = z W_dec: [1,0], [0.6,2.8], [1.6,1.8]
    let want = [1.0, 0.0, 0.6, 2.8, 1.6, 1.8];
    for (a, b) in x_hat.iter().zip(want) {
        close(*a as f64, b);
    }
    let m = reconstruction_metrics(&X, &codes, &x_hat, 2);
    assert_eq!(m.tokens, 3);
    close(m.l0, 2.0); // (1 + 2 + 3) / 3
    close(m.l1, 7.0 / 3.0); // (1 + 3 + 3) / 3
                            // residual norms^2: 0, 1, 1 -> SSE 2; MSE = 2 / 3 tokens / 2 dims
    close(m.mse, 1.0 / 3.0);
    // mean [2/3, 1]; squared deviations 10/9, 13/9, 1/9 -> 8/3
    close(m.nmse, 0.75);
    close(m.explained_variance, 0.25);
    // legacy: mean of 1 - se/dev per token = (1 + 4/13 - 8) / 3
    close(m.explained_variance_legacy, -29.0 / 13.0);
    let cos = (1.0 + 2.8 / 8.2f64.sqrt() + 3.4 / 11.6f64.sqrt()) / 3.0;
    close(m.cosine, cos);
    let l2 = (1.0 + 8.2f64.sqrt() / 2.0 + 5.8f64.sqrt() / 2f64.sqrt()) / 3.0;
    close(m.l2_ratio, l2);
    close(m.relative_reconstruction_bias, 15.0 / 10.0);
    assert_eq!(m.density.len(), 3);
    for p in &m.density {
        close(*p, 2.0 / 3.0);
    }
    assert_eq!((m.dead, m.alive), (0, 3));
    close(m.frac_alive, 1.0);
    close(m.frac_density_above_10pct, 1.0);
    assert_eq!(m.features_per_token_hist, vec![0, 1, 1, 1]);
}

#[test]
fn density_dead_and_thresholds() {
    // 4 latents, 20 tokens: latent 0 fires on every token, latent 1 on one, latent 2 on 3, latent 3 never.
    let rows: Vec<Vec<(u32, f32)>> = (0..20)
        .map(|b| {
            let mut r = vec![(0u32, 1.0f32)];
            if b == 0 {
                r.push((1, 2.0));
            }
            if b < 3 {
                r.push((2, 0.5));
            }
            r
        })
        .collect();
    let codes = SparseCodes::from_rows(4, rows);
    let x: Vec<f32> = (0..20).map(|i| i as f32).collect();
    let m = reconstruction_metrics(&x, &codes, &x, 1);
    assert_eq!(m.density, vec![1.0, 0.05, 0.15, 0.0]);
    assert_eq!((m.dead, m.alive), (1, 3));
    close(m.frac_dead, 0.25);
    close(m.frac_density_above_1pct, 0.75); // 1.0, 0.05, 0.15
    close(m.frac_density_above_10pct, 0.5); // 1.0, 0.15
    assert_eq!(m.features_per_token_hist, vec![0, 17, 2, 1]);
    close(m.l0, 24.0 / 20.0);
    close(m.explained_variance, 1.0);
    close(m.cosine, 19.0 / 20.0); // the zero token has cosine 0 by definition
}

#[test]
fn jumprelu_and_topk_selection() {
    let mut j = tiny_sae("jumprelu");
    j.threshold = Some(vec![0.5, 2.5, 0.5]);
    let (codes, _) = j.forward(&X, 3).unwrap();
    // pre [1,0,0] [0,2,1] [1,1,1]; keep pre > theta_i
    assert_eq!(codes.to_dense(), vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]);
    let mut t = tiny_sae("topk");
    t.k = Some(1);
    let (codes, x_hat) = t.forward(&X, 3).unwrap();
    // ties go to the lower latent index
    assert_eq!(codes.to_dense(), vec![1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0]);
    assert_eq!(x_hat, vec![1.0, 0.0, 0.0, 2.0, 1.0, 0.0]);
}

#[test]
fn alignment_known_answer() {
    // a = [2, 0, 0, -1]; cos = [1, 0, 0, -1]
    let w_enc = [2.0, 0.0, 0.0, 1.0, 1.0, 0.0, -1.0, 0.0];
    let w_dec = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0];
    let w = weight_metrics(&w_enc, &w_dec, 2);
    assert_eq!(w.alignment, vec![2.0, 0.0, 0.0, -1.0]);
    assert_eq!(w.enc_dec_cosine, vec![1.0, 0.0, 0.0, -1.0]);
    let s = &w.summary;
    close(s.alignment_mean, 0.25);
    close(s.alignment_median, 0.0);
    close(s.alignment_frac_above_0_9, 0.25);
    close(s.alignment_frac_abs_below_0_1, 0.5);
    close(s.enc_dec_cosine_frac_above_0_9, 0.25);
    close(s.enc_dec_cosine_frac_abs_below_0_1, 0.5);
    close(s.decoder_norm_mean, 1.0);
}

#[test]
fn recovery_known_answer() {
    let truth = [1.0, 0.0, 0.0, 1.0];
    // rows need not be unit: [2,0] -> [1,0]; [0.6,0.8]; [1.6,1.2] -> [0.8,0.6]
    let w_dec = [2.0, 0.0, 0.6, 0.8, 1.6, 1.2];
    let r = recovery(&truth, &w_dec, 2);
    close(r.mmcs, 0.9); // best cosines 1.0 and 0.8
    close(r.frac_above_0_9, 0.5);
    assert_eq!(r.n_true, 2);
}

fn random_sae(architecture: &str, d: usize, f: usize, seed: u64) -> ExportedSae {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    let mut v = |n: usize| (0..n).map(|_| next()).collect::<Vec<f32>>();
    let (w_enc, b_enc, w_dec, b_dec) = (v(f * d), v(f), v(f * d), v(d));
    let th: Vec<f32> = v(f).iter().map(|t| t.abs() * 0.5).collect();
    ExportedSae {
        d_in: d,
        d_sae: f,
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        threshold: (architecture == "jumprelu").then_some(th),
        architecture: architecture.into(),
        k: (architecture == "topk").then_some(3),
        per_token_cap: None,
        norm: RunTimeNorm::None,
    }
}

fn inputs(d: usize, rows: usize) -> Vec<f32> {
    (0..rows * d).map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0).collect()
}

#[test]
fn export_load_roundtrip_both_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let x = inputs(8, 40);
    for arch in ["topk", "jumprelu", "standard"] {
        let sae = random_sae(arch, 8, 16, 7);
        let dir = tmp.path().join(format!("saelens-{arch}"));
        sae.save_saelens(&dir, json!({"model_name": "m", "hook_name": "blocks.0.hook_resid_post"}), None).unwrap();
        let (back, layout) = load_sae_with_layout(&dir).unwrap();
        assert_eq!(layout, Layout::Saelens);
        assert_eq!(back, sae, "{arch}");
        assert_eq!(back.forward(&x, 40).unwrap(), sae.forward(&x, 40).unwrap());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(CFG_FILE)).unwrap()).unwrap();
        assert_eq!(cfg["architecture"], arch);
        assert_eq!(cfg["d_in"], 8);
        assert_eq!(cfg["d_sae"], 16);
        assert_eq!(cfg["metadata"]["hook_name"], "blocks.0.hook_resid_post");
        assert!(cfg["metadata"]["sae_lens_version"].as_str().unwrap().starts_with('6'));
    }
    let sae = random_sae("topk", 8, 16, 9);
    let dir = tmp.path().join("sparsify");
    sae.save_sparsify(&dir).unwrap();
    let (back, layout) = load_sae_with_layout(&dir.join(SPARSIFY_WEIGHTS_FILE)).unwrap();
    assert_eq!(layout, Layout::Sparsify);
    assert_eq!(back, sae);
    assert_eq!(back.forward(&x, 40).unwrap(), sae.forward(&x, 40).unwrap());
    // A folder holding two layouts: a weight file named explicitly is read in its own layout,
    // the folder in SAELens's.
    let both = tmp.path().join("both");
    let other = random_sae("jumprelu", 8, 16, 10);
    other.save_saelens(&both, json!({}), None).unwrap();
    std::fs::copy(dir.join(SPARSIFY_WEIGHTS_FILE), both.join(SPARSIFY_WEIGHTS_FILE)).unwrap();
    assert_eq!(load_sae_with_layout(&both).unwrap().1, Layout::Saelens);
    let e = format!("{:#}", load_sae_with_layout(&both.join(SPARSIFY_WEIGHTS_FILE)).unwrap_err());
    assert!(e.contains("cfg.json") && e.contains("'k'"), "read as sparsify, whose cfg.json needs k: {e}");
    // A JumpReLU SAE has no sparsify form unless converted explicitly.
    let err = random_sae("jumprelu", 8, 16, 1).save_sparsify(&tmp.path().join("no")).unwrap_err().to_string();
    assert!(err.contains("TopK"), "{err}");
}

/// Write SAELens-layout files by hand (tensors given in file orientation).
fn write_saelens(dir: &Path, cfg: serde_json::Value, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let t: Vec<(&str, Vec<usize>, &[f32])> = tensors.iter().map(|(n, s, v)| (*n, s.clone(), v.as_slice())).collect();
    std::fs::write(dir.join(WEIGHTS_FILE), serialize_f32(&t).unwrap()).unwrap();
    std::fs::write(dir.join(CFG_FILE), cfg.to_string()).unwrap();
}

fn saelens_tensors(sae: &ExportedSae) -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    let (d, f) = (sae.d_in, sae.d_sae);
    vec![
        ("W_enc", vec![d, f], transpose(&sae.w_enc, f, d)),
        ("b_enc", vec![f], sae.b_enc.clone()),
        ("W_dec", vec![f, d], sae.w_dec.clone()),
        ("b_dec", vec![d], sae.b_dec.clone()),
    ]
}

#[test]
fn malformed_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let sae = random_sae("standard", 4, 6, 3);
    let good = json!({"architecture": "standard", "d_in": 4, "d_sae": 6});
    let fail = |name: &str, cfg: serde_json::Value, t: Vec<(&'static str, Vec<usize>, Vec<f32>)>| -> String {
        let dir = tmp.path().join(name);
        write_saelens(&dir, cfg, &t);
        format!("{:#}", load_sae(&dir).unwrap_err())
    };
    // missing tensor
    let mut t = saelens_tensors(&sae);
    t.retain(|x| x.0 != "b_enc");
    let e = fail("missing", good.clone(), t);
    assert!(e.contains("missing tensor 'b_enc'") && e.contains(WEIGHTS_FILE), "{e}");
    // wrong shape
    let mut t = saelens_tensors(&sae);
    t[3] = ("b_dec", vec![5], vec![0.0; 5]);
    let e = fail("shape", good.clone(), t);
    assert!(e.contains("'b_dec'") && e.contains("shape [5]"), "{e}");
    // cfg.json d_sae disagreeing with the tensors
    let e = fail("dsae", json!({"architecture": "standard", "d_in": 4, "d_sae": 7}), saelens_tensors(&sae));
    assert!(e.contains("'d_sae'") && e.contains(CFG_FILE), "{e}");
    // unknown architecture
    let e = fail("arch", json!({"architecture": "gated", "d_in": 4, "d_sae": 6}), saelens_tensors(&sae));
    assert!(e.contains("'architecture'") && e.contains("gated"), "{e}");
    // jumprelu without its threshold
    let e = fail("thr", json!({"architecture": "jumprelu", "d_in": 4, "d_sae": 6}), saelens_tensors(&sae));
    assert!(e.contains("missing tensor 'threshold'"), "{e}");
    // topk without k
    let e = fail("k", json!({"architecture": "topk", "d_in": 4, "d_sae": 6}), saelens_tensors(&sae));
    assert!(e.contains("'k'"), "{e}");
    // a tensor the architecture does not have (SAELens loads its state dict strictly)
    let mut t = saelens_tensors(&sae);
    t.push(("W_skip", vec![4, 4], vec![0.0; 16]));
    let e = fail("skip", good.clone(), t);
    assert!(e.contains("tensor 'W_skip' is not part of the SAELens standard SAE") && e.contains(WEIGHTS_FILE), "{e}");
    let mut t = saelens_tensors(&sae);
    t.push(("threshold", vec![6], vec![0.0; 6]));
    let e = fail("topk-thr", json!({"architecture": "topk", "d_in": 4, "d_sae": 6, "k": 2}), t);
    assert!(e.contains("'threshold' is not part of the SAELens topk SAE"), "{e}");
    // a cfg.json that does not name the sizes is not SAELens's (a sparsify cfg.json beside
    // SAELens weights)
    for cfg in [json!({}), json!({"architecture": "standard", "d_in": 4}), json!({"k": 2, "num_latents": 6, "d_in": 4})]
    {
        let e = fail("sizes", cfg, saelens_tensors(&sae));
        assert!(e.contains("field 'd_") && e.contains("is missing") && e.contains(CFG_FILE), "{e}");
    }
    // a per-token cap outside 1..=d_sae
    for cap in [0, 7] {
        let e = fail(
            "cap",
            json!({"architecture": "standard", "d_in": 4, "d_sae": 6, "per_token_cap": cap}),
            saelens_tensors(&sae),
        );
        assert!(e.contains("'per_token_cap'") && e.contains("1..=6"), "{e}");
    }
    // neither layout
    let e = format!("{:#}", load_sae(tmp.path()).unwrap_err());
    assert!(e.contains("holds several SAEs") || e.contains("not an SAE checkpoint"), "{e}");

    // sparsify: num_latents disagreeing, missing k, d_in absent (inferred).
    let topk = random_sae("topk", 4, 8, 5);
    let dir = tmp.path().join("sp");
    topk.save_sparsify(&dir).unwrap();
    let mut cfg = topk.sparsify_cfg().unwrap();
    cfg.as_object_mut().unwrap().remove("d_in");
    std::fs::write(dir.join(CFG_FILE), cfg.to_string()).unwrap();
    assert_eq!(load_sae(&dir).unwrap(), topk);
    cfg["num_latents"] = json!(9);
    std::fs::write(dir.join(CFG_FILE), cfg.to_string()).unwrap();
    let e = format!("{:#}", load_sae(&dir).unwrap_err());
    assert!(e.contains("'num_latents'") && e.contains("encoder.weight"), "{e}");
    cfg["num_latents"] = json!(0);
    cfg["expansion_factor"] = json!(2);
    cfg.as_object_mut().unwrap().remove("k");
    std::fs::write(dir.join(CFG_FILE), cfg.to_string()).unwrap();
    let e = format!("{:#}", load_sae(&dir).unwrap_err());
    assert!(e.contains("'k'"), "{e}");
}

#[test]
fn half_precision_and_options_are_read() {
    // BF16 tensors, apply_b_dec_to_input = false and rescale_acts_by_decoder_norm are honoured.
    let tmp = tempfile::tempdir().unwrap();
    let mut sae = random_sae("topk", 4, 6, 11);
    sae.w_dec.iter_mut().enumerate().for_each(|(i, v)| *v *= 1.0 + (i / 4) as f32);
    let dir = tmp.path().join("bf16");
    std::fs::create_dir_all(&dir).unwrap();
    let t = saelens_tensors(&sae);
    let bf: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, s, v)| {
            (n.to_string(), s.clone(), v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bf
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap())
        })
        .collect();
    std::fs::write(dir.join(WEIGHTS_FILE), safetensors::serialize(views, None).unwrap()).unwrap();
    let cfg = json!({"architecture": "topk", "d_in": 4, "d_sae": 6, "k": 3,
        "apply_b_dec_to_input": false, "rescale_acts_by_decoder_norm": true});
    std::fs::write(dir.join(CFG_FILE), cfg.to_string()).unwrap();
    let back = load_sae(&dir).unwrap();
    // Reference: the SAELens forward on the bf16-rounded weights, computed directly.
    let r = |v: &[f32]| v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect::<Vec<_>>();
    let (we, be, wd, bd) = (r(&sae.w_enc), r(&sae.b_enc), r(&sae.w_dec), r(&sae.b_dec));
    let x = inputs(4, 5);
    let (_, x_hat) = back.forward(&x, 5).unwrap();
    for b in 0..5 {
        let xr = &x[b * 4..(b + 1) * 4];
        let mut pre: Vec<(f32, usize)> = (0..6)
            .map(|i| {
                let norm = wd[i * 4..(i + 1) * 4].iter().map(|v| v * v).sum::<f32>().sqrt();
                let p = (0..4).map(|j| xr[j] * we[i * 4 + j]).sum::<f32>() + be[i];
                (p * norm, i)
            })
            .collect();
        pre.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        let mut want = bd.clone();
        for &(v, i) in pre.iter().take(3).filter(|p| p.0 > 0.0) {
            let norm = wd[i * 4..(i + 1) * 4].iter().map(|v| v * v).sum::<f32>().sqrt();
            for j in 0..4 {
                want[j] += v / norm * wd[i * 4 + j];
            }
        }
        for j in 0..4 {
            assert!((x_hat[b * 4 + j] - want[j]).abs() < 1e-4, "token {b}: {} vs {}", x_hat[b * 4 + j], want[j]);
        }
    }
}

fn tiny_run(dir: &Path, sparsifier: SparsifierKind) -> saetrain::train::Summary {
    let cfg = TrainConfig {
        sparsifier,
        d_sae: 32,
        k: 3,
        synth_d_in: 16,
        synth_features: 24,
        synth_active: 2.0,
        batch_size: 128,
        steps: 40,
        eval_tokens: 512,
        log_every: 10,
        eval_every: 20,
        backend: BackendChoice::Cpu,
        quiet: true,
        out: dir.to_path_buf(),
        ..TrainConfig::default()
    };
    saetrain::train::run(cfg, None).unwrap()
}

#[test]
fn eval_export_and_pictures_on_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run_a = tmp.path().join("wta");
    let run_b = tmp.path().join("topk");
    let sa = tiny_run(&run_a, SparsifierKind::Wta);
    let sb = tiny_run(&run_b, SparsifierKind::Topk);

    // The exported-SAE path reproduces training's own held-out numbers.
    let opts = EvalOptions::default();
    let ea = evaluate(&run_a, "wta", &opts).unwrap();
    let eb = evaluate(&run_b, "topk", &opts).unwrap();
    for (e, s) in [(&ea, &sa), (&eb, &sb)] {
        assert!(e.is_run);
        assert_eq!(e.exported.tokens, s.eval.tokens);
        close(e.exported.l0, s.eval.l0);
        assert!((e.exported.explained_variance - s.eval.explained_variance).abs() < 1e-4);
        let t = e.training.as_ref().unwrap();
        close(t.l0, s.eval_training_sparsifier.l0);
        assert!((t.explained_variance - s.eval_training_sparsifier.explained_variance).abs() < 1e-4);
        let r = e.recovery.unwrap();
        close(r.mmcs, s.recovery.unwrap().mmcs);
        assert_eq!(e.curves.len(), 4);
    }
    assert_eq!(ea.architecture, "jumprelu");
    assert_eq!(eb.architecture, "topk");

    // export -> load -> identical reconstruction, both layouts.
    let x = inputs(16, 64);
    let (sae_b, _, _) = saetrain::cli::export_cmd::sae_for_export(&run_b).unwrap();
    assert_eq!(sae_b, load_sae(&run_b).unwrap());
    for format in [saetrain::cli::export_cmd::ExportFormat::Saelens, saetrain::cli::export_cmd::ExportFormat::Sparsify]
    {
        let out = tmp.path().join(format!("export-{format:?}"));
        saetrain::cli::export_cmd::run(saetrain::cli::export_cmd::ExportArgs {
            run: run_b.clone(),
            format,
            out: out.clone(),
            k: None,
            model_name: Some("gpt2".into()),
            hook_name: Some("blocks.6.hook_resid_post".into()),
            hook_layer: Some(6),
            context_size: None,
            overwrite: false,
        })
        .unwrap();
        let back = load_sae(&out).unwrap();
        assert_eq!(back.forward(&x, 64).unwrap(), sae_b.forward(&x, 64).unwrap(), "{format:?}");
    }

    // ce_eval.json is picked up; pictures and report are written.
    std::fs::write(run_a.join("ce_eval.json"), r#"{"ce_loss_score": 0.91, "kl_div_score": 0.93}"#).unwrap();
    let ea = evaluate(&run_a, "wta", &opts).unwrap();
    let out = tmp.path().join("report");
    let (table, _) = write_outputs(std::slice::from_ref(&ea), &out, false, true).unwrap();
    assert!(table.contains("CE loss score") && table.contains("0.9100"), "{table}");
    // wta's training column differs from its JumpReLU export; topk's would repeat the numbers.
    assert!(table.contains("wta (train: wta)"), "{table}");
    let (table_b, _) = write_outputs(std::slice::from_ref(&eb), &tmp.path().join("report-b"), false, true).unwrap();
    assert!(table_b.contains("topk (topk)") && !table_b.contains("(train: topk)"), "{table_b}");
    let pngs = ["training_curves", "feature_density", "alignment", "enc_dec_cosine", "features_per_token"];
    for p in pngs {
        let bytes = std::fs::read(out.join(format!("{p}.png"))).unwrap();
        assert!(bytes.len() > 2000 && bytes.starts_with(b"\x89PNG"), "{p}.png");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for p in pngs {
        assert!(md.contains(&format!("({p}.png)")), "report.md lacks {p}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json["runs"][0]["ce_eval"]["kl_div_score"], 0.93);
    assert_eq!(json["runs"][0]["exported"]["density"].as_array().unwrap().len(), 32);

    let cmp = tmp.path().join("compare");
    write_outputs(&[ea, eb], &cmp, true, true).unwrap();
    for p in pngs {
        assert!(std::fs::metadata(cmp.join(format!("compare_{p}.png"))).unwrap().len() > 2000, "{p}");
    }
}

#[test]
fn folded_input_scale_matches_training_backend() {
    use saetrain::backend::{cpu::CpuBackend, Backend, InferMode};
    use saetrain::data::Batch;
    use saetrain::model::{init, Shape, TrainState};
    // Exported weights on raw x must give the backend's codes on s*x and its reconstruction / s.
    let (d, f, rows, s) = (8, 16, 32, 2.5f32);
    for (sparsifier, aligned) in
        [(SparsifierKind::Topk, false), (SparsifierKind::Wta, true), (SparsifierKind::Relu, false)]
    {
        let cfg = TrainConfig { sparsifier, d_sae: f, k: 3, aligned, ..TrainConfig::default() };
        let mut params = init::tied(Shape::new(d, f), 3, aligned);
        params.parts_mut().b_enc.iter_mut().enumerate().for_each(|(i, b)| *b = 0.05 * (i as f32 % 3.0) - 0.05);
        params.parts_mut().b_dec.iter_mut().enumerate().for_each(|(i, b)| *b = 0.1 * i as f32);
        let mut state = TrainState::new(params);
        state.theta = (0..f).map(|i| 0.1 + 0.02 * i as f32).collect();
        state.theta_set = vec![true; f]; // measured thresholds (unset ones never fire)
        let w_eff = saetrain::train::effective_encoder(&cfg, &state);
        let sae = ExportedSae::from_training(&cfg, &state.params, &w_eff, &state.theta, s);
        let x = inputs(d, rows);
        let xs: Vec<f32> = x.iter().map(|v| v * s).collect();
        let mut backend = CpuBackend::new(cfg, state).unwrap();
        let inf = backend.infer(&Batch::from_f32(rows, d, xs), InferMode::Exported).unwrap();
        let (codes, x_hat) = sae.forward(&x, rows).unwrap();
        assert!(codes.nnz() > 0, "{sparsifier:?}: no codes");
        assert_eq!(codes.idx, inf.codes.idx, "{sparsifier:?}");
        for (a, b) in codes.val.iter().zip(&inf.codes.val) {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{sparsifier:?}: {a} vs {b}");
        }
        for (a, b) in x_hat.iter().zip(&inf.x_hat) {
            assert!((a - b / s).abs() < 1e-4, "{sparsifier:?}: {a} vs {}", b / s);
        }
    }
}

#[test]
fn a_picture_that_cannot_be_written_names_its_file() {
    use saetrain::plot::{histogram, line_panels, HistSpec, Panel, Sample, Series};
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-dir");
    let spec = HistSpec { title: "t".into(), x_label: "x".into(), range: None, bins: 4, integer: false, note: None };
    let sample = [Sample { label: "a".into(), values: vec![0.1, 0.2, 0.3] }];
    let panel = Panel {
        title: "t".into(),
        x_label: "x".into(),
        y_label: "y".into(),
        series: vec![Series { label: "a".into(), points: vec![(0.0, 1.0), (1.0, 2.0)] }],
        log_y: false,
    };
    let h = missing.join("alignment.png");
    let e = format!("{:#}", histogram(&h, &sample, &spec).unwrap_err());
    assert!(e.contains(&h.display().to_string()), "{e}");
    let l = missing.join("training_curves.png");
    let e = format!("{:#}", line_panels(&l, &[panel]).unwrap_err());
    assert!(e.contains(&l.display().to_string()), "{e}");
}

/// `sae eval` says which checkpoint it evaluated: the step and the planned steps, marked
/// unfinished when the run has not reached them. And it never pairs an SAE file with a trainer
/// state of another checkpoint (a run in progress writing one between the reads): it reads
/// again, and fails rather than report a mix.
#[test]
fn eval_names_the_step_it_evaluated_and_never_mixes_two_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    tiny_run(&dir, SparsifierKind::Wta);
    let e = evaluate(&dir, "run", &EvalOptions::default()).unwrap();
    assert_eq!((e.step, e.steps, e.unfinished()), (Some(40), Some(40), String::new()));

    // The same checkpoint in a run that plans 80 steps: unfinished.
    let config = dir.join(saetrain::train::CONFIG_FILE);
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["steps"] = json!(80);
    std::fs::write(&config, c.to_string()).unwrap();
    let e = evaluate(&dir, "run", &EvalOptions::default()).unwrap();
    assert_eq!((e.step, e.steps), (Some(40), Some(80)));
    assert_eq!(e.unfinished(), ", step 40 of 80, unfinished");

    // The SAE's cfg.json from another checkpoint than the trainer state (as a reader racing a
    // checkpoint would see it, every time): refused by name.
    let cfg_path = dir.join(CFG_FILE);
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let tokens = cfg["metadata"]["trained_tokens"].as_u64().unwrap();
    cfg["metadata"]["trained_tokens"] = json!(tokens + 128);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // While a trainer holds the run's lock, that is a race: try again.
    let held = saetrain::train::rundir::lock(&dir).unwrap();
    let err = format!("{:#}", evaluate(&dir, "run", &EvalOptions::default()).unwrap_err());
    assert!(err.contains("wrote checkpoints faster than they could be read"), "{err}");
    // With no writer it never resolves: the files were replaced, and the message says which
    // field disagrees and how to write them again.
    drop(held);
    let err = format!("{:#}", evaluate(&dir, "run", &EvalOptions::default()).unwrap_err());
    assert!(
        err.contains("'metadata.trained_tokens' is")
            && err.contains("no trainer is writing")
            && err.contains("sae export"),
        "{err}"
    );
    // Another SAE's files in the run's place (sizes or architecture unlike its trainer state's):
    // refused, not reported beside the trainer state's numbers.
    let other = tmp.path().join("other");
    tiny_run(&other, SparsifierKind::Topk);
    for f in [CFG_FILE, "sae_weights.safetensors"] {
        std::fs::copy(other.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["metadata"]["trained_tokens"] = json!(tokens);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = format!("{:#}", evaluate(&dir, "run", &EvalOptions::default()).unwrap_err());
    assert!(err.contains("holds a topk SAE") && err.contains("not this run's"), "{err}");
}

/// On a run's own shards, `sae eval --tokens N` stays inside the run's held-out split: a split
/// of N rows would be laid out differently and hold rows the run trained on (before, a larger or
/// another N evaluated partly on training rows). A run that held out nothing is refused.
#[test]
fn eval_of_a_run_on_its_own_shards_uses_only_the_rows_it_held_out() {
    use saetrain::data::{cli::synth, synthetic::SynthSpec, Dtype};
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    let spec = SynthSpec { d_in: 16, n_features: 24, mean_active: 2.0, zipf: 1.0, noise: 0.01, seed: 5 };
    synth(&shards, &spec, 4000, Dtype::Float32, 1000, false, &|| Ok(())).unwrap();
    let run = |name: &str, eval_tokens: usize| {
        let dir = tmp.path().join(name);
        let cfg = TrainConfig {
            sparsifier: SparsifierKind::Topk,
            d_sae: 32,
            k: 3,
            batch_size: 128,
            steps: 40,
            eval_tokens,
            data: Some(shards.clone()),
            backend: BackendChoice::Cpu,
            quiet: true,
            out: dir.clone(),
            ..TrainConfig::default()
        };
        saetrain::train::run(cfg, None).unwrap();
        dir
    };
    let dir = run("held_out_768", 768);
    let rows = |tokens: Option<usize>, data: Option<&Path>| {
        let opts = EvalOptions { tokens, data: data.map(Path::to_path_buf) };
        evaluate(&dir, "run", &opts).unwrap().exported.tokens
    };
    let whole = rows(None, None);
    assert!(whole > 700 && whole <= 768, "{whole}");
    assert_eq!(rows(Some(2000), None), whole, "more than the split: the split");
    assert_eq!(rows(Some(2000), Some(&shards)), whole, "the run's data named with --data: the same");
    // A copy of the run's shards elsewhere is the run's data too (told by the rows sampled at
    // open), not a separate evaluation set of which 2000 rows could be taken.
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in std::fs::read_dir(&shards).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    assert_eq!(rows(Some(2000), Some(&copy)), whole, "a copy of the run's data");
    assert!(rows(Some(300), None) <= 300);

    let none = run("held_out_0", 0);
    let opts = EvalOptions { tokens: Some(500), ..EvalOptions::default() };
    let err = format!("{:#}", evaluate(&none, "run", &opts).unwrap_err());
    assert!(err.contains("held out no rows"), "{err}");
}

/// Labels name each input's pictures, so they must differ: numbering the two `run`s gives
/// run-1, which a third input is called by its own name.
#[test]
fn labels_of_several_inputs_never_repeat() {
    use saetrain::eval::report::labels;
    let p = |s: &str| std::path::PathBuf::from(format!("/nonexistent-saetrain-labels/{s}"));
    let l = labels(&[p("a/run"), p("b/run"), p("run-1")]);
    assert_eq!(l, ["run-1", "run-2", "run-1-2"]);
    let l = labels(&[p("x y"), p("x_y"), p("z")]);
    assert_eq!(l, ["x_y", "x_y-2", "z"]);
    let mut seen = l.clone();
    seen.dedup();
    assert_eq!(seen.len(), 3);
}
