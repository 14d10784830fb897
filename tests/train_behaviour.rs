//! Whole-run behaviour of `train::run` on tiny synthetic problems (CPU backend):
//! resume equality, learning for every sparsifier, inference thresholds, dead-latent revival.

use saetrain::config::{AuxKind, BDecInit, BackendChoice, SparsifierKind, TrainConfig};
use saetrain::train::{self, checkpoint, Summary, CONFIG_FILE, METRICS_FILE};
use serde_json::Value;
use std::path::Path;

fn base(out: &Path, sparsifier: SparsifierKind) -> TrainConfig {
    TrainConfig {
        sparsifier,
        d_sae: 64,
        k: 4,
        batch_size: 256,
        steps: 200,
        lr: 3e-3,
        synth_d_in: 16,
        synth_features: 48,
        synth_active: 3.0,
        synth_noise: 0.01,
        eval_tokens: 4096,
        eval_every: 0,
        log_every: 10,
        b_dec_init: BDecInit::Mean,
        backend: BackendChoice::Cpu,
        quiet: true,
        out: out.to_path_buf(),
        ..TrainConfig::default()
    }
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join(METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("metrics line without {key}: {v}"))
}

/// N steps in one go vs N/2 steps, then `--resume` to N: the trainer state (parameters, Adam
/// moments, thresholds, dead counters, densities, data position) must be bitwise identical.
///
/// The half run is a run with `steps = N/2` whose `config.json` is then rewritten with
/// `steps = N` (what `--resume` reads). Everything that depends on the total step count is
/// pinned so that the first N/2 steps of both runs are the same computation: explicit warm-up,
/// threshold start and dead window; decay_frac 0.02 puts one decay step at the end of the
/// N-step run (round(40 * 0.02) = 1) and none in the N/2-step run (round(20 * 0.02) = 0).
#[test]
fn resume_is_bitwise_identical_to_an_uninterrupted_run() {
    let n = 40;
    for (name, sparsifier, aligned) in
        [("batchtopk", SparsifierKind::Batchtopk, false), ("wta aligned", SparsifierKind::Wta, true)]
    {
        let tmp = tempfile::tempdir().unwrap();
        let (full_dir, split_dir) = (tmp.path().join("full"), tmp.path().join("split"));
        let mk = |out: &Path, steps: u64| TrainConfig {
            steps,
            aligned,
            warmup_steps: Some(5),
            decay_frac: 0.02,
            threshold_start: Some(5),
            threshold_decay: 0.9,
            dead_window: Some(512),
            eval_tokens: 512,
            d_sae: 96, // some latents die, so aux_k is active
            ..base(out, sparsifier)
        };
        let full = mk(&full_dir, n);
        train::run(full.clone(), None).unwrap();

        train::run(mk(&split_dir, n / 2), None).unwrap();
        let (half_state, half_meta) = checkpoint::load(&split_dir).unwrap();
        assert_eq!(half_meta.step, n / 2);
        assert_eq!(half_state.step, n / 2);
        let mut resume_cfg = mk(&split_dir, n);
        resume_cfg.d_in = Some(resume_cfg.synth_d_in);
        std::fs::write(split_dir.join(CONFIG_FILE), serde_json::to_string_pretty(&resume_cfg).unwrap()).unwrap();
        // Only `quiet` and `threads` are taken from the caller's config on resume.
        let caller = TrainConfig { quiet: true, ..TrainConfig::default() };
        train::run(caller, Some(&split_dir)).unwrap();

        let (a, ma) = checkpoint::load(&full_dir).unwrap();
        let (b, mb) = checkpoint::load(&split_dir).unwrap();
        assert_eq!(a.step, n);
        assert_eq!(ma, mb, "{name}: checkpoint metadata (step, tokens, data position)");
        assert!(a.theta_set.iter().any(|&s| s), "{name}: thresholds never measured");
        assert_ne!(a.params, half_state.params, "{name}: the second half trained nothing");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&a.params.data), bits(&b.params.data), "{name}: parameters differ bitwise after resume");
        assert_eq!(bits(&a.adam_m.data), bits(&b.adam_m.data), "{name}: adam m");
        assert_eq!(bits(&a.adam_v.data), bits(&b.adam_v.data), "{name}: adam v");
        assert_eq!(bits(&a.theta), bits(&b.theta), "{name}: theta");
        assert_eq!(a, b, "{name}: trainer state");
        // The metric lines of the resumed run continue the uninterrupted run's exactly.
        let strip = |v: Vec<Value>| -> Vec<Value> {
            v.into_iter()
                .map(|mut l| {
                    for k in ["elapsed_s", "tokens_per_s"] {
                        l.as_object_mut().unwrap().remove(k);
                    }
                    l
                })
                .collect()
        };
        assert_eq!(strip(metrics(&full_dir)), strip(metrics(&split_dir)), "{name}: metrics.jsonl");
    }
}

