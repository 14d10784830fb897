//! CPU backend: the reference every other backend is compared against, and a fast trainer.
//!
//! One step = the encoder GEMM (`gemm.rs`) + sparse work proportional to nnz * d + a dense Adam
//! pass.
//! The step's phases line up with kernels/*.cu and backend/cuda/*.rs: `encode.rs`, selection
//! (`crate::sparsify`, twin of select.cu), `decode.rs`, `backward.rs`, `adam.rs`.

pub mod adam;
pub mod backward;
pub mod clip;
pub mod decode;
pub mod dense;
pub mod encode;
pub mod gemm;
pub mod linalg;

use super::{Backend, InferMode, Inference, PhaseTimes, StepStats};
use crate::config::{DecoderNorm, DenseCodes, TrainConfig};
use crate::data::Batch;
use crate::model::{aligned, Params, TrainState};
use crate::sparse::SparseCodes;
use crate::sparsify::{self, plan, threshold, AuxKind};
use crate::util::hugepage;
use anyhow::{ensure, Result};
use backward::{Contribution, L1Terms};
use std::time::Instant;

pub struct CpuBackend {
    cfg: TrainConfig,
    state: TrainState,
    /// Reused buffers (a step allocates nothing of size B x F).
    ws: Workspace,
    times: PhaseTimes,
}

#[derive(Default)]
struct Workspace {
    xc: Vec<f32>,
    fold: encode::BiasFold,
    pre: Vec<f32>,
    w_enc_eff: Vec<f32>,
    residual: Vec<f32>,
    g: Vec<f32>,
    grad: Option<Params>,
    /// Dense path only ([`dense`]): the codes as B x F (then dL/dpre), and B x F scratch.
    z_dense: Vec<f32>,
    work: Vec<f32>,
}

/// Everything the forward pass produced that the backward pass and the statistics need.
pub struct Forward {
    pub codes: SparseCodes,
    pub rows: usize,
}

impl CpuBackend {
    pub fn new(cfg: TrainConfig, mut state: TrainState) -> Result<Self> {
        // Parameters and Adam moments on huge pages (the sparse passes gather W_dec rows).
        for p in [&mut state.params, &mut state.adam_m, &mut state.adam_v] {
            p.data = hugepage::copy_f32(&p.data);
        }
        ensure!(
            state.shape().d_sae == cfg.d_sae,
            "state has d_sae {} but the config says {}",
            state.shape().d_sae,
            cfg.d_sae
        );
        Ok(Self { cfg, state, ws: Workspace::default(), times: PhaseTimes::default() })
    }

    pub fn state_ref(&self) -> &TrainState {
        &self.state
    }

    /// Mark `latents` dead (not fired for the whole dead window), so that the next step's aux
    /// losses have candidates: for benches that time the aux path at a chosen dead fraction.
    pub fn mark_dead(&mut self, latents: &[usize]) {
        let w = self.cfg.dead_window_tokens();
        for &i in latents {
            self.state.since_fired[i] = w;
        }
    }

    /// The encoder actually applied: W_enc, or A + alpha W_dec under aligned training.
    fn refresh_encoder(&mut self) {
        if self.cfg.aligned {
            let p = self.state.params.parts();
            hugepage::resize_f32(&mut self.ws.w_enc_eff, p.w_enc.len());
            aligned::effective_encoder(p.w_enc, p.w_dec, p.shape.d_in, &mut self.ws.w_enc_eff);
        }
    }

    fn encoder(&self) -> &[f32] {
        if self.cfg.aligned {
            &self.ws.w_enc_eff
        } else {
            self.state.params.w_enc()
        }
    }

    /// `pre = (x - b_dec) W_enc^T + b_enc` into the workspace (also fills `xc`).
    fn encode(&mut self, x: &[f32], rows: usize) {
        self.refresh_encoder();
        let shape = self.state.shape();
        let (d, f) = (shape.d_in, shape.d_sae);
        let mut xc = std::mem::take(&mut self.ws.xc);
        let mut pre = std::mem::take(&mut self.ws.pre);
        hugepage::resize_f32(&mut xc, rows * d);
        hugepage::resize_f32(&mut pre, rows * f);
        let p = &self.state.params;
        if encode::fold_pays(d) {
            let mut fold = std::mem::take(&mut self.ws.fold);
            encode::center_and_encode(x, p.b_dec(), self.encoder(), p.b_enc(), rows, &mut xc, &mut pre, &mut fold);
            self.ws.fold = fold;
        } else {
            encode::center(x, p.b_dec(), &mut xc);
            encode::encode(&xc, self.encoder(), p.b_enc(), rows, d, &mut pre);
        }
        self.ws.xc = xc;
        self.ws.pre = pre;
    }

