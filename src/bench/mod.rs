//! Benchmarks behind `sae bench` (the criterion benches in `benches/` reuse these builders).
//!
//! Every number is reported next to a physical reference: the step time as a multiple of the
//! encoder GEMM alone (the floor: everything else should be cheap), the GEMM as GFLOP/s, and
//! selection as GB/s of `pre` scanned and a fraction of the measured memory read bandwidth.
//! On the CPU the GEMM is also put against this machine's measured FMA peak ([`peak`]), and every
//! phase against the GEMM.

pub mod cuda;
pub mod peak;
pub mod traffic;

use crate::backend::cpu::{gemm, CpuBackend};
use crate::backend::{Backend, PhaseTimes};
use crate::config::{AuxKind, DenseCodes, SparsifierKind, TrainConfig};
use crate::data::synthetic::{SynthSpec, Synthetic};
use crate::data::{Batch, BatchSource};
use crate::model::{init, Shape, TrainState};
use crate::sparsify;
use crate::sparsify::cases::Case;
use crate::sparsify::plan;
use crate::util::stats::median;
use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// A training config for the bench shape (rate = k/d_sae for feature choice).
pub fn bench_config(case: &Case, d_in: usize, d_sae: usize, batch: usize, k: usize) -> TrainConfig {
    let base = TrainConfig {
        d_in: Some(d_in),
        d_sae,
        batch_size: batch,
        k,
        rate: Some(k as f64 / d_sae as f64),
        steps: 1_000_000,
        ..TrainConfig::default()
    };
    case.config(&base)
}

/// A CPU backend at the bench shape with tied init, and a source of realistic batches.
pub fn bench_setup(cfg: &TrainConfig) -> Result<(CpuBackend, Synthetic)> {
    let d_in = cfg.d_in.expect("bench config sets d_in");
    let spec = SynthSpec { d_in, n_features: 4 * d_in, mean_active: 20.0, zipf: 1.0, noise: 0.01, seed: 7 };
    let mut source = Synthetic::new(spec, cfg.batch_size)?;
    let first = source.next_batch()?;
    let mut params = init::tied(Shape::new(d_in, cfg.d_sae), 1, cfg.aligned);
    let b_dec = init::mean_rows(&first.to_f32(), d_in);
    params.parts_mut().b_dec.copy_from_slice(&b_dec);
    Ok((CpuBackend::new(cfg.clone(), TrainState::new(params))?, source))
}

#[derive(Clone, Debug, Serialize)]
pub struct StepRow {
    pub sparsifier: String,
    /// Median of the timed steps (CPU; the CUDA bench: their mean).
    pub step_ms: f64,
    pub tokens_per_s: f64,
    /// Median of this row's encoder GEMMs (CPU: one timed before each step, [`GemmProbe`]; CUDA:
    /// this rule's encoder product, timed before and after the steps, the faster of the two).
    pub gemm_ms: f64,
    /// step time / encoder GEMM time; on the CPU the median over the timed steps of each step
    /// against the product timed just before it.
    pub step_over_gemm: f64,
    /// Per-phase milliseconds per step (means over the timed steps).
    pub phases_ms: PhaseTimes,
    /// Each phase's time as a fraction of the encoder GEMM (encode includes the GEMM itself).
    pub phases_over_gemm: PhaseTimes,
    pub l0: f64,
    /// CPU only: each phase's modelled bytes and GB/s ([`traffic`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic: Option<traffic::PhaseTraffic>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub d_in: usize,
    pub d_sae: usize,
    pub batch: usize,
    pub k: usize,
    pub threads: usize,
    pub gemm_ms: f64,
    pub gemm_gflops: f64,
    /// This machine's measured f32 FMA peak on the bench's threads (None: no FMA loop for this CPU).
    pub fma_peak: Option<peak::FmaPeak>,
    /// gemm_gflops / fma_peak.gflops.
    pub gemm_frac_peak: Option<f64>,
    /// Process CPU time / (wall time x threads) while the GEMM was timed: near 1 on an idle
    /// machine; lower means other processes had the cores, and every time here is inflated.
    pub cpu_share: f64,
    /// Measured memory read bandwidth (GB/s, [`read_bandwidth`]), for the phases' traffic.
    pub read_gb_per_s: f64,
    pub rows: Vec<StepRow>,
}

