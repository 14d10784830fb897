//! Shard-reader throughput from the page cache, shuffling on (chunk order + 64k-row window),
//! f32 and f16 shards, f32 batches (CPU backend) and raw half batches (keep_half).
//! `cargo bench --bench loader`. Quick settings for a 2-core CI machine.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use saetrain::data::format::{write_npy, Dtype};
use saetrain::data::{BatchSource, ShardOptions, ShardSource};
use std::time::Duration;

const ROWS_PER_SHARD: usize = 16_384;
const SHARDS: usize = 4;
const D: usize = 512;
const BATCH: usize = 4096;

fn make(dir: &std::path::Path, dtype: Dtype) {
    let x: Vec<f32> = (0..ROWS_PER_SHARD * D).map(|i| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0).collect();
    for s in 0..SHARDS {
        write_npy(&dir.join(format!("acts_{s:05}.npy")), dtype, ROWS_PER_SHARD, D, &x).unwrap();
    }
}

fn loader(c: &mut Criterion) {
    for (dtype, keep_half) in [(Dtype::Float32, false), (Dtype::Float16, false), (Dtype::Float16, true)] {
        let dir = tempfile::tempdir().unwrap();
        make(dir.path(), dtype);
        let opts = ShardOptions { batch_size: BATCH, eval_tokens: 0, keep_half, ..Default::default() };
        let mut src = ShardSource::open(dir.path(), opts).unwrap();
        for _ in 0..(SHARDS * ROWS_PER_SHARD / BATCH) {
            src.next_batch().unwrap(); // warm the page cache
        }
        let name = format!("{dtype}{}", if keep_half { "_keep_half" } else { "_to_f32" });
        let mut g = c.benchmark_group("loader_bytes");
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        g.throughput(Throughput::Bytes((BATCH * D * dtype.size()) as u64));
        g.bench_function(&name, |b| b.iter(|| src.next_batch().unwrap()));
        g.finish();
        let mut g = c.benchmark_group("loader_rows");
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function(&name, |b| b.iter(|| src.next_batch().unwrap()));
        g.finish();
    }
}

criterion_group!(benches, loader);
criterion_main!(benches);
