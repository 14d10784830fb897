//! Building blocks: synthetic data, initialisation, the aligned map, sparse views, checkpoints.

use saetrain::config::BDecInit;
use saetrain::data::synthetic::{SynthSpec, Synthetic};
use saetrain::data::BatchSource;
use saetrain::model::{aligned, init, Params, Shape, TrainState};
use saetrain::sparse::SparseCodes;
use saetrain::train::checkpoint::{self, StateMeta};

fn spec(seed: u64) -> SynthSpec {
    SynthSpec { d_in: 19, n_features: 53, mean_active: 4.0, zipf: 1.0, noise: 0.01, seed }
}

#[test]
fn synthetic_is_deterministic_resumable_and_has_a_separate_eval_stream() {
    let mut a = Synthetic::new(spec(3), 77).unwrap();
    let mut b = Synthetic::new(spec(3), 77).unwrap();
    let a0 = a.next_batch().unwrap();
    let a1 = a.next_batch().unwrap();
    assert_eq!(a0, b.next_batch().unwrap());
    assert_ne!(a0, a1);
    // Seek: a fresh source positioned after one batch yields the second.
    let mut c = Synthetic::new(spec(3), 77).unwrap();
    c.seek(&serde_json::json!({"batches": 1})).unwrap();
    assert_eq!(c.next_batch().unwrap(), a1);
    assert!(c.seek(&serde_json::json!({"rows": 1})).is_err());
    // Held-out batches never equal training batches, and a different seed changes the data.
    let eval = a.eval_batches(100).unwrap();
    assert_eq!(eval.iter().map(|b| b.rows).sum::<usize>(), 100);
    assert_ne!(eval[0], a0);
    assert_ne!(Synthetic::new(spec(4), 77).unwrap().next_batch().unwrap(), a0);
    // Ground truth: unit rows.
    let gt = a.ground_truth().unwrap();
    assert_eq!(gt.len(), 53 * 19);
    for row in gt.chunks(19) {
        let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
    }
    // Zipf probabilities sum to the mean number of active features (no capping here).
    let s: f64 = a.probabilities().iter().sum();
    assert!((s - 4.0).abs() < 1e-9, "{s}");
}

#[test]
fn synthetic_tokens_are_sparse_nonnegative_combinations() {
    // Without noise, each token is sum_f c_f * dir_f with c_f in [0.5, 1.5): its projection on
    // the span of ground truth explains it exactly; check the mean token norm is plausible.
    let s = SynthSpec { noise: 0.0, ..spec(1) };
    let mut src = Synthetic::new(s, 4000).unwrap();
    let x = src.next_batch().unwrap().to_f32().into_owned();
    let zero_rows = x.chunks(19).filter(|r| r.iter().all(|v| *v == 0.0)).count();
    // P(no active feature) = prod(1 - p_i); allow 5 binomial standard deviations.
    let p: f64 = src.probabilities().iter().map(|p| 1.0 - p).product();
    let frac = zero_rows as f64 / 4000.0;
    let sd = (p * (1.0 - p) / 4000.0).sqrt();
    assert!((frac - p).abs() < 5.0 * sd + 1e-3, "fraction of empty tokens {frac}, expected {p}");
}

#[test]
fn geometric_median_resists_outliers() {
    // d=1: the geometric median is the median.
    let x = [0.0f32, 1.0, 2.0, 3.0, 1000.0];
    let m = init::b_dec_from_batch(&x, 1, BDecInit::GeometricMedian);
    assert!((m[0] - 2.0).abs() < 1e-2, "{m:?}");
    let mean = init::b_dec_from_batch(&x, 1, BDecInit::Mean);
    assert!((mean[0] - 201.2).abs() < 1e-3);
    // d=2, symmetric square: the centre.
    let sq = [1.0f32, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0];
    let m = init::geometric_median(&sq, 2, 100, 1e-9);
    assert!(m[0].abs() < 1e-6 && m[1].abs() < 1e-6);
}

#[test]
fn tied_init_unit_decoder_and_aligned_constraint() {
    let shape = Shape::new(13, 29);
    let p = init::tied(shape, 5, false);
    for (e, w) in p.w_enc().chunks(13).zip(p.w_dec().chunks(13)) {
        assert_eq!(e, w);
        let n: f32 = w.iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-5);
    }
    assert!(p.b_enc().iter().all(|v| *v == 0.0));
    // Aligned: any A gives W_enc_i . W_dec_i = 1.
    let a = saetrain::bench::random(29 * 13, 9);
    let mut w_dec = saetrain::bench::random(29 * 13, 10);
    w_dec.chunks_mut(13).for_each(init::normalize);
    let mut eff = vec![0f32; 29 * 13];
    aligned::effective_encoder(&a, &w_dec, 13, &mut eff);
    for (e, w) in eff.chunks(13).zip(w_dec.chunks(13)) {
        let dot: f32 = e.iter().zip(w).map(|(x, y)| x * y).sum();
        assert!((dot - 1.0).abs() < 1e-4, "{dot}");
    }
    let pa = init::tied(shape, 5, true);
    assert!(pa.w_enc().chunks(13).all(|r| r[12] == 0.0), "A's last column is held at 0");
}

