//! The CUDA training step: the CPU backend's step (backend/cpu/mod.rs) with each stage on the
//! device. Parameters, gradients, Adam m and v live on the device (one allocation each); the
//! small per-latent tracking state (dead counters, densities, theta) lives on the host and is
//! updated with the CPU's own code from per-latent counts and minima computed on the device.

use super::device::{at, Dev, DevBuf, KArg, NULL};
use super::launch as L;
use super::nvtx;
use crate::backend::{Backend, InferMode, Inference, PhaseTimes, StepStats};
use crate::config::{EncoderKind, Precision, SparsifierKind, TrainConfig};
use crate::data::{Batch, BatchData};
use crate::model::{Params, Shape, TrainState};
use crate::sparse::SparseCodes;
use anyhow::{anyhow, ensure, Result};
use cudarc::cublas::{result as blas, sys as bsys};

/// A selection rule with its budgets resolved (the device twin of `sparsify::Selection`).
#[derive(Clone, Debug)]
pub enum Rule {
    TopK(usize),
    BatchTopK(usize),
    Wta(Vec<u32>),
    Hybrid(Vec<u32>, usize),
    /// relu (false) or jumprelu with the theta uploaded to the workspace (true).
    Theta(bool),
    /// aux: top k among the latents marked in the workspace's candidate mask.
    Aux(usize),
}

/// Sparse codes on the device (CSR by token, ascending latent) and their per-latent view.
pub struct DevCodes {
    pub nnz: usize,
    cap: usize,
    pub row_ptr: DevBuf,
    pub idx: DevBuf,
    pub val: DevBuf,
    pub dpre: DevBuf,
    col_ptr: DevBuf,
    cursor: DevBuf,
    tok_a: DevBuf,
    pos_a: DevBuf,
    tok: DevBuf,
    pos: DevBuf,
}

impl DevCodes {
    fn new(dev: &Dev, rows: usize, f: usize, cap: usize) -> Result<Self> {
        let cap = cap.max(1);
        Ok(Self {
            nnz: 0,
            cap,
            row_ptr: dev.alloc(4 * (rows + 1))?,
            idx: dev.alloc(4 * cap)?,
            val: dev.alloc(4 * cap)?,
            dpre: dev.alloc(4 * cap)?,
            col_ptr: dev.alloc(4 * (f + 1))?,
            cursor: dev.alloc(4 * f)?,
            tok_a: dev.alloc(4 * cap)?,
            pos_a: dev.alloc(4 * cap)?,
            tok: dev.alloc(4 * cap)?,
            pos: dev.alloc(4 * cap)?,
        })
    }
    fn reserve(&mut self, dev: &Dev, nnz: usize) -> Result<()> {
        if nnz > self.cap {
            let cap = nnz + nnz / 4;
            for b in [
                &mut self.idx,
                &mut self.val,
                &mut self.dpre,
                &mut self.tok_a,
                &mut self.pos_a,
                &mut self.tok,
                &mut self.pos,
            ] {
                *b = dev.alloc(4 * cap)?;
            }
            self.cap = cap;
        }
        Ok(())
    }
    /// Host copy (CSR).
    pub fn download(&self, rows: usize, cols: usize) -> Result<SparseCodes> {
        let rp: Vec<u32> = self.row_ptr.to_vec(rows + 1)?;
        Ok(SparseCodes {
            rows,
            cols,
            row_ptr: rp.iter().map(|&v| v as usize).collect(),
            idx: self.idx.to_vec(self.nnz)?,
            val: self.val.to_vec(self.nnz)?,
        })
    }
}

/// Buffers sized for one batch size.
pub struct Ws {
    pub rows: usize,
    pub x: DevBuf,
    x_raw: DevBuf,
    pub xc: DevBuf,
    pub x_hat: DevBuf,
    resid: DevBuf,
    pub g: DevBuf,
    g_aux: DevBuf,
    e_hat: DevBuf,
    pub pre: DevBuf,
    w_eff: DevBuf,
    xc_bf16: DevBuf,
    w_bf16: DevBuf,
    thr_r: DevBuf,
    cut_r: DevBuf,
    need_r: DevBuf,
    eq_r: DevBuf,
    counts_r: DevBuf,
    thr_c: DevBuf,
    cut_c: DevBuf,
    kbuf: DevBuf,
    pub cmask: DevBuf,
    pub theta: DevBuf,
    bstate: DevBuf,
    hist: DevBuf,
    colsum_x: DevBuf,
    colsum_r: DevBuf,
    colsum_g: DevBuf,
    acc: DevBuf,
    norms: DevBuf,
    l1_sums: DevBuf,
    lat_counts: DevBuf,
    lat_min: DevBuf,
    pub main: DevCodes,
    pub aux: DevCodes,
}