/// `phases` (any unit) as fractions of a GEMM time in the same unit.
pub fn phase_fractions(phases: &PhaseTimes, gemm: f64) -> PhaseTimes {
    let f = |v: f64| v / gemm;
    PhaseTimes {
        encode: f(phases.encode),
        select: f(phases.select),
        decode: f(phases.decode),
        backward: f(phases.backward),
        optimizer: f(phases.optimizer),
    }
}

/// Time the encoder's matrix product alone (`xc W^T`, no bias, no centring), best of `reps`.
pub fn time_gemm(d_in: usize, d_sae: usize, batch: usize, reps: usize) -> f64 {
    let mut probe = GemmProbe::new(d_in, d_sae, batch);
    (0..reps.max(1)).map(|_| probe.time()).fold(f64::INFINITY, f64::min)
}

/// The encoder's product at the bench's shape on buffers of its own, timed again and again during
/// a step bench: once before every timed step, so that each step is put against a product timed
/// seconds before it. On a shared machine whose speed drifts by 20-30% within minutes, a product
/// timed once at the start made a sparsifier timed later look slower or faster than it was.
pub struct GemmProbe {
    x: Vec<f32>,
    w: Vec<f32>,
    pre: Vec<f32>,
    shape: (usize, usize, usize),
    /// Process CPU seconds and wall seconds summed over the timed products.
    cpu_s: f64,
    wall_s: f64,
    /// Every timed product's seconds.
    pub times: Vec<f64>,
}

impl GemmProbe {
    /// Buffers for `batch x d_in` times `(d_sae x d_in)^T`, paged in by one untimed product.
    /// They are on huge pages, as the step's own operands and `pre` are (`util::hugepage`):
    /// on 4 KB pages the same product ran 3% slower (4096 x 4608 x 576, 2 threads, Zen 4,
    /// medians of 12 alternated: 117.3 / 119.5 / 139.0 against 114.1 / 115.5 / 135.7 ms), which
    /// flattered every step / GEMM ratio by as much.
    pub fn new(d_in: usize, d_sae: usize, batch: usize) -> Self {
        use crate::util::hugepage;
        let (x, w) = (hugepage::copy_f32(&random(batch * d_in, 1)), hugepage::copy_f32(&random(d_sae * d_in, 2)));
        let mut pre = hugepage::zeroed_f32(batch * d_sae);
        gemm::abt(&x, &w, batch, d_sae, d_in, &mut pre, false);
        Self { x, w, pre, shape: (batch, d_sae, d_in), cpu_s: 0.0, wall_s: 0.0, times: vec![] }
    }

    /// One product's seconds (also recorded in `times`).
    pub fn time(&mut self) -> f64 {
        let (m, n, k) = self.shape;
        let cpu0 = peak::process_cpu_seconds();
        let t = Instant::now();
        gemm::abt(&self.x, &self.w, m, n, k, &mut self.pre, false);
        let s = t.elapsed().as_secs_f64();
        self.cpu_s += peak::process_cpu_seconds() - cpu0;
        self.wall_s += s;
        self.times.push(s);
        s
    }

    /// The share of the pool's cores the process had during the timed products
    /// ([`peak::cpu_share`]).
    pub fn cpu_share(&self) -> f64 {
        peak::cpu_share(self.cpu_s, self.wall_s, rayon::current_num_threads())
    }
}

/// What a step bench varies beyond the shape.
#[derive(Clone, Copy, Debug)]
pub struct StepBenchOptions {
    /// Fraction of latents held dead before every step, so the aux loss is active (cases whose
    /// sparsifier has no default aux loss get aux_k). 0: no latent dead, aux inactive.
    pub dead_fraction: f64,
    /// The CPU backend's choice of sparse or dense products with the codes.
    pub dense_codes: DenseCodes,
}

impl Default for StepBenchOptions {
    fn default() -> Self {
        Self { dead_fraction: 0.0, dense_codes: DenseCodes::Auto }
    }
}

/// Every `1 / fraction`-th latent (spread over the index range), `round(fraction * d_sae)` of them.
pub fn dead_latents(d_sae: usize, fraction: f64) -> Vec<usize> {
    let n = ((fraction.clamp(0.0, 1.0) * d_sae as f64).round() as usize).min(d_sae);
    (0..n).map(|j| j * d_sae / n.max(1)).collect()
}