#[test]
fn sparse_codes_views_agree_with_dense() {
    let rows = vec![vec![(4u32, 1.0f32), (1, 2.0)], vec![], vec![(1, 3.0), (0, 0.5), (4, 0.25)]];
    let c = SparseCodes::from_rows(5, rows);
    assert_eq!(c.nnz(), 5);
    assert_eq!(c.row(0), (&[1u32, 4][..], &[2.0f32, 1.0][..]));
    let dense = c.to_dense();
    assert_eq!(dense[2 * 5], 0.5);
    assert_eq!(c.col_counts(), vec![1, 2, 0, 0, 2]);
    let v = c.by_latent();
    let toks: Vec<u32> = v.entries(1).map(|e| v.tok[e]).collect();
    assert_eq!(toks, vec![0, 2]);
    for i in 0..5 {
        for e in v.entries(i) {
            let p = v.pos[e] as usize;
            assert_eq!(c.idx[p] as usize, i);
            assert_eq!(dense[v.tok[e] as usize * 5 + i], c.val[p]);
        }
    }
    // A row's entries in a range of latents: exactly those, for every range (empty ones too).
    for b in 0..c.rows {
        for lo in 0..=5u32 {
            for hi in lo..=6u32 {
                let want: Vec<usize> =
                    (c.row_ptr[b]..c.row_ptr[b + 1]).filter(|&p| (lo..hi).contains(&c.idx[p])).collect();
                let got: Vec<usize> = c.row_entries_in(b, lo..hi).collect();
                assert_eq!(got, want, "row {b}, latents {lo}..{hi}");
            }
        }
    }
    let from_mask = SparseCodes::from_mask(&dense, 3, 5, |b, i| dense[b * 5 + i] > 0.0);
    assert_eq!(from_mask, c);
}

#[test]
fn checkpoint_round_trip_and_refusals() {
    let shape = Shape::new(7, 11);
    let mut st = TrainState::new(init::tied(shape, 1, false));
    st.step = 42;
    st.adam_m.data.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32 * 0.5);
    st.theta[3] = 0.25;
    st.theta_set[3] = true;
    st.since_fired[5] = u64::MAX / 3;
    st.density[2] = 0.125;
    let meta = StateMeta {
        step: 42,
        d_in: 7,
        d_sae: 11,
        position: serde_json::json!({"batches": 43}),
        input_scale: 0.5,
        tokens: 4200,
        config: Some(serde_json::json!({"lr": 0.001})),
    };
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &st, &meta).unwrap();
    let (back, m2) = checkpoint::load(dir.path()).unwrap();
    assert_eq!(back, st);
    assert_eq!(m2, meta);
    // A truncated file is refused with its name in the message.
    let path = dir.path().join(checkpoint::STATE_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", checkpoint::load(dir.path()).unwrap_err());
    assert!(err.contains("trainer_state.safetensors"), "{err}");
    let _ = Params::zeros(shape);
}

/// The sparse decode gives the same G, dZ and sums, bit for bit, whether or not it keeps the
/// residual; the kept residual is x_hat - x against a plain f64 decode (rows not a multiple of
/// the row chunk, an empty row, d not a multiple of 8).
#[test]
fn decode_without_the_residual_buffer_matches_with_it() {
    use saetrain::backend::cpu::decode::decode_residual_grads;
    let (rows, f, d) = (131, 23, 13);
    let w: Vec<f32> = (0..f * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
    let b_dec: Vec<f32> = (0..d).map(|j| j as f32 * 0.1 - 0.5).collect();
    let x: Vec<f32> = (0..rows * d).map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0).collect();
    let codes =
        SparseCodes::from_rows(
            f,
            (0..rows)
                .map(|b| {
                    if b == 7 {
                        vec![]
                    } else {
                        (0..3).map(|q| (((b * 5 + q * 7) % f) as u32, 0.5 + q as f32)).collect()
                    }
                })
                .collect(),
        );
    let run = |keep: bool| {
        let (mut res, mut g, mut dz) = (vec![0f32; rows * d], vec![0f32; rows * d], vec![0f32; codes.nnz()]);
        let sums = decode_residual_grads(&codes, &w, &b_dec, &x, 0.25, keep.then_some(&mut res[..]), &mut g, &mut dz);
        (sums, res, g, dz)
    };
    let (s1, res, g1, dz1) = run(true);
    let (s0, _, g0, dz0) = run(false);
    assert_eq!((s1.0.to_bits(), s1.1.to_bits()), (s0.0.to_bits(), s0.1.to_bits()));
    assert_eq!(g1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), g0.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    assert_eq!(
        dz1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        dz0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    for b in 0..rows {
        let (ix, vs) = codes.row(b);
        for j in 0..d {
            let mut h = b_dec[j] as f64;
            for (&i, &v) in ix.iter().zip(vs) {
                h += v as f64 * w[i as usize * d + j] as f64;
            }
            let want = h - x[b * d + j] as f64;
            assert!((res[b * d + j] as f64 - want).abs() < 1e-5, "residual[{b},{j}]");
            assert!((g0[b * d + j] as f64 - 0.25 * want).abs() < 1e-5, "g[{b},{j}]");
        }
    }
}