impl Ws {
    pub fn new(dev: &Dev, shape: Shape, rows: usize, k: usize, aligned: bool, precision: Precision) -> Result<Self> {
        let (d, f) = (shape.d_in, shape.d_sae);
        let bd = rows * d;
        ensure!((rows as u64) * (f as u64) < (1u64 << 32) - 1, "batch x d_sae must stay below 2^32 entries");
        let bf16 = precision == Precision::Bf16;
        Ok(Self {
            rows,
            x: dev.alloc_f32(bd)?,
            x_raw: dev.alloc(2 * bd)?,
            xc: dev.alloc_f32(bd)?,
            x_hat: dev.alloc_f32(bd)?,
            resid: dev.alloc_f32(bd)?,
            g: dev.alloc_f32(bd)?,
            g_aux: dev.alloc_f32(bd)?,
            e_hat: dev.alloc_f32(bd)?,
            pre: dev.alloc_f32(rows * f)?,
            w_eff: dev.alloc_f32(if aligned { f * d } else { 0 })?,
            xc_bf16: dev.alloc(if bf16 { 2 * bd } else { 0 })?,
            w_bf16: dev.alloc(if bf16 { 2 * f * d } else { 0 })?,
            thr_r: dev.alloc(4 * rows)?,
            cut_r: dev.alloc(4 * rows)?,
            need_r: dev.alloc(4 * rows)?,
            eq_r: dev.alloc(4 * rows)?,
            counts_r: dev.alloc(4 * rows)?,
            thr_c: dev.alloc(4 * f)?,
            cut_c: dev.alloc(4 * f)?,
            kbuf: dev.alloc(4 * f)?,
            cmask: dev.alloc(f)?,
            theta: dev.alloc(4 * f)?,
            bstate: dev.alloc(16)?,
            hist: dev.alloc(4 * 256)?,
            colsum_x: dev.alloc(8 * d)?,
            colsum_r: dev.alloc(8 * d)?,
            colsum_g: dev.alloc(8 * d)?,
            acc: dev.alloc(8 * 8)?,
            norms: dev.alloc(4 * f)?,
            l1_sums: dev.alloc(4 * f)?,
            lat_counts: dev.alloc(4 * f)?,
            lat_min: dev.alloc(4 * f)?,
            main: DevCodes::new(dev, rows, f, rows * k.max(1))?,
            aux: DevCodes::new(dev, rows, f, rows * (d / 2).max(1))?,
        })
    }
}