    /// The training sparsifier applied to the workspace's `pre` (`in_step`: as a training step
    /// applies it, with feature choice's theta phase).
    fn select_training(&self, rows: usize, in_step: bool) -> SparseCodes {
        let s = &self.state;
        let m = plan::budgets(&self.cfg, &s.density, rows, s.step);
        let filter = if in_step && plan::in_theta_phase(&self.cfg, s.step) {
            threshold::prefilter(&s.theta, &s.theta_set)
        } else {
            vec![]
        };
        let sel = if in_step {
            plan::step_rule(&self.cfg, &m, &s.theta, &filter, s.step)
        } else {
            plan::training(&self.cfg, &m, &s.theta)
        };
        sparsify::select(&self.ws.pre, rows, self.cfg.d_sae, &sel)
    }

    /// Per aux loss, the latents eligible for it at this step (ascending), this batch's `codes`
    /// counted in.
    fn aux_candidates(&self, codes: &SparseCodes, rows: usize) -> Vec<(AuxKind, Vec<u32>)> {
        if self.cfg.aux_kinds().is_empty() {
            return vec![];
        }
        let s = &self.state;
        plan::aux_candidates(&self.cfg, s.step, &s.since_fired, &s.density, &codes.col_counts(), rows)
    }

    fn dead_count(&self) -> usize {
        super::tracking::dead_count(&self.cfg, &self.state.since_fired)
    }

