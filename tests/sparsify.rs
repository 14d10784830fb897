//! Sparsifiers against a plain oracle (full sort by value desc, index asc), on awkward shapes,
//! deliberate ties, all-negative rows and columns, zeros, NaN and infinities; budgets and
//! thresholds on hand-computed examples.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use saetrain::sparse::SparseCodes;
use saetrain::sparsify::{self, budget, threshold, Selection};
use std::cmp::Ordering;

/// Kept entries as (row, col, value bits), sorted by (row, col).
type Set = Vec<(usize, usize, u32)>;

/// Oracle order: larger value first, then lower index.
fn by_value_then_index(a: &(f32, usize), b: &(f32, usize)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1))
}

fn positive(v: f32) -> bool {
    v > 0.0 // NaN is not positive
}

fn top_n(mut c: Vec<(f32, usize)>, n: usize) -> Vec<(f32, usize)> {
    c.sort_by(by_value_then_index);
    c.truncate(n);
    c
}

fn oracle_topk(pre: &[f32], rows: usize, cols: usize, k: usize) -> Set {
    let mut out = vec![];
    for b in 0..rows {
        let cand = (0..cols).map(|i| (pre[b * cols + i], i)).filter(|e| positive(e.0)).collect();
        out.extend(top_n(cand, k).into_iter().map(|(v, i)| (b, i, v.to_bits())));
    }
    out.sort();
    out
}

fn oracle_batchtopk(pre: &[f32], rows: usize, cols: usize, k: usize) -> Set {
    let cand = pre.iter().enumerate().map(|(f, &v)| (v, f)).filter(|e| positive(e.0)).collect();
    let mut out: Set = top_n(cand, k * rows).into_iter().map(|(v, f)| (f / cols, f % cols, v.to_bits())).collect();
    out.sort();
    out
}

fn oracle_wta(pre: &[f32], rows: usize, cols: usize, m: &[usize]) -> Set {
    let mut out = vec![];
    for j in 0..cols {
        let cand = (0..rows).map(|b| (pre[b * cols + j], b)).filter(|e| positive(e.0)).collect();
        out.extend(top_n(cand, m[j]).into_iter().map(|(v, b)| (b, j, v.to_bits())));
    }
    out.sort();
    out
}

fn oracle_cap(set: &Set, rows: usize, k_max: usize) -> Set {
    let mut out = vec![];
    for b in 0..rows {
        let cand = set.iter().filter(|e| e.0 == b).map(|e| (f32::from_bits(e.2), e.1)).collect();
        out.extend(top_n(cand, k_max).into_iter().map(|(v, i)| (b, i, v.to_bits())));
    }
    out.sort();
    out
}

fn oracle_mask(pre: &[f32], rows: usize, cols: usize, theta: Option<&[f32]>) -> Set {
    let mut out = vec![];
    for b in 0..rows {
        for i in 0..cols {
            let v = pre[b * cols + i];
            if positive(v) && theta.is_none_or(|t| v > t[i]) {
                out.push((b, i, v.to_bits()));
            }
        }
    }
    out
}

/// Check the CSR invariants and return the kept set.
fn as_set(c: &SparseCodes, pre: &[f32], rows: usize, cols: usize) -> Set {
    assert_eq!((c.rows, c.cols), (rows, cols));
    assert_eq!(c.row_ptr.len(), rows + 1);
    assert_eq!(c.row_ptr[0], 0);
    assert_eq!(c.row_ptr[rows], c.idx.len());
    assert_eq!(c.idx.len(), c.val.len());
    let mut out = vec![];
    for b in 0..rows {
        assert!(c.row_ptr[b] <= c.row_ptr[b + 1]);
        let (ix, vs) = c.row(b);
        assert!(ix.windows(2).all(|w| w[0] < w[1]), "row {b}: latent indices not ascending: {ix:?}");
        for (&i, &v) in ix.iter().zip(vs) {
            assert!((i as usize) < cols);
            assert!(v > 0.0, "kept a non-positive value {v}");
            assert_eq!(v.to_bits(), pre[b * cols + i as usize].to_bits(), "kept value is not pre");
            out.push((b, i as usize, v.to_bits()));
        }
    }
    out
}

