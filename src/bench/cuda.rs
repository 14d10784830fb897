//! The CUDA side of `sae bench step` and `sae bench sparsifiers` (and the emulator, where the
//! numbers only show that the plumbing works: an emulated kernel's time means nothing).
//!
//! References, as on the CPU: a step against the encoder product alone (per encoder: cuBLAS at
//! the configured precision, and the hand-written fused kernel) with its TFLOP/s, and selection
//! as GB/s of `pre` read per second against the device's measured copy bandwidth.

use super::{bench_config, random, selection_cases, SelectRow, StepRow};
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::device::Dev;
use crate::backend::cuda::kernels as K;
use crate::backend::cuda::launch as L;
use crate::backend::cuda::select::select;
use crate::backend::cuda::selftest::Target;
use crate::backend::cuda::workspace::{Dims, Ws};
use crate::backend::Backend;
use crate::config::{EncoderKind, Precision};
use crate::data::synthetic::{SynthSpec, Synthetic};
use crate::data::{Batch, BatchSource};
use crate::model::{init, Shape, TrainState};
use crate::sparsify::cases::Case;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

/// The device to bench on (the GPU, or the emulator for tests).
pub fn open(target: Target) -> Result<Dev> {
    match target {
        Target::Gpu => {
            crate::backend::cuda::probe()?;
            Dev::open()
        }
        Target::Emulator => Dev::open_emulator(),
    }
}

