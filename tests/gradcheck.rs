//! Gradient checks.
//!
//! (a) The dense f64 reference (`tests/common/reference.rs`) against central finite differences
//!     of its own loss with the kept set (and aux set, and the detached residual) held fixed, for
//!     every parameter tensor: relative error < 1e-6.
//! (b) The fast f32 CPU backend's `gradients` against the reference gradient with the same kept
//!     set (taken from the backend's codes) and against f64 finite differences: < 1e-4.
//! (c) Whole `Backend::step`s against the reference Adam step (projection, Adam, renormalisation,
//!     threshold EMA): parameters within 1e-5 relative.

mod common;

use common::reference::{self as r, AuxInput, LossConfig, Mask, RefParams, TENSORS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use saetrain::backend::cpu::{CpuBackend, GradientPass};
use saetrain::backend::Backend;
use saetrain::config::{AuxKind, BudgetKind, DenseCodes, SparsifierKind, TrainConfig};
use saetrain::data::Batch;
use saetrain::model::{Params, Shape, TrainState};
use saetrain::sparse::SparseCodes;

// ---------------------------------------------------------------- setup

#[derive(Clone)]
struct Case {
    name: &'static str,
    cfg: TrainConfig,
    rows: usize,
    /// Latents marked dead (since_fired = dead window) before the pass.
    dead: Vec<usize>,
    /// Start from step 5 with varied running densities (so that aux_zipf has dying latents).
    densities: bool,
}

fn cfg(sparsifier: SparsifierKind, d: usize, f: usize, k: usize) -> TrainConfig {
    TrainConfig {
        sparsifier,
        d_sae: f,
        d_in: Some(d),
        synth_d_in: d,
        k,
        aux: Some(vec![AuxKind::None]),
        quiet: true,
        ..TrainConfig::default()
    }
}

fn case(name: &'static str, sparsifier: SparsifierKind, rows: usize, d: usize, f: usize, k: usize) -> Case {
    Case { name, cfg: cfg(sparsifier, d, f, k), rows, dead: vec![], densities: false }
}

/// Every third latent dead, aux_k on.
fn with_aux(mut c: Case) -> Case {
    c.cfg.aux = Some(vec![AuxKind::AuxK]);
    c.cfg.dead_window = Some(100);
    c.dead = (0..c.cfg.d_sae).filter(|i| i % 3 == 1).collect();
    c
}

/// The same case on the dense path (decode and backward as GEMMs, `--dense-codes always`).
fn dense(mut c: Case, name: &'static str) -> Case {
    c.name = name;
    c.cfg.dense_codes = DenseCodes::Always;
    c
}

fn aligned(mut c: Case) -> Case {
    c.cfg.aligned = true;
    c
}

const B: usize = 37;
const D: usize = 23;
const F: usize = 61;
const K: usize = 5;

fn cases() -> Vec<Case> {
    use SparsifierKind::*;
    let mut v = vec![
        case("topk", Topk, B, D, F, K),
        case("topk k=F", Topk, 9, 6, 4, 4),
        case("batchtopk", Batchtopk, B, D, F, K),
        case("mutual_choice", MutualChoice, B, D, F, K),
        case("wta uniform", Wta, B, D, F, K),
        case("hybrid", Hybrid, B, D, F, K),
        case("relu+l1", Relu, B, D, F, K),
    ];
    // wta with a budget as large as the batch (B = m: every positive entry of a column).
    let mut c = case("wta rate=1 (m=B)", Wta, 5, D, F, K);
    c.cfg.rate = Some(1.0);
    v.push(c);
    // wta with Zipf budgets: the top-ranked latents' budgets are capped at B (m > B before the cap).
    let mut c = case("wta zipf", Wta, 7, D, F, K);
    c.cfg.budget = BudgetKind::Zipf;
    v.push(c);
    // hybrid with an active per-token cap, and with k_max > F.
    let mut c = case("hybrid k_max=2", Hybrid, B, D, F, K);
    c.cfg.k_max = Some(2);
    v.push(c);
    let mut c = case("hybrid F<k_max", Hybrid, 9, 6, 4, 3);
    c.cfg.rate = Some(0.75);
    v.push(c);
    v.push(with_aux(case("topk+aux_k", Topk, B, D, F, K)));
    v.push(with_aux(case("batchtopk+aux_k", Batchtopk, B, D, F, K)));
    // k_aux = 1: the aux block is sparse enough that `auto` turns it into sparse codes.
    let mut c = with_aux(case("topk+aux_k k_aux=1", Topk, B, D, F, K));
    c.cfg.k_aux = Some(1);
    v.push(c);
    v.push(aligned(case("topk aligned", Topk, B, D, F, K)));
    v.push(aligned(case("relu+l1 aligned", Relu, B, D, F, K)));
    v.push(aligned(with_aux(case("batchtopk+aux_k aligned", Batchtopk, B, D, F, K))));
    v.push(dense(case("relu+l1", Relu, B, D, F, K), "relu+l1 dense"));
    v.push(dense(aligned(case("relu+l1 aligned", Relu, B, D, F, K)), "relu+l1 aligned dense"));
    v.push(dense(case("topk", Topk, B, D, F, K), "topk dense"));
    v.push(dense(case("hybrid F<k_max", Hybrid, 9, 6, 4, 3), "hybrid F<k_max dense"));
    let mut c = case("mutual_choice+aux_zipf", MutualChoice, B, D, F, K);
    c.cfg.aux = Some(vec![AuxKind::AuxZipf]);
    c.densities = true;
    v.push(c);
    for c in &mut v {
        c.cfg.validate().unwrap_or_else(|e| panic!("{}: invalid test config: {e}", c.name));
    }
    v
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    StandardNormal.sample(rng)
}

/// Random parameters: unit-norm decoder rows, an encoder near the decoder (so that kept sets are
/// varied), small biases. Under aligned training `w_enc` holds A with its last column at 0.
fn random_params(d: usize, f: usize, aligned: bool, seed: u64) -> Params {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p = Params::zeros(Shape::new(d, f));
    let m = p.parts_mut();
    for row in m.w_dec.chunks_mut(d) {
        row.iter_mut().for_each(|v| *v = normal(&mut rng));
        saetrain::model::init::normalize(row);
    }
    for (e, w) in m.w_enc.iter_mut().zip(m.w_dec.iter()) {
        *e = 0.7 * w + 0.5 * normal(&mut rng) / (d as f32).sqrt();
    }
    if aligned {
        for row in m.w_enc.chunks_mut(d) {
            row[d - 1] = 0.0;
        }
    }
    m.b_enc.iter_mut().for_each(|v| *v = 0.1 * normal(&mut rng));
    m.b_dec.iter_mut().for_each(|v| *v = 0.2 * normal(&mut rng));
    p
}

/// [`random_params`] for case `c`, with the latents its aux loss should find kept quiet: the
/// latents marked dead but one, and the low-density ones of a `densities` case (where aux_zipf looks for
/// dying latents), get a small encoder row and a small positive bias. Their `pre` is then
/// positive on some tokens (the aux loss has something to select) but never among the kept
/// entries, so that they stay candidates once the batch is counted in (a latent that fires in
/// the batch is not dead in it, and raises its density).
fn case_params(c: &Case, seed: u64) -> Params {
    let (d, f) = (c.cfg.d_in.unwrap(), c.cfg.d_sae);
    let mut p = random_params(d, f, c.cfg.aligned, seed);
    let quiet: Vec<usize> = if c.densities {
        (0..f).filter(|i| low_density(*i, f)).collect()
    } else {
        // All but the first: it fires in the batch, so that the cases check that a latent
        // firing in this batch is no aux candidate.
        c.dead.iter().skip(1).copied().collect()
    };
    let m = p.parts_mut();
    for i in quiet {
        m.w_enc[i * d..(i + 1) * d].iter_mut().for_each(|v| *v *= 0.02);
        m.b_enc[i] = 0.02;
    }
    p
}

/// The position of latent `i` in the densities of a `densities` case, in [0, 1).
fn density_position(i: usize, f: usize) -> f32 {
    ((i * 37) % f) as f32 / f as f32
}

/// The latents of a `densities` case at the low end (most of the bottom quarter).
fn low_density(i: usize, f: usize) -> bool {
    density_position(i, f) < 0.2
}

fn random_x(rows: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xABCD);
    (0..rows * d).map(|_| normal(&mut rng) * rng.random_range(0.5f32..1.5)).collect()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn backend(c: &Case, params: Params) -> CpuBackend {
    let mut state = TrainState::new(params);
    for &i in &c.dead {
        state.since_fired[i] = c.cfg.dead_window_tokens();
    }
    if c.densities {
        state.step = 5;
        let f = c.cfg.d_sae;
        // Stored densities carry the EMA's start-up bias (1 - decay^step); these are the
        // bias-corrected values the aux_zipf rule sees.
        let bias = 1.0 - (c.cfg.density_decay as f32).powi(5);
        for (i, dn) in state.density.iter_mut().enumerate() {
            let u = density_position(i, f);
            // Part of the bottom quarter below 0.6 x its Zipf density: 13 of 15 are dying.
            *dn = (0.012 + 0.3 * u * u) * bias;
        }
    }
    CpuBackend::new(c.cfg.clone(), state).unwrap()
}

fn mask_of(codes: &SparseCodes) -> Mask {
    let entries = (0..codes.rows).flat_map(|b| codes.row(b).0.iter().map(move |&i| (b, i as usize)));
    Mask::from_entries(codes.rows, codes.cols, entries)
}

fn loss_cfg(c: &TrainConfig) -> LossConfig {
    LossConfig {
        aligned: c.aligned,
        l1_coeff: (c.sparsifier == SparsifierKind::Relu).then_some(c.l1_coeff),
        aux_alpha: c.aux_alpha,
    }
}

/// aux_zipf's "dying" latents (SPEC, the MC/FC paper's Definition 3.1): bottom quarter by
/// running density, density below 0.6 x the continuous Zipf density of the rank
/// (N / (rank+beta)^alpha / B), and every lower-ranked latent dying too.
fn dying(density: &[f32], batch: usize, k: usize, alpha: f64, beta: f64) -> Vec<bool> {
    let f = density.len();
    let mut order: Vec<usize> = (0..f).collect();
    order.sort_by(|&a, &b| density[b].partial_cmp(&density[a]).unwrap().then(a.cmp(&b)));
    let z: f64 = (1..=f).map(|i| (i as f64 + beta).powf(-alpha)).sum();
    let n = (batch * k) as f64 / z;
    let mut out = vec![false; f];
    for r in (f - f / 4..f).rev() {
        let i = order[r];
        let predicted = n / ((r + 1) as f64 + beta).powf(alpha) / batch as f64;
        if (density[i] as f64) >= 0.6 * predicted {
            break;
        }
        out[i] = true;
    }
    out
}

/// The running density with its EMA bias removed (as Adam's moments): density / (1 - decay^step).
fn corrected(density: &[f32], step: u64, decay: f64) -> Vec<f32> {
    let c = 1.0 - (decay as f32).powi(step as i32);
    density.iter().map(|d| d / c).collect()
}

/// Where the aux candidates come from: dead counters (aux_k) or densities (aux_zipf).
struct Tracking<'a> {
    since: &'a [u64],
    density: &'a [f32],
    step: u64,
}