    /// Dead-latent counters, running densities and inference thresholds after a step.
    fn update_tracking(&mut self, codes: &SparseCodes, rows: usize) {
        let s = &mut self.state;
        super::tracking::record_firing(&self.cfg, &mut s.since_fired, &mut s.density, &codes.col_counts(), rows);
        if !threshold::tracked_at(&self.cfg, s.step) {
            return;
        }
        let min_kept = threshold::per_latent_min(codes);
        threshold::update_thresholds(&self.cfg, s.step, &mut s.theta, &mut s.theta_set, &min_kept);
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn step(&mut self, batch: &Batch, lr: f32) -> Result<StepStats> {
        ensure!(
            batch.d_in == self.state.shape().d_in,
            "batch width {} does not match d_in {}",
            batch.d_in,
            self.state.shape().d_in
        );
        let x = batch.to_f32();
        let unit = self.cfg.decoder_norm == DecoderNorm::Unit;
        let pass = self.gradients(&x, batch.rows, unit)?;
        self.apply(pass.grad, &pass.codes, batch.rows, lr);
        Ok(pass.stats)
    }

    fn infer(&mut self, batch: &Batch, mode: InferMode) -> Result<Inference> {
        let shape = self.state.shape();
        let (d, f) = (shape.d_in, shape.d_sae);
        ensure!(batch.d_in == d, "batch width {} does not match d_in {}", batch.d_in, d);
        let rows = batch.rows;
        let x = batch.to_f32();
        self.encode(&x, rows);
        let codes = match mode {
            InferMode::Exported => {
                let m = plan::budgets(&self.cfg, &self.state.density, rows, self.state.step);
                let theta = threshold::exported(&self.state.theta, &self.state.theta_set);
                let sel = plan::exported(&self.cfg, &m, &theta);
                sparsify::select(&self.ws.pre, rows, f, &sel)
            }
            InferMode::Training => self.select_training(rows, false),
        };
        let mut x_hat = vec![0f32; rows * d];
        decode::decode(&codes, self.state.params.w_dec(), Some(self.state.params.b_dec()), d, &mut x_hat);
        Ok(Inference { codes, x_hat })
    }

    fn state(&self) -> Result<TrainState> {
        Ok(self.state.clone())
    }

    fn set_thresholds(&mut self, theta: &[f32], theta_set: &[bool]) -> Result<()> {
        ensure!(
            theta.len() == self.cfg.d_sae && theta_set.len() == theta.len(),
            "thresholds for {} latents",
            theta.len()
        );
        self.state.theta.copy_from_slice(theta);
        self.state.theta_set.copy_from_slice(theta_set);
        Ok(())
    }

    fn take_phase_times(&mut self) -> PhaseTimes {
        std::mem::take(&mut self.times)
    }
}

/// The result of a forward + backward pass, before the optimiser touches anything.
pub struct GradientPass {
    pub stats: StepStats,
    /// Gradient of the total loss w.r.t. the trainable parameters (A under aligned training).
    pub grad: Params,
    pub codes: SparseCodes,
    /// Latents that were aux-loss candidates at this step (summed over the aux losses).
    pub aux_candidates: usize,
}

/// What the decode phase produced: the loss sums and dL/dpre at the kept entries.
struct Decoded {
    sse: f64,
    total_var: f64,
    dpre: Vec<f32>,
}

/// The aux loss's codes, as sparse codes with dL/dpre at their entries, or as a dense block
/// over the candidates whose products run as GEMMs.
enum AuxCodes {
    Sparse { codes: SparseCodes, dpre: Vec<f32> },
    Block(dense::Block),
}

/// An aux loss's value, codes and reconstruction gradient.
struct AuxPass {
    loss: f64,
    codes: AuxCodes,
    g: Vec<f32>,
}

impl CpuBackend {
    /// Forward and sparse backward on `x` (rows x d). With `project`, each decoder gradient row
    /// has its component along the row removed (SPEC "Decoder constraint"); the raw gradient
    /// is what finite differences check.
    pub fn gradients(&mut self, x: &[f32], rows: usize, project: bool) -> Result<GradientPass> {
        let shape = self.state.shape();
        let d = shape.d_in;
        ensure!(x.len() == rows * d, "batch has {} values, expected {} x {}", x.len(), rows, d);
        ensure!(rows > 0, "empty batch");

        let t0 = Instant::now();
        self.encode(x, rows);
        let t1 = Instant::now();
        let codes = self.select_training(rows, true);
        let t2 = Instant::now();
        let candidates = self.aux_candidates(&codes, rows);
        let dense = self.dense_products(&codes);
        let aux_reads_residual = candidates.iter().any(|(_, c)| !c.is_empty());
        let mut dec = self.decode_phase(&codes, x, rows, dense, aux_reads_residual);
        let t3 = Instant::now();
        let l1 = self.cfg.sparsifier.has_l1().then(|| {
            let lambda = self.cfg.l1_lambda(self.state.step, rows);
            L1Terms::new(&codes, self.state.params.w_dec(), d, lambda, &mut dec.dpre)
        });
        let mut aux: Vec<AuxPass> = candidates.iter().filter_map(|(_, c)| self.aux_phase(c, rows, dense)).collect();
        let grad = self.latent_grads(&codes, &dec.dpre, &mut aux, l1.as_ref(), project, dense);
        let t4 = Instant::now();

        self.times.encode += (t1 - t0).as_secs_f64();
        self.times.select += (t2 - t1).as_secs_f64();
        self.times.decode += (t3 - t2).as_secs_f64();
        self.times.backward += (t4 - t3).as_secs_f64();
        let aux_loss = aux.iter().map(|a| a.loss).sum();
        let l1_loss = l1.as_ref().map_or(0.0, |l| l.loss);
        let stats =
            StepStats::from_sums(dec.sse, dec.total_var, aux_loss, l1_loss, codes.nnz(), rows, d, self.dead_count());
        let aux_candidates = candidates.iter().map(|(_, c)| c.len()).sum();
        Ok(GradientPass { stats, grad, codes, aux_candidates })
    }

    /// Whether this step's products with the main codes run as dense GEMMs (`--dense-codes`).
    fn dense_products(&self, codes: &SparseCodes) -> bool {
        match self.cfg.dense_codes {
            DenseCodes::Never => false,
            DenseCodes::Always => true,
            DenseCodes::Auto => dense::dense_is_cheaper(codes.nnz(), codes.rows, codes.cols),
        }
    }