/// Run a selection rule on `ws.pre` (rows x f) into `ws.main` (or `ws.aux`).
/// Run `rule` on `ws.pre` into the main (or aux) codes. `hist_ready`: the encoder already built
/// batchtopk's first radix histogram in `ws.hist` (the fused encoder), so that pass is skipped.
pub fn select(dev: &Dev, ws: &mut Ws, f: usize, rule: &Rule, into_aux: bool, hist_ready: bool) -> Result<()> {
    let _r = nvtx::range("select");
    let rows = ws.rows;
    let (r32, f32_) = (rows as u32, f as u32);
    let row_lines = L::per_line(rows, f);
    let col_lines = L::per_line(f, rows);
    let radix = |lines: L::Launch,
                 transposed: i32,
                 k: u32,
                 kbuf: KArg,
                 cmask: KArg,
                 ft: KArg,
                 fc: KArg,
                 thr: &DevBuf,
                 cut: &DevBuf| {
        dev.launch(
            "sel_line_radix",
            lines,
            &[
                (&ws.pre).into(),
                r32.into(),
                f32_.into(),
                transposed.into(),
                k.into(),
                kbuf,
                cmask,
                ft,
                fc,
                thr.into(),
                cut.into(),
            ],
        )
    };
    // (mode, theta, T, C, cmask, fT, fc) of the final mask.
    let rule_args: (i32, KArg, KArg, KArg, KArg, KArg, KArg) = match rule {
        Rule::TopK(k) => {
            radix(row_lines, 0, *k as u32, NULL, NULL, NULL, NULL, &ws.thr_r, &ws.cut_r)?;
            (1, NULL, (&ws.thr_r).into(), (&ws.cut_r).into(), NULL, NULL, NULL)
        }
        Rule::Aux(k) => {
            radix(row_lines, 0, *k as u32, NULL, (&ws.cmask).into(), NULL, NULL, &ws.thr_r, &ws.cut_r)?;
            (1, NULL, (&ws.thr_r).into(), (&ws.cut_r).into(), (&ws.cmask).into(), NULL, NULL)
        }
        Rule::BatchTopK(k) => {
            let total = (*k as u64) * rows as u64;
            ensure!(total < u32::MAX as u64, "k * batch too large");
            ws.bstate.upload(&[0u32, 0, total as u32, 0])?;
            if !hist_ready {
                ws.hist.zero()?;
            }
            let n = (rows * f) as u64;
            for shift in [24u32, 16, 8, 0] {
                if !(hist_ready && shift == 24) {
                    dev.launch(
                        "sel_batch_hist",
                        L::batch_hist(n),
                        &[(&ws.pre).into(), n.into(), (&ws.bstate).into(), (&ws.hist).into(), shift.into()],
                    )?;
                }
                dev.launch(
                    "sel_batch_pick",
                    L::single_thread(),
                    &[(&ws.bstate).into(), (&ws.hist).into(), shift.into()],
                )?;
            }
            dev.launch(
                "sel_row_eq_count",
                row_lines,
                &[(&ws.pre).into(), f32_.into(), (&ws.bstate).into(), (&ws.eq_r).into()],
            )?;
            dev.launch(
                "sel_batch_split",
                L::single_thread(),
                &[(&ws.bstate).into(), (&ws.eq_r).into(), r32.into(), (&ws.thr_r).into(), (&ws.need_r).into()],
            )?;
            dev.launch(
                "sel_row_ties",
                row_lines,
                &[
                    (&ws.pre).into(),
                    r32.into(),
                    f32_.into(),
                    (&ws.thr_r).into(),
                    (&ws.need_r).into(),
                    (&ws.cut_r).into(),
                ],
            )?;
            (1, NULL, (&ws.thr_r).into(), (&ws.cut_r).into(), NULL, NULL, NULL)
        }
        Rule::Wta(m) => {
            ensure!(m.len() == f, "budgets for {} latents, expected {f}", m.len());
            ws.kbuf.upload(m)?;
            radix(col_lines, 1, 0, (&ws.kbuf).into(), NULL, NULL, NULL, &ws.thr_c, &ws.cut_c)?;
            (2, NULL, (&ws.thr_c).into(), (&ws.cut_c).into(), NULL, NULL, NULL)
        }
        Rule::Hybrid(m, k_max) => {
            ensure!(m.len() == f, "budgets for {} latents, expected {f}", m.len());
            ws.kbuf.upload(m)?;
            radix(col_lines, 1, 0, (&ws.kbuf).into(), NULL, NULL, NULL, &ws.thr_c, &ws.cut_c)?;
            let (ft, fc): (KArg, KArg) = ((&ws.thr_c).into(), (&ws.cut_c).into());
            radix(row_lines, 0, *k_max as u32, NULL, NULL, ft, fc, &ws.thr_r, &ws.cut_r)?;
            (1, NULL, (&ws.thr_r).into(), (&ws.cut_r).into(), NULL, ft, fc)
        }
        Rule::Theta(with_theta) => {
            let theta = if *with_theta { (&ws.theta).into() } else { NULL };
            (0, theta, NULL, NULL, NULL, NULL, NULL)
        }
    };
    let (mode, theta, t, c, cmask, ft, fc) = rule_args;
    let codes = if into_aux { &mut ws.aux } else { &mut ws.main };
    dev.launch(
        "sel_mask_count",
        row_lines,
        &[(&ws.pre).into(), f32_.into(), mode.into(), theta, t, c, cmask, ft, fc, (&ws.counts_r).into()],
    )?;
    dev.launch("exclusive_scan", L::scan(), &[(&ws.counts_r).into(), r32.into(), (&codes.row_ptr).into()])?;
    let mut nnz = [0u32];
    codes.row_ptr.download_at(rows, &mut nnz)?;
    codes.nnz = nnz[0] as usize;
    codes.reserve(dev, codes.nnz)?;
    dev.launch(
        "sel_mask_fill",
        row_lines,
        &[
            (&ws.pre).into(),
            f32_.into(),
            mode.into(),
            theta,
            t,
            c,
            cmask,
            ft,
            fc,
            (&codes.row_ptr).into(),
            (&codes.idx).into(),
            (&codes.val).into(),
        ],
    )
}

/// Build the per-latent view of `codes` (counting sort by latent, segments sorted by token).
/// `dpre[e] = g_b . W_dec_i` at every kept entry of `codes` (main or aux).
fn code_grads(dev: &Dev, codes: &DevCodes, g: &DevBuf, w_dec: KArg, d32: u32, rows: usize) -> Result<()> {
    dev.launch(
        "code_grads",
        L::per_line(rows, 128),
        &[(&codes.row_ptr).into(), (&codes.idx).into(), g.into(), w_dec, d32.into(), (&codes.dpre).into()],
    )
}

fn build_csc(dev: &Dev, codes: &DevCodes, rows: usize, f: usize) -> Result<()> {
    let nnz = codes.nnz as u32;
    codes.cursor.zero()?;
    dev.launch("csc_count", L::elementwise(nnz as u64), &[(&codes.idx).into(), nnz.into(), (&codes.cursor).into()])?;
    dev.launch("exclusive_scan", L::scan(), &[(&codes.cursor).into(), (f as u32).into(), (&codes.col_ptr).into()])?;
    codes.cursor.zero()?;
    dev.launch(
        "csc_fill",
        L::per_line(rows, 64),
        &[
            (&codes.row_ptr).into(),
            (&codes.idx).into(),
            (&codes.col_ptr).into(),
            (&codes.cursor).into(),
            (&codes.tok_a).into(),
            (&codes.pos_a).into(),
        ],
    )?;
    dev.launch(
        "csc_sort",
        L::per_line(f, 64),
        &[
            (&codes.col_ptr).into(),
            (&codes.tok_a).into(),
            (&codes.pos_a).into(),
            (&codes.tok).into(),
            (&codes.pos).into(),
        ],
    )
}