/// The tracking once the batch's main codes are counted in (SPEC: candidates come from the
/// counters and densities with this batch counted): a latent that fired is not dead, the
/// others are `rows` tokens older, and the densities have one more EMA update.
fn counted(c: &TrainConfig, tr: &Tracking, rows: usize, mask: &Mask) -> (Vec<u64>, Vec<f32>, u64) {
    let f = tr.since.len();
    let fired: Vec<usize> = (0..f).map(|i| (0..rows).filter(|&b| mask.get(b, i)).count()).collect();
    let since = (0..f).map(|i| if fired[i] > 0 { 0 } else { tr.since[i] + rows as u64 }).collect();
    let decay = c.density_decay as f32;
    let density = (0..f).map(|i| decay * tr.density[i] + (1.0 - decay) * (fired[i] as f32 / rows as f32)).collect();
    (since, density, tr.step + 1)
}

/// The aux set the SPEC prescribes, selected independently in f64 from the reference `pre`;
/// None when there are no candidates or none of them is positive (no aux term then).
fn aux_mask(c: &TrainConfig, p: &RefParams, x: &[f64], rows: usize, mask: &Mask, tr: &Tracking) -> Option<Mask> {
    let kinds = c.aux_kinds();
    assert!(kinds.len() <= 1, "the reference has one aux set; {kinds:?}");
    let (since, density, step) = counted(c, tr, rows, mask);
    let cand: Vec<bool> = match kinds.first().copied().unwrap_or(AuxKind::None) {
        AuxKind::None => return None,
        AuxKind::AuxK => since.iter().map(|&s| s >= c.dead_window_tokens()).collect(),
        AuxKind::AuxZipf => dying(&corrected(&density, step, c.density_decay), rows, c.k, c.zipf_alpha, c.zipf_beta),
    };
    let fw = r::forward(p, &loss_cfg(c), x, rows, mask);
    let m = r::select_aux(&fw.pre, rows, p.f, &cand, c.k_aux_for(p.d));
    (m.count() > 0).then_some(m)
}