    /// Decode with the loss sums, `G = dL_rec/dx_hat = (2/B)(x_hat - x)` and (with
    /// `keep_residual`, for the aux losses, or on the dense path) the residual into the
    /// workspace, and `dZ = G W_dec^T` at the kept entries.
    fn decode_phase(
        &mut self,
        codes: &SparseCodes,
        x: &[f32],
        rows: usize,
        dense: bool,
        keep_residual: bool,
    ) -> Decoded {
        let d = self.state.shape().d_in;
        let mut residual = std::mem::take(&mut self.ws.residual);
        let mut g = std::mem::take(&mut self.ws.g);
        if dense || keep_residual {
            hugepage::resize_f32(&mut residual, rows * d);
        } else {
            // A stale residual must not be read by mistake.
            residual.clear();
        }
        hugepage::resize_f32(&mut g, rows * d);
        let scale = 2.0 / rows as f32;
        let mut dpre = vec![0f32; codes.nnz()];
        let p = &self.state.params;
        let (sse, _cos) = if dense {
            dense::scatter(codes, &codes.val, &mut self.ws.z_dense);
            let (z, work) = (&self.ws.z_dense, &mut self.ws.work);
            dense::decode_residual_grads(
                codes,
                z,
                p.w_dec(),
                p.b_dec(),
                x,
                scale,
                &mut residual,
                &mut g,
                &mut dpre,
                work,
            )
        } else {
            let res = keep_residual.then_some(&mut residual[..]);
            decode::decode_residual_grads(codes, p.w_dec(), p.b_dec(), x, scale, res, &mut g, &mut dpre)
        };
        let total_var = decode::total_variance(x, d);
        self.ws.residual = residual;
        self.ws.g = g;
        Decoded { sse, total_var, dpre }
    }

    /// The aux loss on the workspace's residual from the top `k_aux` candidates per token
    /// (None when there are no candidates or none of them is positive).
    /// `main_dense`: the main codes take the dense path this step, and so do these (the dense
    /// path adds the aux rows to the GEMMs' results; it has no sparse group to merge with).
    fn aux_phase(&self, candidates: &[u32], rows: usize, main_dense: bool) -> Option<AuxPass> {
        if candidates.is_empty() {
            return None;
        }
        let (d, f) = (self.state.shape().d_in, self.cfg.d_sae);
        let w_dec = self.state.params.w_dec();
        let k_aux = self.cfg.k_aux_for(d);
        // The aux codes fill a good part of B x candidates (k_aux of a few hundred dead latents per
        // token): selected straight into a dense block, their products are GEMMs of that width.
        let codes = if self.cfg.dense_codes == DenseCodes::Never {
            AuxCodes::Sparse {
                codes: sparsify::select(&self.ws.pre, rows, f, &plan::aux(&self.cfg, candidates, d)),
                dpre: vec![],
            }
        } else {
            let block = dense::Block::select(&self.ws.pre, rows, f, candidates, k_aux, w_dec, d);
            let keep_dense = self.cfg.dense_codes == DenseCodes::Always
                || main_dense
                || dense::dense_is_cheaper(block.nnz, rows, candidates.len());
            if keep_dense {
                AuxCodes::Block(block)
            } else {
                AuxCodes::Sparse { codes: block.to_codes(rows, f), dpre: vec![] }
            }
        };
        let e_hat = match &codes {
            AuxCodes::Block(bl) if bl.nnz > 0 => bl.decode(rows, d),
            AuxCodes::Sparse { codes, .. } if codes.nnz() > 0 => {
                let mut e_hat = vec![0f32; rows * d];
                decode::decode(codes, w_dec, None, d, &mut e_hat);
                e_hat
            }
            _ => return None,
        };
        let (loss, g) = decode::aux_loss_and_grad(&self.ws.residual, e_hat, d, self.cfg.aux_alpha as f32);
        let codes = match codes {
            AuxCodes::Sparse { codes, .. } => {
                let dpre = backward::code_grads(&codes, &g, w_dec, d);
                AuxCodes::Sparse { codes, dpre }
            }
            block => block,
        };
        Some(AuxPass { loss, codes, g })
    }