/// Input generators: normal, heavy ties, and the awkward special values.
fn gen(rng: &mut ChaCha8Rng, rows: usize, cols: usize, kind: usize) -> Vec<f32> {
    let ties = [0.5f32, 1.0, 1.5, -1.0, 0.0];
    let mut pre: Vec<f32> = (0..rows * cols)
        .map(|_| match kind {
            0 => StandardNormal.sample(rng),
            1 => ties[rng.random_range(0..ties.len())],
            2 => [0.5f32, 1.0, 1.5][rng.random_range(0..3)],
            3 => 1.0 + rng.random_range(0..8) as f32 * 1e-7, // many values in one histogram bucket
            _ => match rng.random_range(0..12) {
                0 => f32::NAN,
                1 => -f32::NAN,
                2 => f32::INFINITY,
                3 => f32::NEG_INFINITY,
                4 => -0.0,
                5 => 0.0,
                6 => f32::from_bits(rng.random_range(1..100)), // positive subnormal
                7 => f32::MIN_POSITIVE,
                _ => ties[rng.random_range(0..ties.len())],
            },
        })
        .collect();
    // An all-negative row and an all-negative column (when there is room).
    if rows > 2 {
        let b = rng.random_range(0..rows);
        pre[b * cols..(b + 1) * cols].iter_mut().for_each(|v| *v = -v.abs() - 0.25);
    }
    if cols > 2 {
        let j = rng.random_range(0..cols);
        (0..rows).for_each(|b| pre[b * cols + j] = -1.0);
    }
    pre
}

const SHAPES: &[(usize, usize)] =
    &[(1, 1), (1, 7), (3, 5), (7, 33), (37, 29), (5, 70), (50, 70), (100, 31), (129, 200), (17, 300), (300, 17)];

fn sizes_k(cols: usize) -> Vec<usize> {
    vec![0, 1, 2, 3, 7, 32, cols.saturating_sub(1), cols, cols + 5]
}

#[test]
fn topk_matches_oracle() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for &(rows, cols) in SHAPES {
        for kind in 0..5 {
            let pre = gen(&mut rng, rows, cols, kind);
            for k in sizes_k(cols) {
                let got = as_set(&sparsify::select(&pre, rows, cols, &Selection::TopK { k }), &pre, rows, cols);
                assert_eq!(got, oracle_topk(&pre, rows, cols, k), "topk rows={rows} cols={cols} k={k} kind={kind}");
            }
        }
    }
}

#[test]
fn batchtopk_matches_oracle() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for &(rows, cols) in SHAPES {
        for kind in 0..5 {
            let pre = gen(&mut rng, rows, cols, kind);
            for k in sizes_k(cols) {
                let got = as_set(&sparsify::select(&pre, rows, cols, &Selection::BatchTopK { k }), &pre, rows, cols);
                let want = oracle_batchtopk(&pre, rows, cols, k);
                assert_eq!(got, want, "batchtopk rows={rows} cols={cols} k={k} kind={kind}");
            }
        }
    }
}

fn budgets(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<Vec<usize>> {
    let mut out = vec![vec![0; cols], vec![1; cols], vec![3; cols], vec![rows; cols], vec![rows + 3; cols]];
    out.push((0..cols).map(|_| rng.random_range(0..=rows + 3)).collect());
    out.push((0..cols).map(|_| rng.random_range(0..=4)).collect());
    out
}

#[test]
fn wta_matches_oracle() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for &(rows, cols) in SHAPES {
        for kind in 0..5 {
            let pre = gen(&mut rng, rows, cols, kind);
            for m in budgets(&mut rng, rows, cols) {
                let got = as_set(&sparsify::select(&pre, rows, cols, &Selection::Wta { m: &m }), &pre, rows, cols);
                assert_eq!(got, oracle_wta(&pre, rows, cols, &m), "wta rows={rows} cols={cols} m={m:?} kind={kind}");
            }
        }
    }
}