/// Device copy bandwidth in GB/s (bytes read + written per second) over `n` floats: the
/// reference for every memory-bound kernel.
pub fn copy_bandwidth(dev: &Dev, n: usize) -> Result<f64> {
    let (src, dst, zero) = (dev.alloc_f32(n)?, dev.alloc_f32(n)?, dev.alloc_f32(1)?);
    // `center` with d = 1 is a copy: out[i] = x[i] - 0.
    let copy = || K::center(dev, L::elementwise(n as u64), src.p(), zero.p(), dst.p(), 1, n as u64);
    copy()?;
    dev.sync()?;
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        copy()?;
    }
    dev.sync()?;
    Ok((8 * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

#[derive(Clone, Debug, Serialize)]
pub struct EncoderTiming {
    pub encoder: String,
    pub ms: f64,
    pub tflops: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CudaStepRow {
    pub encoder: String,
    #[serde(flatten)]
    pub row: StepRow,
}

#[derive(Clone, Debug, Serialize)]
pub struct CudaStepReport {
    pub device: String,
    pub d_in: usize,
    pub d_sae: usize,
    pub batch: usize,
    pub k: usize,
    pub precision: Precision,
    pub encoders: Vec<EncoderTiming>,
    pub rows: Vec<CudaStepRow>,
}

fn batches(d_in: usize, batch: usize, n: usize) -> Result<Vec<Batch>> {
    let spec = SynthSpec { d_in, n_features: 4 * d_in, mean_active: 20.0, zipf: 1.0, noise: 0.01, seed: 7 };
    let mut src = Synthetic::new(spec, batch)?;
    (0..n).map(|_| src.next_batch()).collect()
}

/// Whole steps per sparsifier and encoder, with phases, against the encoder product alone.
#[allow(clippy::too_many_arguments)]
pub fn bench_step(
    target: Target,
    cases: &[Case],
    d_in: usize,
    d_sae: usize,
    batch: usize,
    k: usize,
    steps: usize,
    precision: Precision,
) -> Result<CudaStepReport> {
    let probe = open(target)?;
    let device = probe.name.clone();
    let encoders: Vec<EncoderKind> =
        if probe.blas.is_some() { vec![EncoderKind::Cublas, EncoderKind::Fused] } else { vec![EncoderKind::Fused] };
    drop(probe);
    let data = batches(d_in, batch, steps + 1)?;
    let flops = 2.0 * batch as f64 * d_in as f64 * d_sae as f64;
    let mut report = CudaStepReport { device, d_in, d_sae, batch, k, precision, encoders: vec![], rows: vec![] };
    for &enc in &encoders {
        let name = match enc {
            EncoderKind::Cublas => format!("cublas {precision:?}").to_lowercase(),
            EncoderKind::Fused => "fused f32".to_string(),
        };
        for (i, case) in cases.iter().enumerate() {
            let mut cfg = bench_config(case, d_in, d_sae, batch, k);
            cfg.encoder = enc;
            cfg.precision = precision;
            let mut params = init::tied(Shape::new(d_in, d_sae), 1, false);
            params.parts_mut().b_dec.copy_from_slice(&init::mean_rows(&data[0].to_f32(), d_in));
            let mut be = CudaBackend::on(open(target)?, cfg, TrainState::new(params))?;
            // Each row against its own encoder product, timed before and after its steps (the
            // faster of the two: the clocks may still be rising at the first): the fused
            // encoder's epilogue depends on the rule (batchtopk's histogram), and one timing for
            // every case would compare later cases against a product of another rule and moment.
            let before = be.time_encoder(&data[0], 5)?;
            be.step(&data[0], 1e-4)?; // warm-up
            let t = Instant::now();
            let mut l0 = 0.0;
            for b in &data[1..] {
                l0 += be.step(b, 1e-4)?.l0;
            }
            let per_step = t.elapsed().as_secs_f64() / steps as f64;
            let g = before.min(be.time_encoder(&data[0], 5)?);
            if i == 0 {
                report.encoders.push(EncoderTiming { encoder: name.clone(), ms: g * 1e3, tflops: flops / g / 1e12 });
            }
            // Phases in a second pass: timing them synchronises the device between phases.
            be.time_phases(true);
            for b in &data[1..] {
                be.step(b, 1e-4)?;
            }
            let row = StepRow::new(case.name, batch, steps, per_step, g, &be.take_phase_times(), l0);
            report.rows.push(CudaStepRow { encoder: name.clone(), row });
        }
    }
    Ok(report)
}

/// Selection alone on the device for every sparsifier over a grid of shapes.
pub fn bench_sparsifiers(
    target: Target,
    batches: &[usize],
    d_saes: &[usize],
    ks: &[usize],
    reps: usize,
) -> Result<Vec<SelectRow>> {
    let dev = open(target)?;
    let backend = if target == Target::Gpu { "cuda" } else { "cuda-emu" };
    let largest = batches.iter().max().unwrap_or(&1) * d_saes.iter().max().unwrap_or(&1);
    // On a GPU, 256 MB per buffer is far past every cache.
    let bw = copy_bandwidth(&dev, if target == Target::Gpu { largest.max(64 << 20) } else { largest })?;
    let mut rows = vec![];
    for &b in batches {
        for &f in d_saes {
            let pre = random(b * f, (b * 31 + f) as u64);
            let k_max = ks.iter().copied().max().unwrap_or(1);
            let mut ws = Ws::new(&dev, Dims::new(Shape::new(1, f), b, k_max, false, Precision::F32))?;
            ws.b.pre.upload(&pre)?;
            let theta = vec![1.5f32; f];
            for &k in ks {
                for sc in selection_cases(b, f, k) {
                    if !sc.uses_k() && k != ks[0] {
                        continue; // k does not change them
                    }
                    let sel = sc.selection(&theta);
                    let name = sc.name.as_str();
                    select(&dev, &mut ws, &sel, false)?; // warm-up (and code buffer sizing)
                    dev.sync()?;
                    let t = Instant::now();
                    for _ in 0..reps.max(1) {
                        select(&dev, &mut ws, &sel, false)?;
                    }
                    dev.sync()?;
                    let s = t.elapsed().as_secs_f64() / reps.max(1) as f64;
                    let gbps = (b * f * 4) as f64 / s / 1e9;
                    rows.push(SelectRow {
                        backend: backend.into(),
                        sparsifier: name.into(),
                        batch: b,
                        d_sae: f,
                        k,
                        ms: s * 1e3,
                        gb_per_s: gbps,
                        frac_bandwidth: gbps / bw,
                    });
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The emulator cannot say anything about speed; these check that the GPU benches run end to
    // end and report sane rows, so the first GPU session gets numbers rather than a crash.
    #[test]
    fn step_bench_runs_on_the_emulator() {
        let cases = &crate::sparsify::cases::CASES[..2];
        let r = bench_step(Target::Emulator, cases, 20, 70, 40, 4, 1, Precision::F32).unwrap();
        assert_eq!(r.encoders.len(), 1);
        assert_eq!(r.rows.len(), 2);
        for row in &r.rows {
            assert!(row.row.step_ms > 0.0 && row.row.phases_ms.total() > 0.0, "{row:?}");
            // Each row against its own encoder product.
            let ratio = row.row.step_ms / row.row.gemm_ms;
            assert!(row.row.gemm_ms > 0.0 && (row.row.step_over_gemm - ratio).abs() < 1e-9 * ratio, "{row:?}");
            assert!((row.row.l0 - 4.0).abs() < 1e-9, "{row:?}");
        }
    }

    #[test]
    fn sparsifier_bench_runs_on_the_emulator() {
        let rows = bench_sparsifiers(Target::Emulator, &[30], &[50], &[3], 1).unwrap();
        // Every case of the table, plus jumprelu.
        assert_eq!(rows.len(), crate::sparsify::cases::CASES.len() + 1);
        assert!(rows.iter().all(|r| r.ms > 0.0 && r.frac_bandwidth > 0.0));
    }
}
