//! The CUDA training step: the CPU backend's step (backend/cpu/mod.rs) with each phase on the
//! device, one file per phase as in kernels/: encode.rs, select.rs, decode.rs, backward.rs,
//! adam.rs; workspace.rs declares the buffers. Parameters, gradients, Adam m and v live on the
//! device (one allocation each); the small per-latent tracking state (dead counters, densities,
//! theta) lives on the host and is updated with the CPU's own code from per-latent counts and
//! minima computed on the device.

use super::adam::{self, Clip, DevState, Folded};
use super::backward::{self, GradPtrs};
use super::decode;
use super::dense;
use super::device::{Dev, DevBuf, Ptr};
use super::encode;
use super::kernels as K;
use super::nvtx;
use super::select::select;
use super::workspace::{Dims, Ws};
use crate::backend::{tracking, Backend, InferMode, Inference, PhaseTimes, StepStats};
use crate::config::TrainConfig;
use crate::data::Batch;
use crate::model::{Params, Shape, TrainState};
use crate::sparsify::{plan, threshold, Selection};
use anyhow::{ensure, Result};

/// What every phase reads: the device, the config, and the parameters.
pub struct Ctx<'a> {
    pub dev: &'a Dev,
    pub cfg: &'a TrainConfig,
    pub shape: Shape,
    pub params: &'a DevBuf<f32>,
}