#[test]
fn hybrid_matches_oracle() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for &(rows, cols) in SHAPES {
        for kind in 0..5 {
            let pre = gen(&mut rng, rows, cols, kind);
            for m in budgets(&mut rng, rows, cols) {
                for k_max in [0, 1, 2, 5, cols + 1] {
                    let sel = Selection::Hybrid { m: &m, k_max };
                    let got = as_set(&sparsify::select(&pre, rows, cols, &sel), &pre, rows, cols);
                    let want = oracle_cap(&oracle_wta(&pre, rows, cols, &m), rows, k_max);
                    assert_eq!(got, want, "hybrid rows={rows} cols={cols} k_max={k_max} kind={kind}");
                }
            }
        }
    }
}

#[test]
fn relu_and_jumprelu_match_oracle() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for &(rows, cols) in SHAPES {
        for kind in 0..5 {
            let pre = gen(&mut rng, rows, cols, kind);
            let got = as_set(&sparsify::select(&pre, rows, cols, &Selection::Relu), &pre, rows, cols);
            assert_eq!(got, oracle_mask(&pre, rows, cols, None), "relu rows={rows} cols={cols}");
            let special = [f32::NAN, -1.0, 0.0, 1.0, 0.75, f32::INFINITY, -0.0];
            let theta: Vec<f32> = (0..cols).map(|_| special[rng.random_range(0..special.len())]).collect();
            let sel = Selection::JumpRelu { theta: &theta };
            let got = as_set(&sparsify::select(&pre, rows, cols, &sel), &pre, rows, cols);
            assert_eq!(got, oracle_mask(&pre, rows, cols, Some(&theta)), "jumprelu rows={rows} cols={cols}");
            // High thresholds: few entries kept (the one-pass path).
            let theta: Vec<f32> = (0..cols).map(|j| [1.2f32, 2.0, 1.0, f32::NAN][j % 4]).collect();
            let sel = Selection::JumpRelu { theta: &theta };
            let got = as_set(&sparsify::select(&pre, rows, cols, &sel), &pre, rows, cols);
            assert_eq!(got, oracle_mask(&pre, rows, cols, Some(&theta)), "jumprelu high rows={rows} cols={cols}");
        }
    }
}

/// Larger inputs that exercise the streaming filters' compaction and the histogram buckets.
#[test]
fn larger_shapes_match_oracle() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for &(rows, cols, k) in &[(257, 1000, 32), (1000, 130, 5), (96, 2049, 64)] {
        for kind in [0, 2, 3] {
            let pre = gen(&mut rng, rows, cols, kind);
            let got = as_set(&sparsify::select(&pre, rows, cols, &Selection::TopK { k }), &pre, rows, cols);
            assert_eq!(got, oracle_topk(&pre, rows, cols, k), "topk {rows}x{cols} kind={kind}");
            let got = as_set(&sparsify::select(&pre, rows, cols, &Selection::BatchTopK { k }), &pre, rows, cols);
            assert_eq!(got, oracle_batchtopk(&pre, rows, cols, k), "batchtopk {rows}x{cols} kind={kind}");
            let m: Vec<usize> = (0..cols).map(|j| [rows * k / cols, 1, 0, 7, rows][j % 5]).collect();
            let got = as_set(&sparsify::select(&pre, rows, cols, &Selection::Wta { m: &m }), &pre, rows, cols);
            let want = oracle_wta(&pre, rows, cols, &m);
            assert_eq!(got, want, "wta {rows}x{cols} kind={kind}");
            let sel = Selection::Hybrid { m: &m, k_max: k / 2 };
            let got = as_set(&sparsify::select(&pre, rows, cols, &sel), &pre, rows, cols);
            assert_eq!(got, oracle_cap(&want, rows, k / 2), "hybrid {rows}x{cols} kind={kind}");
        }
    }
}