pub struct CudaBackend {
    cfg: TrainConfig,
    pub dev: Dev,
    shape: Shape,
    step: u64,
    theta: Vec<f32>,
    theta_set: Vec<bool>,
    since_fired: Vec<u64>,
    density: Vec<f32>,
    params: DevBuf,
    grads: DevBuf,
    adam_m: DevBuf,
    adam_v: DevBuf,
    ws: Option<Ws>,
    /// Per-phase wall time (`sae bench step`): off in training, since it synchronises the
    /// device at every phase boundary.
    timing: bool,
    phases: PhaseTimes,
}

/// Wall time between phase boundaries, each one a device synchronisation (when on).
struct PhaseClock {
    on: bool,
    t: std::time::Instant,
}

impl PhaseClock {
    fn start(on: bool, dev: &Dev) -> Result<Self> {
        if on {
            dev.sync()?;
        }
        Ok(Self { on, t: std::time::Instant::now() })
    }

    /// Add the time since the last boundary to `slot`.
    fn lap(&mut self, dev: &Dev, slot: &mut f64) -> Result<()> {
        if self.on {
            dev.sync()?;
            let now = std::time::Instant::now();
            *slot += (now - self.t).as_secs_f64();
            self.t = now;
        }
        Ok(())
    }
}

impl CudaBackend {
    pub fn new(cfg: TrainConfig, state: TrainState) -> Result<Self> {
        Self::on(Dev::open()?, cfg, state)
    }

    /// The backend on a given device (the GPU, or `Dev::open_emulator()`).
    pub fn on(dev: Dev, cfg: TrainConfig, state: TrainState) -> Result<Self> {
        let shape = state.shape();
        ensure!(shape.d_sae == cfg.d_sae, "state has d_sae {} but the config says {}", shape.d_sae, cfg.d_sae);
        let params = dev.upload(&state.params.data)?;
        let grads = dev.alloc_f32(shape.len())?;
        let adam_m = dev.upload(&state.adam_m.data)?;
        let adam_v = dev.upload(&state.adam_v.data)?;
        Ok(Self {
            cfg,
            dev,
            shape,
            step: state.step,
            theta: state.theta,
            theta_set: state.theta_set,
            since_fired: state.since_fired,
            density: state.density,
            params,
            grads,
            adam_m,
            adam_v,
            ws: None,
            timing: false,
            phases: PhaseTimes::default(),
        })
    }

