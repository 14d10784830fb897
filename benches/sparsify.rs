//! Sparsifier throughput at the target shape (B=4096 tokens, F=4608 latents, k=32) on 2 threads.
//! Throughput is bytes of `pre` scanned per selection.
//!
//! `cargo bench --bench sparsify`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use saetrain::sparsify::{self, Selection};
use std::hint::black_box;
use std::time::Duration;

const B: usize = 4096;
const F: usize = 4608;
const K: usize = 32;

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let pre: Vec<f32> = (0..B * F).map(|_| StandardNormal.sample(&mut rng)).collect();
    let m = vec![B * K / F; F];
    let theta = vec![2.0f32; F];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let variants: Vec<(&str, Selection)> = vec![
        ("topk", Selection::TopK { k: K }),
        ("batchtopk", Selection::BatchTopK { k: K }),
        ("wta", Selection::Wta { m: &m }),
        ("hybrid", Selection::Hybrid { m: &m, k_max: 2 * K }),
        ("relu", Selection::Relu),
        ("jumprelu", Selection::JumpRelu { theta: &theta }),
    ];
    let mut g = c.benchmark_group("sparsify");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes((B * F * 4) as u64));
    for (name, sel) in &variants {
        g.bench_with_input(BenchmarkId::new(*name, format!("{B}x{F}")), sel, |bch, sel| {
            bch.iter(|| pool.install(|| black_box(sparsify::select(black_box(&pre), B, F, sel))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