#[test]
fn explicit_ties_lower_index_wins() {
    // One row, equal values: topk keeps the lowest latent indices.
    let pre = [1.0f32, 2.0, 1.0, 2.0, 1.0, -3.0, 2.0];
    let c = sparsify::select(&pre, 1, 7, &Selection::TopK { k: 2 });
    assert_eq!((c.idx.clone(), c.val.clone()), (vec![1, 3], vec![2.0, 2.0]));
    let c = sparsify::select(&pre, 1, 7, &Selection::TopK { k: 4 });
    assert_eq!(c.idx, vec![0, 1, 3, 6]);
    // k beyond the positives: only the positives.
    let c = sparsify::select(&pre, 1, 7, &Selection::TopK { k: 10 });
    assert_eq!(c.idx, vec![0, 1, 2, 3, 4, 6]);
    // batchtopk (2 x 3, k = 1 -> 2 kept): ties by flat index.
    let pre = [1.0f32, 0.5, 1.0, 1.0, 1.0, 0.5];
    let c = sparsify::select(&pre, 2, 3, &Selection::BatchTopK { k: 1 });
    assert_eq!((c.row_ptr.clone(), c.idx.clone()), (vec![0, 2, 2], vec![0, 2]));
    // wta (column of 4 tokens, m = 2): ties by token index.
    let pre = [0.5f32, 1.0, 1.0, 1.0];
    let c = sparsify::select(&pre, 4, 1, &Selection::Wta { m: &[2] });
    assert_eq!(c.row_ptr, vec![0, 0, 1, 2, 2]);
    // Nothing positive: nothing kept, whatever the budget.
    let pre = [-1.0f32, 0.0, f32::NAN, -0.0];
    for sel in [Selection::TopK { k: 3 }, Selection::BatchTopK { k: 3 }, Selection::Wta { m: &[4, 4] }, Selection::Relu]
    {
        assert_eq!(sparsify::select(&pre, 2, 2, &sel).nnz(), 0, "{sel:?}");
    }
}

#[test]
fn deterministic_across_thread_counts() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (rows, cols, k) = (300, 777, 16);
    let pre = gen(&mut rng, rows, cols, 1);
    let m: Vec<usize> = (0..cols).map(|j| j % 40).collect();
    let sels = [
        Selection::TopK { k },
        Selection::BatchTopK { k },
        Selection::Wta { m: &m },
        Selection::Hybrid { m: &m, k_max: 9 },
        Selection::Relu,
    ];
    let run = |threads: usize| -> Vec<SparseCodes> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| sels.iter().map(|s| sparsify::select(&pre, rows, cols, s)).collect())
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(5));
}

#[test]
fn cap_rows_keeps_largest_lower_index_on_ties() {
    let codes = SparseCodes {
        rows: 2,
        cols: 6,
        row_ptr: vec![0, 5, 6],
        idx: vec![0, 1, 2, 4, 5, 3],
        val: vec![1.0, 3.0, 1.0, 3.0, 2.0, 7.0],
    };
    let c = sparsify::cap_rows(&codes, 3);
    assert_eq!((c.row_ptr, c.idx, c.val), (vec![0, 3, 4], vec![1, 4, 5, 3], vec![3.0, 3.0, 2.0, 7.0]));
    let c = sparsify::cap_rows(&codes, 4);
    assert_eq!(c.idx, vec![0, 1, 4, 5, 3]);
    assert_eq!(sparsify::cap_rows(&codes, 0).nnz(), 0);
}

#[test]
fn zipf_budgets_hand_computed() {
    // F=5, B=10, k=2, alpha=1, beta=6.8: Z = sum_{i=1..5} 1/(i+6.8) = 0.52122..., N = 20/Z = 38.371...
    // N/(i+6.8) = 4.92, 4.36, 3.92, 3.55, 3.25 -> budgets by rank 4, 4, 3, 3, 3.
    // Ranks by density (ties: lower index first): latent 1, 3, 2, 0, 4.
    let density = [0.1f32, 0.5, 0.3, 0.5, 0.0];
    assert_eq!(budget::density_ranks(&density), vec![1, 3, 2, 0, 4]);
    assert_eq!(budget::zipf_budgets(&density, 10, 2, 1.0, 6.8, usize::MAX), vec![3, 4, 3, 4, 3]);
    assert_eq!(budget::zipf_budgets(&density, 10, 2, 1.0, 6.8, 3), vec![3, 3, 3, 3, 3]);
    // NaN densities rank last (after -inf ones, by index), never panic.
    let density = [f32::NAN, 0.2, f32::NEG_INFINITY, 0.7, f32::NAN, 0.2];
    assert_eq!(budget::density_ranks(&density), vec![3, 1, 5, 0, 2, 4]);
    let density = [0.1f32, 0.5, 0.3, 0.5, 0.0];
    let pred = budget::zipf_predicted_density(&density, 10, 2, 1.0, 6.8);
    assert_eq!(pred, vec![0.3, 0.4, 0.3, 0.4, 0.3]);
}