// ---------------------------------------------------------------- comparisons

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    let n = norm(want);
    if n == 0.0 {
        norm(&diff)
    } else {
        norm(&diff) / n
    }
}

/// Per-tensor relative errors of `got` against `want`; panics naming the worst tensor.
fn assert_close(what: &str, got: &RefParams, want: &RefParams, tol: f64) -> [f64; 4] {
    let mut errs = [0.0; 4];
    for (t, (g, w)) in got.tensors().iter().zip(want.tensors()).enumerate() {
        errs[t] = rel_err(g, w);
        assert!(norm(w) > 0.0 || norm(g) == 0.0, "{what}: reference {} is all zero", TENSORS[t]);
    }
    for t in 0..4 {
        assert!(
            errs[t] < tol && errs[t].is_finite(),
            "{what}: {} relative error {:.3e} >= {tol:e} (all: {})",
            TENSORS[t],
            errs[t],
            fmt_errs(&errs)
        );
    }
    errs
}

fn fmt_errs(e: &[f64; 4]) -> String {
    TENSORS.iter().zip(e).map(|(n, v)| format!("{n} {v:.1e}")).collect::<Vec<_>>().join(", ")
}

/// Central finite differences of `f` at `p`, every coordinate.
fn fd_grad(p: &RefParams, f: impl Fn(&RefParams) -> f64) -> RefParams {
    let base = p.flat();
    let mut out = vec![0.0; base.len()];
    let mut q = base.clone();
    for k in 0..base.len() {
        let h = 1e-5 * base[k].abs().max(1.0);
        q[k] = base[k] + h;
        let lp = f(&RefParams::from_flat(p.d, p.f, &q));
        q[k] = base[k] - h;
        let lm = f(&RefParams::from_flat(p.d, p.f, &q));
        q[k] = base[k];
        out[k] = (lp - lm) / (2.0 * h);
    }
    RefParams::from_flat(p.d, p.f, &out)
}