fn train(dir: &Path, cfg: TrainConfig) -> (Summary, Vec<Value>) {
    let s = train::run(cfg, None).unwrap();
    (s, metrics(dir))
}

/// Every sparsifier learns: held-out and logged explained variance rise well above the first
/// logged value, the loss stays finite, and L0 is what the sparsifier promises.
#[test]
fn every_sparsifier_learns() {
    use SparsifierKind::*;
    for sp in [Topk, Batchtopk, MutualChoice, Wta, Hybrid, Relu] {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = base(tmp.path(), sp);
        if sp == Relu {
            cfg.l1_coeff = 0.01;
        }
        let (s, m) = train(tmp.path(), cfg.clone());
        let (first, last) = (&m[0], m.last().unwrap());
        let (ev0, ev1) = (f(first, "ev"), f(last, "ev"));
        eprintln!(
            "{:<14} EV {ev0:.3} -> {ev1:.3}, loss {:.4} -> {:.4}, L0 {:.2}, eval EV {:.3} (exported) {:.3} (training), eval L0 {:.2} / {:.2}, dead {}",
            sp.name(),
            f(first, "loss"),
            f(last, "loss"),
            f(last, "l0"),
            s.eval.explained_variance,
            s.eval_training_sparsifier.explained_variance,
            s.eval.l0,
            s.eval_training_sparsifier.l0,
            f(last, "dead"),
        );
        assert!(m.iter().all(|l| f(l, "loss").is_finite()), "{}: non-finite loss", sp.name());
        assert!(f(last, "loss") < f(first, "loss"), "{}: loss did not fall", sp.name());
        assert!(ev1 > ev0 + 0.3 && ev1 > 0.7, "{}: EV {ev0:.3} -> {ev1:.3}", sp.name());
        assert!(s.eval_training_sparsifier.explained_variance > 0.7, "{}: held-out EV", sp.name());
        if sp != Relu {
            let l0 = f(last, "l0");
            assert!(l0 <= 1.5 * cfg.k as f64 + 1e-9 && l0 > 0.5, "{}: training L0 {l0}", sp.name());
        }
    }
}

/// batchtopk's exported JumpReLU (EMA of the batch minimum kept activation) fires about k
/// latents per held-out token.
#[test]
fn batchtopk_thresholds_give_l0_near_k() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { steps: 300, ..base(tmp.path(), SparsifierKind::Batchtopk) };
    let (s, _) = train(tmp.path(), cfg.clone());
    let l0 = s.eval.l0;
    let k = cfg.k as f64;
    eprintln!(
        "batchtopk: exported JumpReLU L0 {l0:.3} (k = {k}), EV {:.3}; training sparsifier L0 {:.3} EV {:.3}",
        s.eval.explained_variance, s.eval_training_sparsifier.l0, s.eval_training_sparsifier.explained_variance
    );
    assert!((l0 - k).abs() <= 0.3 * k, "exported L0 {l0} is not within 30% of k = {k}");
    assert!(s.eval.explained_variance > 0.6, "exported EV {}", s.eval.explained_variance);
}

/// aux_k with a tiny dead window: the aux loss is active, and the dead count falls.
#[test]
fn aux_k_revives_dead_latents() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        d_sae: 256,
        steps: 300,
        aux: Some(AuxKind::AuxK),
        dead_window: Some(512),
        ..base(tmp.path(), SparsifierKind::Topk)
    };
    let (_, m) = train(tmp.path(), cfg);
    let dead: Vec<f64> = m.iter().map(|l| f(l, "dead")).collect();
    let aux: Vec<f64> = m.iter().map(|l| f(l, "aux_loss")).collect();
    eprintln!("aux_k dead per log line: {dead:?}");
    eprintln!("aux_k aux_loss per log line: {:?}", aux.iter().map(|a| format!("{a:.4}")).collect::<Vec<_>>());
    assert!(aux.iter().any(|&a| a > 0.0), "aux loss never active");
    let peak = dead.iter().cloned().fold(0.0, f64::max);
    let last = *dead.last().unwrap();
    assert!(peak > 0.0, "no latent ever died: the test does not exercise aux_k");
    assert!(last < 0.5 * peak, "dead latents were not revived: peak {peak}, final {last}");
}