    /// Seconds per encoder product (GEMM and epilogue, for this config's encoder and rule) on
    /// `batch`, averaged over `reps` launches after one warm-up.
    pub fn time_encoder(&mut self, batch: &Batch, reps: usize) -> Result<f64> {
        let rule = self.training_rule(batch.rows);
        self.forward_encode(batch, &rule)?;
        self.dev.sync()?;
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            self.encoder_product(batch.rows, &rule)?;
        }
        self.dev.sync()?;
        Ok(t.elapsed().as_secs_f64() / reps.max(1) as f64)
    }

    /// Time each phase of `step` (synchronising the device between phases) for
    /// `take_phase_times`.
    pub fn time_phases(&mut self, on: bool) {
        self.timing = on;
    }

    fn ensure_ws(&mut self, rows: usize) -> Result<()> {
        if self.ws.as_ref().is_none_or(|w| w.rows != rows) {
            self.ws = None; // free first
            self.ws = Some(Ws::new(&self.dev, self.shape, rows, self.cfg.k, self.cfg.aligned, self.cfg.precision)?);
        }
        Ok(())
    }

    /// Per-latent budgets for feature choice (shared with the CPU backend).
    fn budgets(&self, rows: usize) -> Vec<u32> {
        let m = crate::backend::tracking::budgets(&self.cfg, &self.density, rows);
        m.into_iter().map(|v| v.min(u32::MAX as usize) as u32).collect()
    }

    fn training_rule(&self, rows: usize) -> Rule {
        let c = &self.cfg;
        match c.sparsifier {
            SparsifierKind::Topk => Rule::TopK(c.k),
            SparsifierKind::Batchtopk | SparsifierKind::MutualChoice => Rule::BatchTopK(c.k),
            SparsifierKind::Wta => Rule::Wta(self.budgets(rows)),
            SparsifierKind::Hybrid => Rule::Hybrid(self.budgets(rows), c.hybrid_k_max()),
            SparsifierKind::Relu => Rule::Theta(false),
            SparsifierKind::Jumprelu => Rule::Theta(true),
        }
    }

    /// Aux-loss candidates as a mask (shared rule with the CPU backend).
    fn aux_candidates(&self, rows: usize) -> Vec<bool> {
        let mut mask = vec![false; self.cfg.d_sae];
        for i in crate::backend::tracking::aux_candidates(&self.cfg, self.step, &self.since_fired, &self.density, rows)
        {
            mask[i as usize] = true;
        }
        mask
    }

    /// Upload the batch, centre it and run the encoder product into `ws.pre`, for selection by
    /// `rule`. Returns whether the encoder also built batchtopk's first radix histogram.
    fn forward_encode(&mut self, batch: &Batch, rule: &Rule) -> Result<bool> {
        let d = self.shape.d_in;
        ensure!(batch.d_in == d, "batch width {} does not match d_in {}", batch.d_in, d);
        let rows = batch.rows;
        ensure!(rows > 0, "empty batch");
        self.ensure_ws(rows)?;
        let dev = &self.dev;
        let ws = self.ws.as_ref().unwrap();
        let n = (rows * d) as u64;
        {
            let _r = nvtx::range("data");
            match &batch.data {
                BatchData::F32(v) => ws.x.upload(v)?,
                BatchData::F16(v) => {
                    ws.x_raw.upload(v)?;
                    dev.launch(
                        "convert_f16_to_f32",
                        L::elementwise(n),
                        &[(&ws.x_raw).into(), (&ws.x).into(), n.into()],
                    )?;
                }
                BatchData::Bf16(v) => {
                    ws.x_raw.upload(v)?;
                    dev.launch(
                        "convert_bf16_to_f32",
                        L::elementwise(n),
                        &[(&ws.x_raw).into(), (&ws.x).into(), n.into()],
                    )?;
                }
            }
        }
        let _r = nvtx::range("encode");
        let [_, _, _, o_bdec, _] = self.shape.offsets();
        dev.launch(
            "center",
            L::elementwise(n),
            &[(&ws.x).into(), at::<f32>(&self.params, o_bdec), (&ws.xc).into(), (d as u32).into(), n.into()],
        )?;
        self.encoder_product(rows, rule)
    }

    /// `ws.pre` from the centred batch in `ws.xc` (the encoder GEMM and its epilogue): what
    /// `sae bench step` times alone as the floor of a step.
    pub fn encoder_product(&self, rows: usize, rule: &Rule) -> Result<bool> {
        let (d, f) = (self.shape.d_in, self.shape.d_sae);
        let dev = &self.dev;
        let ws = self.ws.as_ref().unwrap();
        let [_, o_benc, o_wdec, _, _] = self.shape.offsets();
        let w: KArg = if self.cfg.aligned {
            dev.launch(
                "aligned_encoder",
                L::per_line(f, d),
                &[at::<f32>(&self.params, 0), at::<f32>(&self.params, o_wdec), (&ws.w_eff).into(), (d as u32).into()],
            )?;
            (&ws.w_eff).into()
        } else {
            at::<f32>(&self.params, 0)
        };
        let b_enc = at::<f32>(&self.params, o_benc);
        let KArg::Ptr(w_ptr) = w else { unreachable!() };
        match &dev.blas {
            Some(h) if self.cfg.encoder == EncoderKind::Cublas => {
                gemm_cublas(dev, h.handle, self.cfg.precision, ws, w_ptr, rows, f, d)?;
                let nf = (rows * f) as u64;
                dev.launch("bias_relu", L::elementwise(nf), &[(&ws.pre).into(), b_enc, (f as u32).into(), nf.into()])?;
                Ok(false)
            }
            _ => {
                // The threshold is exact to apply here: jumprelu keeps v > 0 and v > theta,
                // and every other rule only ever keeps v > 0.
                let theta: KArg = if matches!(rule, Rule::Theta(true)) {
                    ws.theta.upload(&self.theta)?;
                    (&ws.theta).into()
                } else {
                    NULL
                };
                let batch_hist = matches!(rule, Rule::BatchTopK(_));
                if batch_hist {
                    ws.hist.zero()?;
                }
                dev.launch(
                    "gemm_encode_fused",
                    L::gemm_fallback(rows, f),
                    &[
                        (&ws.xc).into(),
                        w,
                        b_enc,
                        theta,
                        (&ws.pre).into(),
                        (rows as u32).into(),
                        (f as u32).into(),
                        (d as u32).into(),
                        if batch_hist { (&ws.hist).into() } else { NULL },
                    ],
                )?;
                Ok(batch_hist)
            }
        }
    }

    /// Host bookkeeping after a step, from the device's per-latent firing counts and minimum
    /// kept values (`u32::MAX` bits: none kept). Shared with the CPU backend.
    fn update_tracking(&mut self, counts: &[u32], minbits: &[u32], rows: usize) {
        use crate::backend::tracking;
        tracking::record_firing(&self.cfg, &mut self.since_fired, &mut self.density, counts, rows);
        let min_kept: Vec<Option<f32>> = minbits.iter().map(|&b| (b != u32::MAX).then(|| f32::from_bits(b))).collect();
        tracking::update_thresholds(&self.cfg, self.step, &mut self.theta, &mut self.theta_set, &min_kept);
    }
}