/// A's last column is not a parameter under aligned training: its gradient is 0 by definition.
fn zero_fixed(g: &mut RefParams, cfg: &LossConfig) {
    if cfg.aligned {
        let d = g.d;
        for row in g.w_enc.chunks_mut(d) {
            row[d - 1] = 0.0;
        }
    }
}

struct Prepared {
    c: Case,
    p: RefParams,
    x: Vec<f64>,
    lc: LossConfig,
    mask: Mask,
    aux: Option<Mask>,
    pass: GradientPass,
}

fn prepare(c: &Case, seed: u64, project: bool) -> Prepared {
    let d = c.cfg.d_in.unwrap();
    let params = case_params(c, seed);
    let x32 = random_x(c.rows, d, seed);
    let mut be = backend(c, params.clone());
    let st = be.state_ref().clone();
    let tr = Tracking { since: &st.since_fired, density: &st.density, step: st.step };
    let pass = be.gradients(&x32, c.rows, project).unwrap();
    let p = RefParams::from_params(&params);
    let x = widen(&x32);
    let lc = loss_cfg(&c.cfg);
    let mask = mask_of(&pass.codes);
    assert!(mask.count() > 0, "{}: empty kept set", c.name);
    let aux = aux_mask(&c.cfg, &p, &x, c.rows, &mask, &tr);
    let (since, density, step) = counted(&c.cfg, &tr, c.rows, &mask);
    if !c.dead.is_empty() {
        assert!(aux.is_some(), "{}: the aux loss should be active", c.name);
        // The marked latents that stayed silent in this batch (one that fired is not dead).
        let silent = c.dead.iter().filter(|&&i| since[i] > 0).count();
        assert!(silent > 0 && silent < c.dead.len(), "{}: {silent} of the marked latents are silent", c.name);
        assert_eq!(pass.aux_candidates, silent, "{}: aux candidates", c.name);
    }
    if c.densities {
        assert!(aux.is_some(), "{}: the aux loss should be active", c.name);
        let dens = corrected(&density, step, c.cfg.density_decay);
        let n = dying(&dens, c.rows, c.cfg.k, c.cfg.zipf_alpha, c.cfg.zipf_beta).iter().filter(|&&x| x).count();
        assert!(n > 0 && n < c.cfg.d_sae / 4, "{}: {n} dying latents", c.name);
        assert_eq!(pass.aux_candidates, n, "{}: aux candidates", c.name);
    }
    Prepared { c: c.clone(), p, x, lc, mask, aux, pass }
}