    /// Latent-row gradients of W_enc, b_enc, W_dec from the main (and aux) codes, the L1 term,
    /// the aligned map and the projection; then the b_dec gradient.
    fn latent_grads(
        &mut self,
        codes: &SparseCodes,
        dpre: &[f32],
        aux: &mut [AuxPass],
        l1: Option<&L1Terms>,
        project: bool,
        dense: bool,
    ) -> Params {
        let shape = self.state.shape();
        let d = shape.d_in;
        let mut grad = self.ws.grad.take().unwrap_or_else(|| Params::zeros(shape));
        // Aux groups on the dense block path are added after the sparse ones.
        let mut groups = vec![];
        if !dense {
            groups.push(Contribution { codes, dpre, g: &self.ws.g });
        }
        let mut blocks = vec![];
        for a in aux.iter_mut() {
            match &mut a.codes {
                AuxCodes::Sparse { codes, dpre } => groups.push(Contribution { codes, dpre, g: &a.g }),
                AuxCodes::Block(bl) => blocks.push((bl, &a.g)),
            }
        }
        let col_sums = linalg::column_sums(&self.ws.g, d);
        let params = self.state.params.parts();
        let gp = grad.parts_mut();
        let (a_all, w_all) = (params.w_enc, params.w_dec);
        let is_aligned = self.cfg.aligned;
        let extra = |i: usize, touched: bool, ge: &mut [f32], gd: &mut [f32]| {
            if !touched {
                return;
            }
            let w = &w_all[i * d..(i + 1) * d];
            if let Some(l1) = l1 {
                l1.add_row_grad(i, w, gd);
            }
            if is_aligned {
                let a = &a_all[i * d..(i + 1) * d];
                let g_eff = ge.to_vec();
                aligned::backprop_row(a, w, &g_eff, ge, gd);
            }
            if project {
                adam::project_out(gd, w);
            }
        };
        if !dense && blocks.is_empty() {
            backward::latent_row_grads(&groups, &self.ws.xc, d, gp.w_enc, gp.b_enc, gp.w_dec, extra);
        } else {
            // Some part on the dense path: every contribution first, then `extra` on each row.
            let mut touched = if dense {
                let z = &mut self.ws.z_dense;
                dense::latent_row_grads(codes, z, dpre, &self.ws.g, &self.ws.xc, d, gp.w_enc, gp.b_enc, gp.w_dec)
            } else {
                backward::latent_row_grads(&groups, &self.ws.xc, d, gp.w_enc, gp.b_enc, gp.w_dec, |_, _, _, _| {});
                let mut touched = vec![false; shape.d_sae];
                for g in &groups {
                    for &i in &g.codes.idx {
                        touched[i as usize] = true;
                    }
                }
                touched
            };
            for (bl, g) in blocks {
                bl.add_row_grads(g, &self.ws.xc, d, gp.w_enc, gp.b_enc, gp.w_dec, &mut touched);
            }
            use rayon::prelude::*;
            gp.w_enc.par_chunks_mut(d).zip(gp.w_dec.par_chunks_mut(d)).enumerate().for_each(|(i, (ge, gd))| {
                extra(i, touched[i], ge, gd);
            });
        }
        let db_dec = backward::b_dec_grad(&col_sums, self.encoder(), gp.b_enc, d);
        gp.b_dec.copy_from_slice(&db_dec);
        grad
    }

    /// Adam step with `grad` (already projected; clipped here under --grad-clip, with AdamW's
    /// decay under --weight-decay), decoder renormalisation, then the dead-latent, density and
    /// threshold bookkeeping for the batch's `codes`.
    pub fn apply(&mut self, grad: Params, codes: &SparseCodes, rows: usize, lr: f32) {
        let started = Instant::now();
        let cfg = &self.cfg;
        let d = self.state.shape().d_in;
        let t = self.state.step + 1;
        let clip = cfg.grad_clip as f32;
        let gscale = if clip > 0.0 { clip::coefficient(clip::sum_sq(&grad.data), clip) } else { 1.0 };
        let h = adam::AdamHyper {
            lr,
            beta1: cfg.adam_beta1 as f32,
            beta2: cfg.adam_beta2 as f32,
            eps: cfg.adam_eps as f32,
            t,
            decay: adam::decay_factor(lr, cfg.weight_decay),
            gscale,
        };
        let s = &mut self.state;
        // W_enc and W_dec with weight decay, the biases without; W_dec rows fused with their
        // renormalisation (or plainly too when decoder norms are free).
        let [_, b_enc, dec0, dec1, _] = s.params.shape.offsets();
        let end = s.params.data.len();
        let (p, g, m, v) = (&mut s.params.data, &grad.data, &mut s.adam_m.data, &mut s.adam_v.data);
        let mut range = |r: std::ops::Range<usize>, h: adam::AdamHyper, renorm: bool| {
            let (p, g, m, v) = (&mut p[r.clone()], &g[r.clone()], &mut m[r.clone()], &mut v[r]);
            if renorm {
                adam::adam_step_renorm_rows(p, g, m, v, d, h)
            } else {
                adam::adam_step(p, g, m, v, h)
            }
        };
        range(0..b_enc, h, false);
        range(b_enc..dec0, h.without_decay(), false);
        range(dec0..dec1, h, cfg.decoder_norm == DecoderNorm::Unit);
        range(dec1..end, h.without_decay(), false);
        self.ws.grad = Some(grad);
        self.update_tracking(codes, rows);
        self.state.step = t;
        self.times.optimizer += started.elapsed().as_secs_f64();
    }
}