impl Ctx<'_> {
    pub fn w_enc(&self) -> Ptr<f32> {
        self.params.at(self.shape.offsets()[0])
    }
    pub fn b_enc(&self) -> Ptr<f32> {
        self.params.at(self.shape.offsets()[1])
    }
    pub fn w_dec(&self) -> Ptr<f32> {
        self.params.at(self.shape.offsets()[2])
    }
    pub fn b_dec(&self) -> Ptr<f32> {
        self.params.at(self.shape.offsets()[3])
    }
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
    params: DevBuf<f32>,
    grads: DevBuf<f32>,
    adam_m: DevBuf<f32>,
    adam_v: DevBuf<f32>,
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
        let m = plan::budgets(&self.cfg, &self.density, batch.rows, self.step);
        let theta = self.theta.clone();
        let sel = plan::training(&self.cfg, &m, &theta);
        self.forward_encode(batch, &sel)?;
        self.dev.sync()?;
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            encode::product(&self.ctx(), self.ws.as_ref().unwrap(), &sel)?;
        }
        self.dev.sync()?;
        Ok(t.elapsed().as_secs_f64() / reps.max(1) as f64)
    }

    /// Time each phase of `step` (synchronising the device between phases) for
    /// `take_phase_times`.
    pub fn time_phases(&mut self, on: bool) {
        self.timing = on;
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx { dev: &self.dev, cfg: &self.cfg, shape: self.shape, params: &self.params }
    }

    fn ensure_ws(&mut self, rows: usize) -> Result<()> {
        if self.ws.as_ref().is_none_or(|w| w.rows != rows) {
            self.ws = None; // free first
            let dims = Dims {
                dense: dense::may_run(&self.cfg, self.dev.blas.is_some()),
                ..Dims::new(self.shape, rows, self.cfg.k, self.cfg.aligned, self.cfg.precision)
            };
            self.ws = Some(Ws::new(&self.dev, dims)?);
        }
        Ok(())
    }

    /// Upload and centre the batch, then the encoder product into `ws.b.pre` for selection by
    /// `sel`. Returns whether the encoder also built batchtopk's first radix histogram.
    fn forward_encode(&mut self, batch: &Batch, sel: &Selection) -> Result<bool> {
        ensure!(batch.rows > 0, "empty batch");
        self.ensure_ws(batch.rows)?;
        let (cx, ws) = (self.ctx(), self.ws.as_ref().unwrap());
        encode::load_batch(&cx, ws, batch)?;
        encode::product(&cx, ws, sel)
    }

    /// Host bookkeeping after a step, from the device's per-latent firing counts and minimum
    /// kept values (`u32::MAX` bits: none kept). Shared with the CPU backend.
    fn update_tracking(&mut self, counts: &[u32], minbits: &[u32], rows: usize) {
        tracking::record_firing(&self.cfg, &mut self.since_fired, &mut self.density, counts, rows);
        let min_kept: Vec<Option<f32>> = minbits.iter().map(|&b| (b != u32::MAX).then(|| f32::from_bits(b))).collect();
        threshold::update_thresholds(&self.cfg, self.step, &mut self.theta, &mut self.theta_set, &min_kept);
    }
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
        let (d, rows) = (self.shape.d_in, batch.rows);
        let mut ph = PhaseTimes::default();
        let mut clock = PhaseClock::start(self.timing, &self.dev)?;
        let m = plan::budgets(&self.cfg, &self.density, rows, self.step);
        let theta = self.theta.clone();
        let filter = if plan::in_theta_phase(&self.cfg, self.step) {
            threshold::prefilter(&self.theta, &self.theta_set)
        } else {
            vec![]
        };
        let sel = plan::step_rule(&self.cfg, &m, &theta, &filter, self.step);
        let hist_ready = self.forward_encode(batch, &sel)?;
        clock.lap(&self.dev, &mut ph.encode)?;
        let cx = Ctx { dev: &self.dev, cfg: &self.cfg, shape: self.shape, params: &self.params };
        let ws = self.ws.as_mut().unwrap();

        select(cx.dev, ws, &sel, hist_ready)?;
        // Per latent, tokens fired and the smallest kept value of the main codes (which nothing
        // below changes): the aux candidates count this batch in, and the bookkeeping after
        // Adam uses them.
        let (counts, minbits) = adam::latent_stats(cx.dev, ws)?;
        let candidates = plan::aux_candidates(cx.cfg, self.step, &self.since_fired, &self.density, &counts, rows);
        clock.lap(cx.dev, &mut ph.select)?;

        let dense = dense::this_step(&cx, ws);
        decode::reconstruction(&cx, ws, dense)?;
        clock.lap(cx.dev, &mut ph.decode)?;

        let b = nvtx::range("backward");
        let lambda = cx.cfg.l1_lambda(self.step, rows);
        let [_, o_benc, o_wdec, o_bdec, _] = self.shape.offsets();
        let g = &self.grads;
        let grads = GradPtrs { w_enc: g.at(0), b_enc: g.at(o_benc), w_dec: g.at(o_wdec), b_dec: g.at(o_bdec) };
        if dense {
            dense::main_grads(&cx, ws, &grads, lambda)?;
        } else {
            backward::code_grads(cx.dev, &ws.main, &ws.b.g, cx.w_dec(), d)?;
            if cx.cfg.sparsifier.has_l1() {
                backward::l1_terms(&cx, ws, lambda)?;
            }
            backward::latent_grads(&cx, ws, &grads, false)?;
        }
        // Each aux loss in turn: its codes, loss, dL/dpre, and its rows added onto the gradient.
        let mut aux_loss = 0.0;
        let mut aux_groups = 0;
        for (_, cand) in &candidates {
            select(cx.dev, ws, &plan::aux(cx.cfg, cand, d), false)?;
            if ws.aux.nnz == 0 {
                continue;
            }
            aux_loss += decode::aux_loss(&cx, ws)?;
            backward::code_grads(cx.dev, &ws.aux, &ws.b.g_aux, cx.w_dec(), d)?;
            backward::latent_grads(&cx, ws, &grads, true)?;
            aux_groups += 1;
        }
        let w_enc_eff = if cx.cfg.aligned { ws.b.w_eff.p() } else { cx.w_enc() };
        backward::finish(&cx, ws, &grads, w_enc_eff, aux_groups, !dense, lambda)?;
        drop(b);
        clock.lap(cx.dev, &mut ph.backward)?;

        let t = self.step + 1;
        let c = cx.cfg;
        let h = Folded::new(lr, c.adam_beta1, c.adam_beta2, c.adam_eps, t, c.weight_decay);
        let state = DevState { params: &self.params, grads: &self.grads, m: &self.adam_m, v: &self.adam_v };
        let clip = (c.grad_clip > 0.0).then(|| Clip { bound: c.grad_clip as f32, gsq: ws.b.acc.at(K::ACC_GRAD_SQ) });
        if clip.is_some() {
            ws.b.acc.upload_at(K::ACC_GRAD_SQ, &[0f64])?; // each step sums afresh
        }
        adam::step(cx.dev, self.shape, &state, h, cx.cfg.decoder_norm == crate::config::DecoderNorm::Unit, clip)?;
        let acc: Vec<f64> = ws.b.acc.to_vec(K::ACC_SLOTS)?;
        let nnz = ws.main.nnz;
        // Dead count before this step's bookkeeping, as the CPU backend reports it.
        let dead = tracking::dead_count(&self.cfg, &self.since_fired);
        self.update_tracking(&counts, &minbits, rows);
        self.step = t;
        clock.lap(&self.dev, &mut ph.optimizer)?;
        self.phases.add(&ph);
        let (sse, total_var, l1_loss) = (acc[K::ACC_SSE], acc[K::ACC_TOTAL_VAR], acc[K::ACC_L1]);
        Ok(StepStats::from_sums(sse, total_var, aux_loss, l1_loss, nnz, rows, d, dead))
    }

    fn infer(&mut self, batch: &Batch, mode: InferMode) -> Result<Inference> {
        self.dev.bind()?;
        let (d, f) = (self.shape.d_in, self.shape.d_sae);
        let rows = batch.rows;
        let m = plan::budgets(&self.cfg, &self.density, rows, self.step);
        let theta = match mode {
            InferMode::Exported => threshold::exported(&self.theta, &self.theta_set),
            InferMode::Training => self.theta.clone(),
        };
        let sel = match mode {
            InferMode::Exported => plan::exported(&self.cfg, &m, &theta),
            InferMode::Training => plan::training(&self.cfg, &m, &theta),
        };
        let hist_ready = self.forward_encode(batch, &sel)?;
        let cx = Ctx { dev: &self.dev, cfg: &self.cfg, shape: self.shape, params: &self.params };
        let ws = self.ws.as_mut().unwrap();
        select(cx.dev, ws, &sel, hist_ready)?;
        let _r = nvtx::range("decode");
        decode::decode_rows(cx.dev, &ws.main, cx.w_dec(), cx.b_dec(), d, &ws.b.x_hat)?;
        let codes = ws.main.download(rows, f)?;
        let x_hat = ws.b.x_hat.to_vec(rows * d)?;
        Ok(Inference { codes, x_hat })
    }

    fn set_thresholds(&mut self, theta: &[f32], theta_set: &[bool]) -> Result<()> {
        ensure!(
            theta.len() == self.cfg.d_sae && theta_set.len() == theta.len(),
            "thresholds for {} latents",
            theta.len()
        );
        self.theta.copy_from_slice(theta);
        self.theta_set.copy_from_slice(theta_set);
        Ok(())
    }

    fn take_phase_times(&mut self) -> PhaseTimes {
        std::mem::take(&mut self.phases)
    }

    fn state(&self) -> Result<TrainState> {
        self.dev.bind()?;
        let n = self.shape.len();
        let get = |b: &DevBuf<f32>| -> Result<Params> { Ok(Params { shape: self.shape, data: b.to_vec(n)? }) };
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