impl Prepared {
    /// The reference loss with everything but the parameters held fixed (E at the base point).
    fn fixed_loss(&self) -> impl Fn(&RefParams) -> f64 + '_ {
        let e = r::residual(&self.p, &self.lc, &self.x, self.c.rows, &self.mask);
        move |q: &RefParams| {
            let aux = self.aux.as_ref().map(|m| AuxInput { mask: m, e: &e });
            r::loss(q, &self.lc, &self.x, self.c.rows, &self.mask, aux.as_ref()).total
        }
    }
    fn reference(&self) -> (r::Loss, RefParams) {
        r::loss_and_grad(&self.p, &self.lc, &self.x, self.c.rows, &self.mask, self.aux.as_ref())
    }
    fn fast_grad(&self) -> RefParams {
        RefParams::from_params(&self.pass.grad)
    }
}

// ---------------------------------------------------------------- (a) reference vs FD

#[test]
fn reference_gradient_matches_finite_differences() {
    for (n, c) in cases().iter().enumerate() {
        let pr = prepare(c, 100 + n as u64, false);
        let (value, g) = pr.reference();
        let loss = pr.fixed_loss();
        assert!((loss(&pr.p) - value.total).abs() <= 1e-12 * value.total.abs());
        if pr.aux.is_some() {
            assert!(value.aux > 0.0, "{}: aux loss {}", c.name, value.aux);
        }
        if pr.lc.l1_coeff.is_some() {
            assert!(value.l1 > 0.0);
        }
        let mut fd = fd_grad(&pr.p, &loss);
        zero_fixed(&mut fd, &pr.lc);
        let e = assert_close(&format!("(a) {}: reference vs FD", c.name), &g, &fd, 1e-6);
        eprintln!("(a) {:<26} reference vs FD: {}", c.name, fmt_errs(&e));
    }
}