#[test]
fn zipf_budgets_properties() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for &(f, b, k) in &[(4608usize, 4096usize, 32usize), (100, 64, 8), (37, 1000, 3)] {
        let density: Vec<f32> = (0..f).map(|_| rng.random_range(0.0..1.0f32)).collect();
        let m = budget::zipf_budgets(&density, b, k, 1.0, 6.8, usize::MAX);
        let sum: usize = m.iter().sum();
        // Floors lose less than one per latent.
        assert!(sum <= b * k && sum + f > b * k, "sum {sum} vs B*k {}", b * k);
        // Non-increasing in rank.
        let by_rank: Vec<usize> = budget::density_ranks(&density).iter().map(|&i| m[i]).collect();
        assert!(by_rank.windows(2).all(|w| w[0] >= w[1]));
        // The cap.
        let capped = budget::zipf_budgets(&density, b, k, 1.0, 6.8, 5);
        assert!(capped.iter().zip(&m).all(|(&c, &u)| c == u.min(5)));
    }
}

#[test]
fn dying_latents_bottom_quarter_below_prediction() {
    // F=8, B=10, k=2: continuous Zipf densities by rank (Definition 3.1; the floored budgets'
    // 0.3 .. 0.1 made every low rank look alive) 0.347 0.307 0.276 0.251 0.229 0.211 0.196 0.183.
    // Order: 0, 2, 4, 6, 7, 3, 1, 5. Bottom quarter = latents 1 (0.065 < 0.6*0.196) and 5 (0.01).
    // Latent 3 is far below its prediction (0.07 < 0.15) but not in the bottom quarter.
    let density = [0.5f32, 0.065, 0.4, 0.07, 0.3, 0.01, 0.2, 0.1];
    let dying = budget::dying_latents(&density, 10, 2, 1.0, 6.8);
    assert_eq!(dying, vec![false, true, false, false, false, true, false, false]);
    // Order 0, 2, 4, 6, 7, 3, 1, 5: latent 1 (rank 7) at 0.119 is above 0.6 x 0.196 = 0.118, so
    // alive; latent 5 (rank 8) below it is dying.
    let density = [0.5f32, 0.119, 0.4, 0.125, 0.3, 0.01, 0.2, 0.13];
    let dying = budget::dying_latents(&density, 10, 2, 1.0, 6.8);
    assert_eq!(dying, vec![false, false, false, false, false, true, false, false]);
}

#[test]
fn thresholds() {
    let codes = SparseCodes {
        rows: 3,
        cols: 4,
        row_ptr: vec![0, 2, 2, 5],
        idx: vec![0, 2, 0, 1, 2],
        val: vec![0.5, 2.0, 0.25, 3.0, 1.5],
    };
    assert_eq!(threshold::batch_min(&codes), Some(0.25));
    assert_eq!(threshold::batch_min(&SparseCodes::empty(3, 4)), None);
    assert_eq!(threshold::per_latent_min(&codes), vec![Some(0.25), Some(3.0), Some(1.5), None]);
    // wta: per latent the m-th largest, or the smallest positive one when fewer were positive.
    let pre = [3.0f32, -1.0, 1.0, -1.0, 2.0, -1.0, 5.0, -1.0];
    let c = sparsify::select(&pre, 4, 2, &Selection::Wta { m: &[2, 2] });
    assert_eq!(threshold::per_latent_min(&c), vec![Some(3.0), None]);
    let c = sparsify::select(&pre, 4, 2, &Selection::Wta { m: &[9, 1] });
    assert_eq!(threshold::per_latent_min(&c), vec![Some(1.0), None]);

    let (mut theta, mut set) = (0.0f32, false);
    threshold::ema_update(&mut theta, &mut set, 2.0, 0.999);
    assert!(set);
    assert_eq!(theta, 2.0);
    threshold::ema_update(&mut theta, &mut set, 4.0, 0.5);
    assert_eq!(theta, 3.0);
    threshold::ema_update(&mut theta, &mut set, 1.0, 0.999);
    assert!((theta - (0.999 * 3.0 + 0.001 * 1.0)).abs() < 1e-6);
}