/// pre (rows x f, row-major) = xc (rows x d) * W^T through cuBLAS; in column-major terms
/// pre^T (f x rows) = op_T(W as d x f) * xc^T (d x rows).
#[allow(clippy::too_many_arguments)]
fn gemm_cublas(
    dev: &Dev,
    h: bsys::cublasHandle_t,
    prec: Precision,
    ws: &Ws,
    w: u64,
    rows: usize,
    f: usize,
    d: usize,
) -> Result<()> {
    use bsys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    use bsys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
    if prec == Precision::Bf16 {
        // bf16 copies of both operands; f32 accumulation in cuBLAS.
        let (nw, nx) = ((f * d) as u64, (rows * d) as u64);
        dev.launch("convert_f32_to_bf16", L::elementwise(nw), &[KArg::Ptr(w), (&ws.w_bf16).into(), nw.into()])?;
        dev.launch("convert_f32_to_bf16", L::elementwise(nx), &[(&ws.xc).into(), (&ws.xc_bf16).into(), nx.into()])?;
    }
    let (m, n, k) = (f as i32, rows as i32, d as i32);
    let (alpha, beta) = (1.0f32, 0.0f32);
    let ap = &alpha as *const f32 as *const std::ffi::c_void;
    let bp = &beta as *const f32 as *const std::ffi::c_void;
    let pre = ws.pre.ptr() as *mut std::ffi::c_void;
    let r = unsafe {
        match prec {
            Precision::F32 => blas::sgemm(
                h,
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha,
                w as *const f32,
                k,
                ws.xc.ptr() as *const f32,
                k,
                &beta,
                pre as *mut f32,
                m,
            ),
            Precision::Tf32 => blas::gemm_ex(
                h,
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                m,
                n,
                k,
                ap,
                w as *const _,
                CUDA_R_32F,
                k,
                ws.xc.ptr() as *const _,
                CUDA_R_32F,
                k,
                bp,
                pre,
                CUDA_R_32F,
                m,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            ),
            Precision::Bf16 => blas::gemm_ex(
                h,
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                m,
                n,
                k,
                ap,
                ws.w_bf16.ptr() as *const _,
                CUDA_R_16BF,
                k,
                ws.xc_bf16.ptr() as *const _,
                CUDA_R_16BF,
                k,
                bp,
                pre,
                CUDA_R_32F,
                m,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            ),
        }
    };
    r.map_err(|e| anyhow!("cuBLAS encoder product ({prec:?}) failed: {e:?}"))
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        let origin = match &self.dev.origin {
            super::device::KernelOrigin::Fatbin => "fatbin".to_string(),
            super::device::KernelOrigin::Nvrtc(a) => format!("nvrtc {}", a.split(';').next().unwrap_or("")),
            super::device::KernelOrigin::Emulator => return "cuda emulator (host; fallback GEMM)".to_string(),
        };
        let gemm = if self.dev.blas.is_some() { "cuBLAS" } else { "fallback GEMM" };
        format!("cuda: {} (sm_{}{}; kernels {origin}; {gemm})", self.dev.name, self.dev.cc.0, self.dev.cc.1)
    }

    fn step(&mut self, batch: &Batch, lr: f32) -> Result<StepStats> {
        let _step = nvtx::range("step");
        self.dev.bind()?;
        let (d, f) = (self.shape.d_in, self.shape.d_sae);
        let rows = batch.rows;
        let mut ph = PhaseTimes::default();
        let mut clock = PhaseClock::start(self.timing, &self.dev)?;
        let rule = self.training_rule(rows);
        let hist_ready = self.forward_encode(batch, &rule)?;
        clock.lap(&self.dev, &mut ph.encode)?;
        let cfg = self.cfg.clone();
        let candidates = self.aux_candidates(rows);
        let n_cand = candidates.iter().filter(|&&c| c).count();
        let [_, o_benc, o_wdec, o_bdec, _] = self.shape.offsets();
        let dev = &self.dev;
        let ws = self.ws.as_mut().unwrap();
        let (r32, d32, f32_) = (rows as u32, d as u32, f as u32);
        let bd = (rows * d) as u64;
        let w_dec = at::<f32>(&self.params, o_wdec);

        select(dev, ws, f, &rule, false, hist_ready)?;
        clock.lap(dev, &mut ph.select)?;

        // ---- decode, loss statistics, G ----
        let r = nvtx::range("decode");
        ws.acc.zero()?;
        dev.launch(
            "decode_rows",
            L::per_line(rows, d),
            &[
                (&ws.main.row_ptr).into(),
                (&ws.main.idx).into(),
                (&ws.main.val).into(),
                w_dec,
                at::<f32>(&self.params, o_bdec),
                d32.into(),
                (&ws.x_hat).into(),
            ],
        )?;
        dev.launch("col_sums", L::per_column(d), &[(&ws.x).into(), r32.into(), d32.into(), (&ws.colsum_x).into()])?;
        dev.launch(
            "row_stats",
            L::per_line(rows, d),
            &[(&ws.x).into(), (&ws.x_hat).into(), (&ws.colsum_x).into(), r32.into(), d32.into(), at::<f64>(&ws.acc, 0)],
        )?;
        let scale = 2.0 / rows as f32;
        dev.launch(
            "residual_grad",
            L::elementwise(bd),
            &[(&ws.x).into(), (&ws.x_hat).into(), bd.into(), scale.into(), (&ws.resid).into(), (&ws.g).into()],
        )?;
        drop(r);
        clock.lap(dev, &mut ph.decode)?;

        let _b = nvtx::range("backward");
        let nnz = ws.main.nnz as u32;
        code_grads(dev, &ws.main, &ws.g, w_dec, d32, rows)?;
        let is_relu = cfg.sparsifier == SparsifierKind::Relu;
        let lambda = cfg.l1_coeff as f32 / rows as f32;
        if is_relu {
            ws.l1_sums.zero()?;
            dev.launch("row_norms", L::per_line(f, d), &[w_dec, d32.into(), (&ws.norms).into()])?;
            dev.launch(
                "l1_terms",
                L::elementwise(nnz as u64),
                &[
                    (&ws.main.idx).into(),
                    (&ws.main.val).into(),
                    nnz.into(),
                    (&ws.norms).into(),
                    lambda.into(),
                    (&ws.main.dpre).into(),
                    (&ws.l1_sums).into(),
                    at::<f64>(&ws.acc, 3),
                ],
            )?;
        }

        // ---- aux loss ----
        let mut aux_loss = 0.0;
        let mut aux_active = false;
        if n_cand > 0 {
            let mask: Vec<u8> = candidates.iter().map(|&c| c as u8).collect();
            ws.cmask.upload(&mask)?;
            select(dev, ws, f, &Rule::Aux(cfg.k_aux_for(d)), true, false)?;
            if ws.aux.nnz > 0 {
                aux_active = true;
                dev.launch(
                    "decode_rows",
                    L::per_line(rows, d),
                    &[
                        (&ws.aux.row_ptr).into(),
                        (&ws.aux.idx).into(),
                        (&ws.aux.val).into(),
                        w_dec,
                        NULL,
                        d32.into(),
                        (&ws.e_hat).into(),
                    ],
                )?;
                dev.launch(
                    "col_sums",
                    L::per_column(d),
                    &[(&ws.resid).into(), r32.into(), d32.into(), (&ws.colsum_r).into()],
                )?;
                dev.launch(
                    "aux_sums",
                    L::per_line(rows, d),
                    &[
                        (&ws.resid).into(),
                        (&ws.e_hat).into(),
                        (&ws.colsum_r).into(),
                        r32.into(),
                        d32.into(),
                        at::<f64>(&ws.acc, 4),
                    ],
                )?;
                let mut nd = [0f64; 2];
                ws.acc.download_at(4, &mut nd)?;
                let (num, den) = (nd[0], nd[1]);
                if den <= 0.0 || !den.is_finite() {
                    ws.g_aux.zero()?;
                } else {
                    aux_loss = cfg.aux_alpha * num / den;
                    let c = (2.0 * cfg.aux_alpha / den) as f32;
                    dev.launch(
                        "aux_grad",
                        L::elementwise(bd),
                        &[(&ws.resid).into(), (&ws.e_hat).into(), c.into(), bd.into(), (&ws.g_aux).into()],
                    )?;
                }
                code_grads(dev, &ws.aux, &ws.g_aux, w_dec, d32, rows)?;
            }
        }

        // ---- latent-row gradients ----
        let dw_enc = at::<f32>(&self.grads, 0);
        let db_enc = at::<f32>(&self.grads, o_benc);
        let dw_dec = at::<f32>(&self.grads, o_wdec);
        let lat = L::per_line(f, d);
        // Main codes first (accumulate = 0 overwrites the rows), then the aux codes on top.
        let mut groups = vec![(&ws.main, &ws.g, 0i32)];
        if aux_active {
            groups.push((&ws.aux, &ws.g_aux, 1i32));
        }
        for (codes, g, accumulate) in groups {
            build_csc(dev, codes, rows, f)?;
            dev.launch(
                "latent_grads",
                lat,
                &[
                    (&codes.col_ptr).into(),
                    (&codes.tok).into(),
                    (&codes.pos).into(),
                    (&codes.val).into(),
                    (&codes.dpre).into(),
                    g.into(),
                    (&ws.xc).into(),
                    d32.into(),
                    accumulate.into(),
                    dw_enc,
                    db_enc,
                    dw_dec,
                ],
            )?;
        }
        if is_relu || cfg.aligned {
            let aux_cp: KArg = if aux_active { (&ws.aux.col_ptr).into() } else { NULL };
            let (l1, norms): (KArg, KArg) =
                if is_relu { ((&ws.l1_sums).into(), (&ws.norms).into()) } else { (NULL, NULL) };
            dev.launch(
                "latent_finish",
                lat,
                &[
                    (&ws.main.col_ptr).into(),
                    aux_cp,
                    at::<f32>(&self.params, 0),
                    w_dec,
                    d32.into(),
                    l1,
                    norms,
                    lambda.into(),
                    (cfg.aligned as i32).into(),
                    dw_enc,
                    dw_dec,
                ],
            )?;
        }
        let w_enc_eff: KArg = if cfg.aligned { (&ws.w_eff).into() } else { at::<f32>(&self.params, 0) };
        dev.launch("col_sums", L::per_column(d), &[(&ws.g).into(), r32.into(), d32.into(), (&ws.colsum_g).into()])?;
        dev.launch(
            "bdec_grad",
            L::per_column(d),
            &[(&ws.colsum_g).into(), w_enc_eff, db_enc, f32_.into(), d32.into(), at::<f32>(&self.grads, o_bdec)],
        )?;
        drop(_b);
        clock.lap(dev, &mut ph.backward)?;

        // ---- optimiser: Adam (+ projection and renormalisation of decoder rows) ----
        let t = self.step + 1;
        let (b1, b2) = (cfg.adam_beta1 as f32, cfg.adam_beta2 as f32);
        // Same f32 -> f64 path as cpu::adam::adam_step, so both see identical step sizes.
        let bc1 = 1.0 - (b1 as f64).powf(t as f64);
        let bc2 = 1.0 - (b2 as f64).powf(t as f64);
        let step_size = (lr as f64 * bc2.sqrt() / bc1) as f32;
        let eps = (cfg.adam_eps as f32 as f64 * bc2.sqrt()) as f32;
        let (p, g, m, v) = (&self.params, &self.grads, &self.adam_m, &self.adam_v);
        let flat = |off: usize, n: usize| {
            dev.launch(
                "adam_flat",
                L::elementwise(n as u64),
                &[
                    at::<f32>(p, off),
                    at::<f32>(g, off),
                    at::<f32>(m, off),
                    at::<f32>(v, off),
                    (n as u64).into(),
                    b1.into(),
                    b2.into(),
                    step_size.into(),
                    eps.into(),
                ],
            )
        };
        flat(0, o_wdec)?;
        dev.launch(
            "adam_dec_rows",
            L::per_line(f, d),
            &[
                at::<f32>(p, o_wdec),
                at::<f32>(g, o_wdec),
                at::<f32>(m, o_wdec),
                at::<f32>(v, o_wdec),
                d32.into(),
                b1.into(),
                b2.into(),
                step_size.into(),
                eps.into(),
            ],
        )?;
        flat(o_bdec, d)?;

        // ---- statistics and tracking ----
        ws.lat_counts.zero()?;
        ws.lat_min.fill_bytes(0xff, 4 * f)?;
        dev.launch(
            "latent_stats",
            L::elementwise(nnz as u64),
            &[(&ws.main.idx).into(), (&ws.main.val).into(), nnz.into(), (&ws.lat_counts).into(), (&ws.lat_min).into()],
        )?;
        let counts: Vec<u32> = ws.lat_counts.to_vec(f)?;
        let minbits: Vec<u32> = ws.lat_min.to_vec(f)?;
        let acc: Vec<f64> = ws.acc.to_vec(8)?;
        let nnz = ws.main.nnz;
        // Dead count before this step's bookkeeping, as the CPU backend reports it.
        let dead = crate::backend::tracking::dead_count(&self.cfg, &self.since_fired);
        self.update_tracking(&counts, &minbits, rows);
        self.step = t;
        clock.lap(&self.dev, &mut ph.optimizer)?;
        self.phases.add(&ph);
        let (sse, total_var, l1_loss) = (acc[0], acc[1], acc[3]);
        Ok(StepStats::from_sums(sse, total_var, aux_loss, l1_loss, nnz, rows, d, dead))
    }

    fn infer(&mut self, batch: &Batch, mode: InferMode) -> Result<Inference> {
        self.dev.bind()?;
        let (d, f) = (self.shape.d_in, self.shape.d_sae);
        let rows = batch.rows;
        let rule = if mode == InferMode::Exported && self.cfg.sparsifier.batch_dependent() {
            Rule::Theta(true)
        } else {
            self.training_rule(rows)
        };
        let hist_ready = self.forward_encode(batch, &rule)?;
        let o_wdec = self.shape.offsets()[2];
        let o_bdec = self.shape.offsets()[3];
        let dev = &self.dev;
        let ws = self.ws.as_mut().unwrap();
        ws.theta.upload(&self.theta)?;
        select(dev, ws, f, &rule, false, hist_ready)?;
        let _r = nvtx::range("decode");
        dev.launch(
            "decode_rows",
            L::per_line(rows, d),
            &[
                (&ws.main.row_ptr).into(),
                (&ws.main.idx).into(),
                (&ws.main.val).into(),
                at::<f32>(&self.params, o_wdec),
                at::<f32>(&self.params, o_bdec),
                (d as u32).into(),
                (&ws.x_hat).into(),
            ],
        )?;
        let codes = ws.main.download(rows, f)?;
        let x_hat = ws.x_hat.to_vec(rows * d)?;
        Ok(Inference { codes, x_hat })
    }

    fn take_phase_times(&mut self) -> PhaseTimes {
        std::mem::take(&mut self.phases)
    }

    fn state(&self) -> Result<TrainState> {
        self.dev.bind()?;
        let n = self.shape.len();
        let get = |b: &DevBuf| -> Result<Params> { Ok(Params { shape: self.shape, data: b.to_vec(n)? }) };
        Ok(TrainState {
            params: get(&self.params)?,
            adam_m: get(&self.adam_m)?,
            adam_v: get(&self.adam_v)?,
            step: self.step,
            theta: self.theta.clone(),
            theta_set: self.theta_set.clone(),
            since_fired: self.since_fired.clone(),
            density: self.density.clone(),
        })
    }
}