/// The projected decoder gradient is the gradient of the loss composed with row normalisation
/// `w -> w/||w||`, at unit-norm rows (the tangent-space gradient of the sphere constraint).
#[test]
fn projection_is_the_tangent_space_gradient() {
    for c in cases().iter().filter(|c| ["topk", "relu+l1 aligned", "batchtopk+aux_k aligned"].contains(&c.name)) {
        let mut pr = prepare(c, 7, false);
        r::renormalize_decoder(&mut pr.p); // exactly unit rows in f64
        let (_, mut g) = pr.reference();
        r::project_decoder(&mut g, &pr.p);
        let loss = pr.fixed_loss();
        let composed = |q: &RefParams| {
            let mut q = q.clone();
            r::renormalize_decoder(&mut q);
            loss(&q)
        };
        let mut fd = fd_grad(&pr.p, composed);
        zero_fixed(&mut fd, &pr.lc);
        let e = assert_close(&format!("{}: projected vs FD of normalised loss", c.name), &g, &fd, 1e-6);
        eprintln!("(a) {:<26} projection vs FD: {}", c.name, fmt_errs(&e));

        // The raw (unprojected) decoder gradient is NOT the tangent gradient: the check can fail.
        let (_, raw) = pr.reference();
        assert!(rel_err(&raw.w_dec, &fd.w_dec) > 1e-3, "{}: projection check is vacuous", c.name);
    }
}

// ---------------------------------------------------------------- (b) fast CPU vs reference

#[test]
fn cpu_gradient_matches_reference() {
    for (n, c) in cases().iter().enumerate() {
        let pr = prepare(c, 200 + n as u64, false);
        let (value, g) = pr.reference();
        let fast = pr.fast_grad();
        let e = assert_close(&format!("(b) {}: cpu vs reference", c.name), &fast, &g, 1e-4);
        let mut fd = fd_grad(&pr.p, pr.fixed_loss());
        zero_fixed(&mut fd, &pr.lc);
        let e_fd = assert_close(&format!("(b) {}: cpu vs FD", c.name), &fast, &fd, 1e-4);
        eprintln!("(b) {:<26} cpu vs ref: {} | cpu vs FD: {}", c.name, fmt_errs(&e), fmt_errs(&e_fd));

        // Loss terms agree too, and the codes hold the reference pre-activations.
        let s = &pr.pass.stats;
        for (what, got, want) in [
            ("loss", s.loss, value.total),
            ("rec", s.rec_loss, value.rec),
            ("aux", s.aux_loss, value.aux),
            ("l1", s.l1_loss, value.l1),
        ] {
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1e-3), "{}: {what} {got} vs reference {want}", c.name);
        }
        let fw = r::forward(&pr.p, &pr.lc, &pr.x, c.rows, &pr.mask);
        let dense = pr.pass.codes.to_dense();
        for (e, &k) in pr.mask.keep.iter().enumerate() {
            if k {
                assert!((dense[e] as f64 - fw.pre[e]).abs() < 1e-5, "{}: code value", c.name);
                assert!(dense[e] > 0.0, "{}: kept a non-positive entry", c.name);
            }
        }
    }
}