/// Process CPU time (user + system) in seconds, from /proc/self/stat (Linux only).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s.rsplit_once(')').map_or("", |x| x.1).split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Timing at the target shape (B=4096, F=4608, k=32, wta m=28, hybrid k_max=64), 2 threads.
/// Reports wall and CPU time per selection (CPU time is robust on a shared machine).
/// `cargo test --release --test sparsify -- --ignored --nocapture timing`
#[test]
#[ignore]
fn timing_target_shape() {
    let (rows, cols, k) = (4096usize, 4608usize, 32usize);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let pre: Vec<f32> = (0..rows * cols).map(|_| StandardNormal.sample(&mut rng)).collect();
    let m = vec![rows * k / cols; cols];
    let theta = vec![2.0f32; cols];
    let density: Vec<f32> = (0..cols).map(|_| rng.random_range(0.0..1.0f32)).collect();
    let mz = budget::zipf_budgets(&density, rows, k, 1.0, 6.8, rows);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let sels = [
        ("wta_zipf", Selection::Wta { m: &mz }),
        ("topk", Selection::TopK { k }),
        ("batchtopk", Selection::BatchTopK { k }),
        ("wta", Selection::Wta { m: &m }),
        ("hybrid", Selection::Hybrid { m: &m, k_max: 2 * k }),
        ("relu", Selection::Relu),
        ("jumprelu", Selection::JumpRelu { theta: &theta }),
    ];
    let iters: usize = std::env::var("SPARSIFY_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    // Calibration: one read of pre (count of positives), the floor for any selection.
    {
        use rayon::prelude::*;
        let (c0, t0) = (cpu_seconds(), std::time::Instant::now());
        for _ in 0..iters {
            let n: usize = pool
                .install(|| pre.par_chunks(cols).map(|r| r.iter().map(|&v| (v > 0.0) as usize).sum::<usize>()).sum());
            std::hint::black_box(n);
        }
        let wall = t0.elapsed().as_secs_f64() / iters as f64;
        let cpu = (cpu_seconds() - c0) / iters as f64;
        println!("{:>10}: wall {:8.2} ms  cpu {:8.2} ms", "scan-only", wall * 1e3, cpu * 1e3);
    }
    let only = std::env::var("SPARSIFY_ONLY").unwrap_or_default();
    for (name, sel) in sels.iter().filter(|s| only.is_empty() || only.split(',').any(|o| o == s.0)) {
        pool.install(|| std::hint::black_box(sparsify::select(&pre, rows, cols, sel)));
        let (c0, t0) = (cpu_seconds(), std::time::Instant::now());
        for _ in 0..iters {
            pool.install(|| std::hint::black_box(sparsify::select(&pre, rows, cols, sel)));
        }
        let wall = t0.elapsed().as_secs_f64() / iters as f64;
        let cpu = (cpu_seconds() - c0) / iters as f64;
        let gbs = (rows * cols * 4) as f64 / wall / 1e9;
        println!("{name:>10}: wall {:8.2} ms  cpu {:8.2} ms  {gbs:6.2} GB/s (wall)", wall * 1e3, cpu * 1e3);
    }
}

/// Batches whose every 8th row is unlike the rest (misleads any row-sampled estimate), and
/// budgets beyond the number of positives.
#[test]
fn batchtopk_structured_rows() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for &(rows, cols) in &[(512usize, 50usize), (300, 47), (1024, 19)] {
        for phase in 0..3 {
            let mut pre = gen(&mut rng, rows, cols, if phase == 2 { 2 } else { 0 });
            for b in (0..rows).filter(|b| b % 8 == 0) {
                for v in &mut pre[b * cols..(b + 1) * cols] {
                    *v = if phase == 1 { *v - 5.0 } else { *v + 10.0 };
                }
            }
            for k in [1, 3, 10, 25, cols, cols + 7] {
                let got = as_set(&sparsify::select(&pre, rows, cols, &Selection::BatchTopK { k }), &pre, rows, cols);
                let want = oracle_batchtopk(&pre, rows, cols, k);
                assert_eq!(got, want, "batchtopk {rows}x{cols} k={k} phase={phase}");
            }
        }
    }
}