/// Time whole training steps per sparsifier (after one warm-up step), split into phases.
pub fn bench_step(
    cases: &[Case],
    d_in: usize,
    d_sae: usize,
    batch: usize,
    k: usize,
    steps: usize,
) -> Result<StepReport> {
    bench_step_with(cases, d_in, d_sae, batch, k, steps, StepBenchOptions::default())
}

/// [`bench_step`] with dead latents and a choice of products.
pub fn bench_step_with(
    cases: &[Case],
    d_in: usize,
    d_sae: usize,
    batch: usize,
    k: usize,
    steps: usize,
    opts: StepBenchOptions,
) -> Result<StepReport> {
    anyhow::ensure!(steps >= 1, "bench step: --steps must be at least 1 (got 0)");
    let mut probe = GemmProbe::new(d_in, d_sae, batch);
    let threads = rayon::current_num_threads();
    let flops = 2.0 * batch as f64 * d_in as f64 * d_sae as f64;
    let fma_peak = peak::measure();
    let mut rows = vec![];
    for case in cases {
        let mut cfg = bench_config(case, d_in, d_sae, batch, k);
        cfg.dense_codes = opts.dense_codes;
        let dead = dead_latents(d_sae, opts.dead_fraction);
        let mut name = case.name.to_string();
        if !dead.is_empty() {
            if cfg.aux_kinds().is_empty() {
                cfg.aux = Some(vec![AuxKind::AuxK]);
            }
            name = format!("{name} +aux");
        }
        let (mut be, mut src) = bench_setup(&cfg)?;
        let batches: Vec<Batch> = (0..steps + 1).map(|_| src.next_batch()).collect::<Result<_>>()?;
        be.mark_dead(&dead);
        be.step(&batches[0], 1e-4)?;
        be.take_phase_times();
        let (mut step_s, mut gemm_s, mut ratios) = (vec![], vec![], vec![]);
        let mut l0 = 0.0;
        for b in &batches[1..] {
            let g = probe.time();
            be.mark_dead(&dead);
            let t = Instant::now();
            l0 += be.step(b, 1e-4)?.l0;
            let s = t.elapsed().as_secs_f64();
            step_s.push(s);
            gemm_s.push(g);
            ratios.push(s / g);
        }
        // Medians: one slow step on a shared machine does not move them.
        let (per_step, gemm) = (median(&step_s), median(&gemm_s));
        let mut row = StepRow::new(&name, batch, steps, per_step, gemm, &be.take_phase_times(), l0);
        row.step_over_gemm = median(&ratios);
        let shape = traffic::StepShape { d_in, d_sae, batch, nnz: row.l0 * batch as f64, aux: !dead.is_empty() };
        row.traffic = Some(traffic::PhaseTraffic::new(&shape, &row.phases_ms));
        rows.push(row);
    }
    // Measured again at the end, and the larger kept: any measured rate is at most the peak, and
    // on a shared VM one measurement can land while the cores run at half speed (a GEMM at 174%
    // of a peak measured at the start, 2026-12-04).
    let fma_peak = peak::larger(fma_peak, peak::measure());
    let gemm_s = median(&probe.times);
    Ok(StepReport {
        d_in,
        d_sae,
        batch,
        k,
        threads,
        gemm_ms: gemm_s * 1e3,
        gemm_gflops: flops / gemm_s / 1e9,
        gemm_frac_peak: fma_peak.as_ref().map(|p| flops / gemm_s / 1e9 / p.gflops),
        fma_peak,
        cpu_share: probe.cpu_share(),
        read_gb_per_s: read_bandwidth(),
        rows,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct SelectRow {
    pub backend: String,
    pub sparsifier: String,
    pub batch: usize,
    pub d_sae: usize,
    pub k: usize,
    pub ms: f64,
    /// Bytes of `pre` scanned per second.
    pub gb_per_s: f64,
    /// gb_per_s / measured memory read bandwidth.
    pub frac_bandwidth: f64,
}

impl StepRow {
    /// A row from `steps` timed steps of `batch` tokens: seconds per step, the encoder product's
    /// seconds, the phase seconds summed over the steps and the L0 summed over them.
    pub fn new(
        name: &str,
        batch: usize,
        steps: usize,
        per_step: f64,
        gemm_s: f64,
        phases: &PhaseTimes,
        l0_sum: f64,
    ) -> Self {
        let ms = |v: f64| v * 1e3 / steps as f64;
        let phases_ms = PhaseTimes {
            encode: ms(phases.encode),
            select: ms(phases.select),
            decode: ms(phases.decode),
            backward: ms(phases.backward),
            optimizer: ms(phases.optimizer),
        };
        StepRow {
            sparsifier: name.to_string(),
            step_ms: per_step * 1e3,
            tokens_per_s: batch as f64 / per_step,
            gemm_ms: gemm_s * 1e3,
            step_over_gemm: per_step / gemm_s,
            phases_over_gemm: phase_fractions(&phases_ms, gemm_s * 1e3),
            phases_ms,
            l0: l0_sum / steps as f64,
            traffic: None,
        }
    }
}

/// Measured memory read bandwidth (GB/s): parallel sum over a buffer far larger than cache.
pub fn read_bandwidth() -> f64 {
    let buf = vec![1.0f32; 64 << 20]; // 256 MB
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        // 16 independent sums per chunk: one add chain would measure the add latency instead.
        let s: f32 = buf.par_chunks(1 << 16).map(lane_sum).sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (buf.len() * 4) as f64 / best / 1e9
}

/// Sum of `c` in 16 lanes (vectorises; the order is fixed).
fn lane_sum(c: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = c.chunks_exact(16);
    for ch in it.by_ref() {
        for l in 0..16 {
            acc[l] += ch[l];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

/// Time every sparsifier's selection on the CPU over a grid of shapes.
pub fn bench_sparsifiers(batches: &[usize], d_saes: &[usize], ks: &[usize], reps: usize) -> Vec<SelectRow> {
    let bw = read_bandwidth();
    let mut rows = vec![];
    for &b in batches {
        for &f in d_saes {
            let pre = random(b * f, (b * 31 + f) as u64);
            for &k in ks {
                for sc in selection_cases(b, f, k) {
                    if !sc.uses_k() && k != ks[0] {
                        continue; // k does not change them
                    }
                    let theta = vec![1.5f32; f];
                    let sel = sc.selection(&theta);
                    let name = sc.name.as_str();
                    let t = (0..reps.max(1))
                        .map(|_| {
                            let t = Instant::now();
                            std::hint::black_box(sparsify::select(&pre, b, f, &sel));
                            t.elapsed().as_secs_f64()
                        })
                        .fold(f64::INFINITY, f64::min);
                    let gbps = (b * f * 4) as f64 / t / 1e9;
                    rows.push(SelectRow {
                        backend: "cpu".into(),
                        sparsifier: name.into(),
                        batch: b,
                        d_sae: f,
                        k,
                        ms: t * 1e3,
                        gb_per_s: gbps,
                        frac_bandwidth: gbps / bw,
                    });
                }
            }
        }
    }
    rows
}

/// One selection to bench at a shape: a case's training rule with its budgets resolved (and
/// "jumprelu", the exported form of the batch-dependent ones).
pub struct SelectionCase {
    pub name: String,
    cfg: TrainConfig,
    m: Vec<usize>,
}

impl SelectionCase {
    /// The rule (jumprelu reads `theta`).
    pub fn selection<'a>(&'a self, theta: &'a [f32]) -> sparsify::Selection<'a> {
        plan::training(&self.cfg, &self.m, theta)
    }
    /// Whether the rule's result depends on k.
    pub fn uses_k(&self) -> bool {
        !matches!(self.cfg.sparsifier, SparsifierKind::Relu | SparsifierKind::Jumprelu)
    }
}

/// Every case of the table at batch `b`, `f` latents and `k` per token (feature-choice rate
/// k / f), then jumprelu.
pub fn selection_cases(b: usize, f: usize, k: usize) -> Vec<SelectionCase> {
    let jumprelu = Case { name: "jumprelu", kind: SparsifierKind::Jumprelu, budget: sparsify::BudgetKind::Uniform };
    sparsify::cases::CASES
        .iter()
        .chain(std::iter::once(&jumprelu))
        .map(|case| {
            let cfg = bench_config(case, 1, f, b, k);
            let m = plan::budgets(&cfg, &vec![0.0; f], b, 0);
            SelectionCase { name: case.name.to_string(), cfg, m }
        })
        .collect()
}

/// Fixed-seed standard normal values.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_row_arithmetic() {
        // 4 steps of 1000 tokens at 0.2 s each, GEMM 0.1 s; phases summed over the 4 steps.
        let phases = PhaseTimes { encode: 0.48, select: 0.08, decode: 0.12, backward: 0.1, optimizer: 0.02 };
        let r = StepRow::new("topk", 1000, 4, 0.2, 0.1, &phases, 128.0);
        assert!((r.step_ms - 200.0).abs() < 1e-9);
        assert!((r.tokens_per_s - 5000.0).abs() < 1e-9);
        assert!((r.step_over_gemm - 2.0).abs() < 1e-12);
        assert!((r.l0 - 32.0).abs() < 1e-12);
        // Per step: encode 120 ms, select 20, decode 30, backward 25, adam 5 of a 100 ms GEMM.
        let want = PhaseTimes { encode: 1.2, select: 0.2, decode: 0.3, backward: 0.25, optimizer: 0.05 };
        for (got, want) in [
            (r.phases_over_gemm.encode, want.encode),
            (r.phases_over_gemm.select, want.select),
            (r.phases_over_gemm.decode, want.decode),
            (r.phases_over_gemm.backward, want.backward),
            (r.phases_over_gemm.optimizer, want.optimizer),
        ] {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        assert!((r.phases_ms.encode - 120.0).abs() < 1e-9);
        assert!((phase_fractions(&r.phases_ms, r.gemm_ms).total() - r.phases_over_gemm.total()).abs() < 1e-12);
    }

    #[test]
    fn gemm_probe_records_every_product() {
        let mut p = GemmProbe::new(7, 33, 5);
        let t = p.time();
        p.time();
        assert_eq!(p.times.len(), 2);
        assert_eq!(p.times[0], t);
        assert!(t > 0.0 && p.cpu_share().is_finite());
        // The product itself: pre = x w^T.
        let want: f64 = (0..7).map(|j| p.x[7 + j] as f64 * p.w[2 * 7 + j] as f64).sum();
        assert!((p.pre[33 + 2] as f64 - want).abs() < 1e-5, "{} vs {want}", p.pre[33 + 2]);
    }

    #[test]
    fn cpu_step_report_has_peak_fraction() {
        let r = bench_step(&crate::sparsify::cases::CASES[..1], 16, 64, 32, 4, 1).unwrap();
        let row = &r.rows[0];
        // Phases against the row's own GEMM; with one timed step, the paired ratio is that
        // step over the product timed just before it, and the report's GEMM is that product.
        assert!((row.phases_over_gemm.select - row.phases_ms.select / row.gemm_ms).abs() < 1e-9);
        assert!((row.step_over_gemm - row.step_ms / row.gemm_ms).abs() < 1e-9);
        assert_eq!(r.gemm_ms, row.gemm_ms);
        if let (Some(p), Some(f)) = (&r.fma_peak, r.gemm_frac_peak) {
            assert!((f - r.gemm_gflops / p.gflops).abs() < 1e-12);
            assert!(f > 0.0);
        }
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["rows"][0]["phases_over_gemm"]["encode"].is_number());
        assert!(json.get("gemm_frac_peak").is_some() && json.get("fma_peak").is_some());
        // Each phase's modelled traffic at the row's L0, as GB/s of its measured time.
        let t = row.traffic.as_ref().expect("the CPU bench models traffic");
        let shape = traffic::StepShape { d_in: 16, d_sae: 64, batch: 32, nnz: row.l0 * 32.0, aux: false };
        assert_eq!(t.bytes.decode, traffic::step_bytes(&shape).decode);
        assert!((t.gb_per_s.decode - t.bytes.decode / (row.phases_ms.decode * 1e-3) / 1e9).abs() < 1e-6);
        assert!(json["rows"][0]["traffic"]["gb_per_s"]["optimizer"].is_number());
        assert!(r.read_gb_per_s > 0.0);
        // A share, but measured from the OS's CPU-time clock over a product of microseconds at
        // this shape, so only its sign is reliable here (it read 3.5 once in CI).
        assert!(r.cpu_share.is_finite() && r.cpu_share >= 0.0, "{}", r.cpu_share);
    }
}