/// The dense and the sparse paths give the same gradients and loss, projected as in training
/// (with an aux loss active, `always` puts the aux codes on the dense block path and keeps the
/// main codes sparse).
#[test]
fn dense_and_sparse_paths_agree() {
    for (n, c) in cases().iter().enumerate() {
        let [sparse, dense] = [DenseCodes::Never, DenseCodes::Always].map(|mode| {
            let mut c = c.clone();
            c.cfg.dense_codes = mode;
            prepare(&c, 500 + n as u64, true)
        });
        let e =
            assert_close(&format!("{}: dense vs sparse path", c.name), &dense.fast_grad(), &sparse.fast_grad(), 1e-5);
        let (a, b) = (&dense.pass.stats, &sparse.pass.stats);
        assert!((a.loss - b.loss).abs() <= 1e-5 * b.loss.abs().max(1e-3), "{}: loss {} vs {}", c.name, a.loss, b.loss);
        assert_eq!(dense.pass.codes.nnz(), sparse.pass.codes.nnz(), "{}", c.name);
        eprintln!("{:<26} dense vs sparse: {}", c.name, fmt_errs(&e));
    }
}

/// The CPU gradient is bitwise the same whatever the thread count: every parallel pass splits
/// its work at fixed boundaries or sums per latent in a fixed order (groups, then tokens).
#[test]
fn cpu_gradient_does_not_depend_on_the_thread_count() {
    for (n, c) in cases().iter().enumerate() {
        let [one, three] = [1, 3].map(|threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| prepare(c, 700 + n as u64, true).pass.grad.data)
        });
        assert!(one.iter().zip(&three).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: 1 vs 3 threads", c.name);
    }
}

/// `gradients(.., project = true)` removes each decoder row's component along the row.
#[test]
fn cpu_projected_gradient_matches_reference() {
    for c in cases()
        .iter()
        .filter(|c| ["topk", "relu+l1 aligned", "batchtopk+aux_k aligned", "wta uniform"].contains(&c.name))
    {
        let pr = prepare(c, 300, true);
        let (_, mut g) = pr.reference();
        r::project_decoder(&mut g, &pr.p);
        let e = assert_close(&format!("(b) {}: projected cpu vs reference", c.name), &pr.fast_grad(), &g, 1e-4);
        eprintln!("(b) {:<26} projected cpu vs ref: {}", c.name, fmt_errs(&e));
    }
}

// ---------------------------------------------------------------- (c) whole steps