/// The oracle of any selection: an exhaustive match, so a new `Selection` variant does not
/// compile until it has a plain reference here.
fn oracle(pre: &[f32], rows: usize, cols: usize, sel: &Selection) -> Set {
    match *sel {
        Selection::TopK { k } => oracle_topk(pre, rows, cols, k),
        Selection::BatchTopK { k } => oracle_batchtopk(pre, rows, cols, k),
        Selection::Wta { m } => oracle_wta(pre, rows, cols, m),
        Selection::WtaAbove { m, theta } => {
            let above: Vec<f32> = pre
                .chunks(cols)
                .flat_map(|r| r.iter().zip(theta).map(|(&v, &t)| if v > t { v } else { 0.0 }))
                .collect();
            oracle_wta(&above, rows, cols, m)
        }
        Selection::Hybrid { m, k_max } => oracle_cap(&oracle_wta(pre, rows, cols, m), rows, k_max),
        Selection::Relu => oracle_mask(pre, rows, cols, None),
        Selection::JumpRelu { theta } => oracle_mask(pre, rows, cols, Some(theta)),
        Selection::JumpReluCap { theta, k } => oracle_cap(&oracle_mask(pre, rows, cols, Some(theta)), rows, k),
        Selection::Aux { candidates, k } => {
            let mut out = vec![];
            for b in 0..rows {
                let cand = candidates
                    .iter()
                    .map(|&i| (pre[b * cols + i as usize], i as usize))
                    .filter(|e| positive(e.0))
                    .collect();
                out.extend(top_n(cand, k).into_iter().map(|(v, i)| (b, i, v.to_bits())));
            }
            out.sort();
            out
        }
    }
}

/// Every example of the case table (the same list the CUDA self-test runs) against its oracle
/// on every input kind, including budgets above B and F < k.
#[test]
fn case_table_selections_match_their_oracles() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for &(rows, cols) in SHAPES {
        let inputs = sparsify::cases::SelectionInputs::new(cols);
        for kind in 0..5 {
            let pre = gen(&mut rng, rows, cols, kind);
            for (name, sel) in sparsify::cases::selection_examples(&inputs, cols) {
                let got = as_set(&sparsify::select(&pre, rows, cols, &sel), &pre, rows, cols);
                assert_eq!(got, oracle(&pre, rows, cols, &sel), "{name} rows={rows} cols={cols} kind={kind}");
            }
        }
    }
}

/// The aux selection written straight into a dense block over the candidates (the CPU's dense
/// aux path) keeps exactly the entries `Selection::Aux` keeps, with the same values.
#[test]
fn aux_block_selection_matches_the_sparse_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for &(rows, cols) in SHAPES {
        let candidate_sets: Vec<Vec<u32>> =
            vec![(0..cols as u32).collect(), (0..cols as u32).filter(|i| i % 3 == 1).collect(), vec![cols as u32 - 1]];
        for kind in 0..5 {
            let pre = gen(&mut rng, rows, cols, kind);
            for cand in &candidate_sets {
                let n = cand.len();
                for k in sizes_k(n) {
                    let sparse = sparsify::select(&pre, rows, cols, &Selection::Aux { candidates: cand, k });
                    let mut block = vec![f32::NAN; rows * n];
                    let nnz = sparsify::select_aux_block(&pre, rows, cols, cand, k, &mut block);
                    assert_eq!(nnz, sparse.nnz(), "rows={rows} cols={cols} kind={kind} n={n} k={k}");
                    let dense = sparse.to_dense();
                    for b in 0..rows {
                        for (j, &i) in cand.iter().enumerate() {
                            let (want, got) = (dense[b * cols + i as usize], block[b * n + j]);
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "rows={rows} cols={cols} kind={kind} k={k} ({b},{i})"
                            );
                        }
                    }
                }
            }
        }
    }
}
