//! Training step per sparsifier at d_in=576, d_sae=4608, batch 4096, k=32 (wta rate 32/4608),
//! next to the encoder GEMM alone: the step/GEMM ratio is the number to watch.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use saetrain::backend::Backend;
use saetrain::bench::{bench_config, bench_setup, time_gemm};
use saetrain::data::BatchSource;
use saetrain::sparsify::cases::CASES;
use std::time::Duration;

const D_IN: usize = 576;
const D_SAE: usize = 4608;
const BATCH: usize = 4096;
const K: usize = 32;

fn train_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("encoder_gemm", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| Duration::from_secs_f64(time_gemm(D_IN, D_SAE, BATCH, 1))).sum())
    });
    for case in CASES {
        let cfg = bench_config(case, D_IN, D_SAE, BATCH, K);
        let (mut be, mut src) = bench_setup(&cfg).expect("bench setup");
        let batch = src.next_batch().expect("batch");
        g.bench_function(case.name, |b| b.iter(|| be.step(&batch, 1e-4).expect("step")));
    }
    g.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