#[test]
fn cpu_steps_match_reference_adam() {
    let steps = 3;
    // Every case with plain Adam, and some with AdamW's decay and an active gradient clip (the
    // bound is far below these gradients' norms, and far above Adam's eps per element).
    let mut all = cases();
    for c in cases().into_iter().filter(|c| ["topk", "relu+l1 aligned", "batchtopk+aux_k aligned"].contains(&c.name)) {
        let name: &'static str = Box::leak(format!("{} adamw+clip", c.name).into_boxed_str());
        all.push(Case { name, cfg: TrainConfig { weight_decay: 0.3, grad_clip: 1e-3, ..c.cfg.clone() }, ..c });
    }
    for (n, c) in all.iter().enumerate() {
        let mut cf = c.cfg.clone();
        cf.threshold_start = Some(0);
        cf.threshold_decay = Some(0.9);
        let c = Case { cfg: cf, ..c.clone() };
        let (d, f, rows) = (c.cfg.d_in.unwrap(), c.cfg.d_sae, c.rows);
        let params = case_params(&c, 400 + n as u64);
        let mut be = backend(&c, params.clone());
        let lc = loss_cfg(&c.cfg);
        let h = r::AdamHyper {
            lr: 1e-3,
            beta1: c.cfg.adam_beta1,
            beta2: c.cfg.adam_beta2,
            eps: c.cfg.adam_eps,
            weight_decay: c.cfg.weight_decay,
            clip: c.cfg.grad_clip as f32 as f64,
        };
        let mut p = RefParams::from_params(&params);
        let len = p.flat().len();
        let (mut m, mut v) = (vec![0.0; len], vec![0.0; len]);
        let mut since = be.state_ref().since_fired.clone();
        let mut density: Vec<f64> = be.state_ref().density.iter().map(|&v| v as f64).collect();
        let step0 = be.state_ref().step;
        let mut theta: Vec<Option<f64>> = vec![None; f];
        for t in 1..=steps {
            let x32 = random_x(rows, d, 1000 * t + n as u64);
            let x = widen(&x32);
            // The kept set the backend will use (gradients() leaves the state untouched).
            let codes = be.gradients(&x32, rows, true).unwrap().codes;
            let mask = mask_of(&codes);
            let st = be.state_ref().clone();
            let tr = Tracking { since: &since, density: &st.density, step: st.step };
            let aux = aux_mask(&c.cfg, &p, &x, rows, &mask, &tr);
            if c.densities {
                assert!(aux.is_some(), "{}: aux_zipf should be active", c.name);
            }
            let (_, g) = r::loss_and_grad(&p, &lc, &x, rows, &mask, aux.as_ref());
            if h.clip > 0.0 {
                let norm = r::projected_grad_norm(&p, &g);
                assert!(norm > 10.0 * h.clip, "{}: the clip should be active (||g|| {norm})", c.name);
            }
            let fw = r::forward(&p, &lc, &x, rows, &mask);
            be.step(&Batch::from_f32(rows, d, x32), h.lr as f32).unwrap();
            r::train_step(&mut p, &g, &mut m, &mut v, step0 + t, h);

            // Bookkeeping: dead counters and the threshold EMA.
            for (i, (s, dn)) in since.iter_mut().zip(density.iter_mut()).enumerate() {
                let fired = (0..rows).filter(|&b| mask.get(b, i)).count();
                *s = if fired > 0 { 0 } else { *s + rows as u64 };
                let decay = c.cfg.density_decay;
                *dn = decay * *dn + (1.0 - decay) * fired as f64 / rows as f64;
            }
            if c.cfg.sparsifier.batch_dependent() {
                let d = c.cfg.threshold_decay_value();
                if c.cfg.sparsifier.per_column() {
                    for (i, tm) in r::per_latent_min(&fw, &mask).into_iter().enumerate() {
                        if let Some(tm) = tm {
                            theta[i] = Some(r::threshold_ema(theta[i], tm, d));
                        }
                    }
                } else if let Some(tm) = r::batch_min(&fw, &mask) {
                    theta.iter_mut().for_each(|th| *th = Some(r::threshold_ema(*th, tm, d)));
                }
            }

            let st = be.state().unwrap();
            let what = format!("(c) {} step {t}", c.name);
            let e = assert_close(&format!("{what}: params"), &RefParams::from_params(&st.params), &p, 1e-5);
            let em = assert_close(
                &format!("{what}: adam m"),
                &RefParams::from_params(&st.adam_m),
                &RefParams::from_flat(d, f, &m),
                1e-4,
            );
            let ev = assert_close(
                &format!("{what}: adam v"),
                &RefParams::from_params(&st.adam_v),
                &RefParams::from_flat(d, f, &v),
                1e-4,
            );
            if t == steps {
                eprintln!("(c) {:<26} params: {} | m: {} | v: {}", c.name, fmt_errs(&e), fmt_errs(&em), fmt_errs(&ev));
            }
            assert_eq!(st.since_fired, since, "{what}: dead-latent counters");
            assert_eq!(st.step, step0 + t);
            let dens: Vec<f64> = st.density.iter().map(|&v| v as f64).collect();
            assert!(rel_err(&dens, &density) < 1e-5, "{what}: running densities");
            for (i, th) in theta.iter().enumerate() {
                assert_eq!(st.theta_set[i], th.is_some(), "{what}: theta_set[{i}]");
                if let Some(th) = *th {
                    assert!(
                        (st.theta[i] as f64 - th).abs() <= 1e-5 * th.abs().max(1e-3),
                        "{what}: theta[{i}] {} vs {th}",
                        st.theta[i]
                    );
                }
            }
            for k in 0..f {
                let n = norm(&st.params.w_dec()[k * d..(k + 1) * d].iter().map(|&v| v as f64).collect::<Vec<_>>());
                assert!((n - 1.0).abs() < 1e-6, "{what}: decoder row {k} norm {n}");
            }
        }
    }
}
