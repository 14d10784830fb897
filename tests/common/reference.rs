//! A plain, dense, f64 reference of the SPEC's training mathematics, for tests only.
//!
//! Written from `docs/SPEC.md` alone (it calls nothing in the CPU backend): every product is
//! dense B x F x d, every sum is a straight loop in f64. Given the parameters, a batch and a
//! FIXED kept set (and, for the aux loss, a fixed aux set and the detached residual), it computes
//! the total loss `L = L_rec + L_aux (+ L1)` and its analytic gradient, the decoder projection,
//! an Adam step, the decoder renormalisation and the threshold EMA, so that a whole training step
//! of a fast backend can be compared with it. Finite differences of [`loss`] check [`loss_and_grad`].

// Index loops on purpose: they read like the SPEC's sums.
#![allow(clippy::needless_range_loop)]

use saetrain::model::{Params, Shape};

/// Parameters (or a gradient) in f64, in the SPEC's shapes. Under aligned training `w_enc`
/// holds A, the trainable encoder parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct RefParams {
    pub d: usize,
    pub f: usize,
    /// F x d, row-major: W_enc, or A under aligned training.
    pub w_enc: Vec<f64>,
    /// F
    pub b_enc: Vec<f64>,
    /// F x d, row-major.
    pub w_dec: Vec<f64>,
    /// d
    pub b_dec: Vec<f64>,
}

/// Names of the four tensors, in the flat layout's order.
pub const TENSORS: [&str; 4] = ["w_enc", "b_enc", "w_dec", "b_dec"];

impl RefParams {
    pub fn zeros(d: usize, f: usize) -> Self {
        Self { d, f, w_enc: vec![0.0; f * d], b_enc: vec![0.0; f], w_dec: vec![0.0; f * d], b_dec: vec![0.0; d] }
    }

    /// Exact widening of f32 parameters.
    pub fn from_params(p: &Params) -> Self {
        let r = p.parts();
        let w = |s: &[f32]| s.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        Self {
            d: p.shape.d_in,
            f: p.shape.d_sae,
            w_enc: w(r.w_enc),
            b_enc: w(r.b_enc),
            w_dec: w(r.w_dec),
            b_dec: w(r.b_dec),
        }
    }

    /// Rounded to f32, in the crate's flat layout.
    pub fn to_params(&self) -> Params {
        let n = |s: &[f64]| s.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        Params::from_parts(
            Shape::new(self.d, self.f),
            &n(&self.w_enc),
            &n(&self.b_enc),
            &n(&self.w_dec),
            &n(&self.b_dec),
        )
    }

    /// The four tensors in layout order `[W_enc | b_enc | W_dec | b_dec]`.
    pub fn tensors(&self) -> [&[f64]; 4] {
        [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec]
    }

    pub fn tensors_mut(&mut self) -> [&mut Vec<f64>; 4] {
        [&mut self.w_enc, &mut self.b_enc, &mut self.w_dec, &mut self.b_dec]
    }

    /// Flat copy in the crate's layout.
    pub fn flat(&self) -> Vec<f64> {
        self.tensors().concat()
    }

    /// Inverse of [`RefParams::flat`].
    pub fn from_flat(d: usize, f: usize, v: &[f64]) -> Self {
        assert_eq!(v.len(), 2 * f * d + f + d);
        let (a, rest) = v.split_at(f * d);
        let (b, rest) = rest.split_at(f);
        let (c, e) = rest.split_at(f * d);
        Self { d, f, w_enc: a.to_vec(), b_enc: b.to_vec(), w_dec: c.to_vec(), b_dec: e.to_vec() }
    }

    /// Row i of W_dec.
    pub fn dec_row(&self, i: usize) -> &[f64] {
        &self.w_dec[i * self.d..(i + 1) * self.d]
    }
}

/// A fixed B x F selection (the kept set of a sparsifier, or the aux set).
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    pub rows: usize,
    pub cols: usize,
    pub keep: Vec<bool>,
}

impl Mask {
    pub fn empty(rows: usize, cols: usize) -> Self {
        Self { rows, cols, keep: vec![false; rows * cols] }
    }
    /// From (token, latent) pairs.
    pub fn from_entries(rows: usize, cols: usize, entries: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut m = Self::empty(rows, cols);
        for (b, i) in entries {
            assert!(b < rows && i < cols, "entry ({b}, {i}) outside {rows} x {cols}");
            m.keep[b * cols + i] = true;
        }
        m
    }
    pub fn get(&self, b: usize, i: usize) -> bool {
        self.keep[b * self.cols + i]
    }
    pub fn count(&self) -> usize {
        self.keep.iter().filter(|&&k| k).count()
    }
}

/// Which loss terms are present.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossConfig {
    /// Aligned training: `w_enc` holds A and the encoder used is `A_i + alpha_i W_dec_i`.
    pub aligned: bool,
    /// The ReLU sparsifier's L1 coefficient lambda (`None`: no L1 term).
    pub l1_coeff: Option<f64>,
    /// alpha_aux of the aux loss (used only when an aux set is given).
    pub aux_alpha: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { aligned: false, l1_coeff: None, aux_alpha: 1.0 / 32.0 }
    }
}

/// The aux loss's fixed inputs: the aux set and the detached residual E = X - X_hat (B x d).
#[derive(Clone, Debug)]
pub struct AuxInput<'a> {
    pub mask: &'a Mask,
    pub e: &'a [f64],
}

/// The loss terms.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Loss {
    pub total: f64,
    pub rec: f64,
    pub aux: f64,
    pub l1: f64,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The encoder actually applied: W_enc, or `A_i + alpha_i W_dec_i` with
/// `alpha_i = (1 - A_i . W_dec_i) / ||W_dec_i||^2` under aligned training.
pub fn effective_encoder(p: &RefParams, cfg: &LossConfig) -> Vec<f64> {
    if !cfg.aligned {
        return p.w_enc.clone();
    }
    let d = p.d;
    let mut out = vec![0.0; p.f * d];
    for i in 0..p.f {
        let a = &p.w_enc[i * d..(i + 1) * d];
        let w = p.dec_row(i);
        let alpha = (1.0 - dot(a, w)) / dot(w, w);
        for j in 0..d {
            out[i * d + j] = a[j] + alpha * w[j];
        }
    }
    out
}

/// Dense forward quantities.
#[derive(Clone, Debug)]
pub struct Forward {
    /// F x d: the encoder applied.
    pub w_eff: Vec<f64>,
    /// B x d: X - b_dec.
    pub xc: Vec<f64>,
    /// B x F: (X - b_dec) W_enc^T + b_enc.
    pub pre: Vec<f64>,
    /// B x F: pre where kept, else 0.
    pub z: Vec<f64>,
    /// B x d: Z W_dec + b_dec.
    pub x_hat: Vec<f64>,
}

/// Forward pass with the kept set `mask` (kept entries take their `pre`, which the SPEC
/// guarantees is > 0, so `z = ReLU(pre) = pre` there and the map is smooth for a fixed mask).
pub fn forward(p: &RefParams, cfg: &LossConfig, x: &[f64], rows: usize, mask: &Mask) -> Forward {
    let (d, f) = (p.d, p.f);
    assert_eq!(x.len(), rows * d);
    assert_eq!((mask.rows, mask.cols), (rows, f));
    let w_eff = effective_encoder(p, cfg);
    let mut xc = vec![0.0; rows * d];
    for b in 0..rows {
        for j in 0..d {
            xc[b * d + j] = x[b * d + j] - p.b_dec[j];
        }
    }
    let mut pre = vec![0.0; rows * f];
    let mut z = vec![0.0; rows * f];
    for b in 0..rows {
        for i in 0..f {
            let v = dot(&xc[b * d..(b + 1) * d], &w_eff[i * d..(i + 1) * d]) + p.b_enc[i];
            pre[b * f + i] = v;
            if mask.get(b, i) {
                z[b * f + i] = v;
            }
        }
    }
    let mut x_hat = vec![0.0; rows * d];
    for b in 0..rows {
        for j in 0..d {
            let mut s = p.b_dec[j];
            for i in 0..f {
                s += z[b * f + i] * p.w_dec[i * d + j];
            }
            x_hat[b * d + j] = s;
        }
    }
    Forward { w_eff, xc, pre, z, x_hat }
}

/// `E = X - X_hat` at `p` (the aux loss's target, detached).
pub fn residual(p: &RefParams, cfg: &LossConfig, x: &[f64], rows: usize, mask: &Mask) -> Vec<f64> {
    let fw = forward(p, cfg, x, rows, mask);
    x.iter().zip(&fw.x_hat).map(|(a, h)| a - h).collect()
}

/// `||E - mean(E)||^2` over the whole batch (mean per column).
fn centred_sq_norm(e: &[f64], rows: usize, d: usize) -> f64 {
    let mut mean = vec![0.0; d];
    for b in 0..rows {
        for j in 0..d {
            mean[j] += e[b * d + j];
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    let mut s = 0.0;
    for b in 0..rows {
        for j in 0..d {
            s += (e[b * d + j] - mean[j]).powi(2);
        }
    }
    s
}

/// `E_hat = U W_dec` (no b_dec), U = pre on the aux set.
fn aux_reconstruction(p: &RefParams, pre: &[f64], rows: usize, aux: &Mask) -> (Vec<f64>, Vec<f64>) {
    let (d, f) = (p.d, p.f);
    let mut u = vec![0.0; rows * f];
    for b in 0..rows {
        for i in 0..f {
            if aux.get(b, i) {
                u[b * f + i] = pre[b * f + i];
            }
        }
    }
    let mut e_hat = vec![0.0; rows * d];
    for b in 0..rows {
        for j in 0..d {
            let mut s = 0.0;
            for i in 0..f {
                s += u[b * f + i] * p.w_dec[i * d + j];
            }
            e_hat[b * d + j] = s;
        }
    }
    (u, e_hat)
}

/// The total loss with the kept set and (optionally) the aux set and detached residual held fixed.
pub fn loss(p: &RefParams, cfg: &LossConfig, x: &[f64], rows: usize, mask: &Mask, aux: Option<&AuxInput>) -> Loss {
    let (d, f) = (p.d, p.f);
    let fw = forward(p, cfg, x, rows, mask);
    let bf = rows as f64;
    let rec = x.iter().zip(&fw.x_hat).map(|(a, h)| (a - h).powi(2)).sum::<f64>() / bf;
    let mut l1 = 0.0;
    if let Some(lambda) = cfg.l1_coeff {
        for i in 0..f {
            let n = dot(p.dec_row(i), p.dec_row(i)).sqrt();
            for b in 0..rows {
                l1 += fw.z[b * f + i] * n;
            }
        }
        l1 *= lambda / bf;
    }
    let mut aux_loss = 0.0;
    if let Some(a) = aux {
        let (_, e_hat) = aux_reconstruction(p, &fw.pre, rows, a.mask);
        let num: f64 = a.e.iter().zip(&e_hat).map(|(e, h)| (e - h).powi(2)).sum();
        aux_loss = cfg.aux_alpha * num / centred_sq_norm(a.e, rows, d);
    }
    Loss { total: rec + aux_loss + l1, rec, aux: aux_loss, l1 }
}

/// Loss and its analytic gradient w.r.t. the trainable parameters (A under aligned training,
/// whose last column is fixed at 0 and so gets a zero gradient). `aux_mask`: the aux set; the
/// residual E is computed here at `p` and treated as a constant, as the SPEC says.
pub fn loss_and_grad(
    p: &RefParams,
    cfg: &LossConfig,
    x: &[f64],
    rows: usize,
    mask: &Mask,
    aux_mask: Option<&Mask>,
) -> (Loss, RefParams) {
    let (d, f) = (p.d, p.f);
    let bf = rows as f64;
    let fw = forward(p, cfg, x, rows, mask);
    let e: Vec<f64> = x.iter().zip(&fw.x_hat).map(|(a, h)| a - h).collect();
    let aux_in = aux_mask.map(|m| AuxInput { mask: m, e: &e });
    let value = loss(p, cfg, x, rows, mask, aux_in.as_ref());

    // dL/dX_hat = (2/B)(X_hat - X)
    let g: Vec<f64> = fw.x_hat.iter().zip(x).map(|(h, a)| 2.0 / bf * (h - a)).collect();
    let norms: Vec<f64> = (0..f).map(|i| dot(p.dec_row(i), p.dec_row(i)).sqrt()).collect();
    let lambda = cfg.l1_coeff.unwrap_or(0.0);

    // dL/dpre (dense B x F; zero outside the kept and aux sets).
    let mut dpre = vec![0.0; rows * f];
    let mut grad = RefParams::zeros(d, f);
    for b in 0..rows {
        let gb = &g[b * d..(b + 1) * d];
        for i in 0..f {
            if mask.get(b, i) {
                let mut dz = dot(gb, p.dec_row(i));
                if cfg.l1_coeff.is_some() {
                    dz += lambda / bf * norms[i];
                }
                dpre[b * f + i] += dz;
            }
        }
    }
    // dW_dec from the main path: Z^T G, and the L1 term (lambda/B) (sum_b z_bi) w_i / ||w_i||.
    for i in 0..f {
        let mut zsum = 0.0;
        for b in 0..rows {
            let z = fw.z[b * f + i];
            zsum += z;
            for j in 0..d {
                grad.w_dec[i * d + j] += z * g[b * d + j];
            }
        }
        if cfg.l1_coeff.is_some() {
            for j in 0..d {
                grad.w_dec[i * d + j] += lambda / bf * zsum * p.w_dec[i * d + j] / norms[i];
            }
        }
    }
    // Aux: L_aux = alpha ||E - E_hat||^2 / ||E - mean E||^2 with E constant.
    if let Some(am) = aux_mask {
        let (u, e_hat) = aux_reconstruction(p, &fw.pre, rows, am);
        let den = centred_sq_norm(&e, rows, d);
        let g_aux: Vec<f64> = e.iter().zip(&e_hat).map(|(e, h)| -2.0 * cfg.aux_alpha * (e - h) / den).collect();
        for b in 0..rows {
            let gb = &g_aux[b * d..(b + 1) * d];
            for i in 0..f {
                if am.get(b, i) {
                    dpre[b * f + i] += dot(gb, p.dec_row(i));
                }
            }
        }
        for i in 0..f {
            for b in 0..rows {
                let ub = u[b * f + i];
                for j in 0..d {
                    grad.w_dec[i * d + j] += ub * g_aux[b * d + j];
                }
            }
        }
    }
    // Encoder side: dW_eff = dpre^T Xc, db_enc = sum_b dpre, db_dec = sum_b G - W_eff^T sum_b dpre.
    let mut dw_eff = vec![0.0; f * d];
    for i in 0..f {
        for b in 0..rows {
            let dp = dpre[b * f + i];
            grad.b_enc[i] += dp;
            for j in 0..d {
                dw_eff[i * d + j] += dp * fw.xc[b * d + j];
            }
        }
    }
    for j in 0..d {
        let mut s = 0.0;
        for b in 0..rows {
            s += g[b * d + j];
        }
        for i in 0..f {
            s -= fw.w_eff[i * d + j] * grad.b_enc[i];
        }
        grad.b_dec[j] = s;
    }
    if cfg.aligned {
        // W_eff_i = a + alpha w, alpha = (1 - a.w)/s, s = w.w:
        // dalpha/da = -w/s, dalpha/dw = -a/s - 2 alpha w/s.
        for i in 0..f {
            let a = &p.w_enc[i * d..(i + 1) * d];
            let w = p.dec_row(i);
            let s = dot(w, w);
            let alpha = (1.0 - dot(a, w)) / s;
            let ge = &dw_eff[i * d..(i + 1) * d];
            let gw = dot(ge, w);
            for j in 0..d {
                grad.w_enc[i * d + j] = ge[j] - gw / s * w[j];
                grad.w_dec[i * d + j] += alpha * ge[j] + gw * (-a[j] / s - 2.0 * alpha * w[j] / s);
            }
            grad.w_enc[i * d + d - 1] = 0.0; // A's last column is not trainable
        }
    } else {
        grad.w_enc = dw_eff;
    }
    (value, grad)
}

/// Decoder constraint on a gradient at unit-norm rows: `g_i <- g_i - (g_i . w_i) w_i`.
pub fn project_decoder(grad: &mut RefParams, p: &RefParams) {
    let d = p.d;
    for i in 0..p.f {
        let w = p.dec_row(i);
        let gw = dot(&grad.w_dec[i * d..(i + 1) * d], w);
        for j in 0..d {
            grad.w_dec[i * d + j] -= gw * w[j];
        }
    }
}

/// Every row of W_dec scaled to unit L2 norm.
pub fn renormalize_decoder(p: &mut RefParams) {
    let d = p.d;
    for row in p.w_dec.chunks_mut(d) {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|v| *v /= n);
        }
    }
}

/// Adam hyper-parameters (torch.optim.Adam; with `weight_decay` torch.optim.AdamW, applied to
/// W_enc and W_dec only), and torch.nn.utils.clip_grad_norm_'s bound (0: no clipping).
#[derive(Clone, Copy, Debug)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip: f64,
}

/// Textbook Adam, step number `t` (1-based): m, v moments, bias-corrected, then
/// `p -= lr * m_hat / (sqrt(v_hat) + eps)`.
pub fn adam_step(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], t: u64, h: AdamHyper) {
    assert!(p.len() == g.len() && m.len() == g.len() && v.len() == g.len());
    let bc1 = 1.0 - h.beta1.powi(t as i32);
    let bc2 = 1.0 - h.beta2.powi(t as i32);
    for k in 0..p.len() {
        m[k] = h.beta1 * m[k] + (1.0 - h.beta1) * g[k];
        v[k] = h.beta2 * v[k] + (1.0 - h.beta2) * g[k] * g[k];
        let m_hat = m[k] / bc1;
        let v_hat = v[k] / bc2;
        p[k] -= h.lr * m_hat / (v_hat.sqrt() + h.eps);
    }
}

/// One whole optimiser step: project the decoder gradient, clip the whole gradient's norm
/// (`g *= C / (||g|| + 1e-6)` when that is < 1), AdamW's decay `W *= 1 - lr wd` of W_enc and W_dec
/// (torch applies it first; the moments do not depend on p, so that order is this one), Adam,
/// renormalise the decoder rows. `m`, `v` are flat in the crate's layout; `t` is the 1-based step.
pub fn train_step(p: &mut RefParams, grad: &RefParams, m: &mut [f64], v: &mut [f64], t: u64, h: AdamHyper) {
    let mut g = grad.clone();
    project_decoder(&mut g, p);
    let mut gf = g.flat();
    if h.clip > 0.0 {
        let norm = gf.iter().map(|x| x * x).sum::<f64>().sqrt();
        let c = h.clip / (norm + 1e-6);
        if c < 1.0 {
            gf.iter_mut().for_each(|x| *x *= c);
        }
    }
    let decay = 1.0 - h.lr * h.weight_decay;
    p.w_enc.iter_mut().chain(p.w_dec.iter_mut()).for_each(|w| *w *= decay);
    let mut flat = p.flat();
    adam_step(&mut flat, &gf, m, v, t, h);
    *p = RefParams::from_flat(p.d, p.f, &flat);
    renormalize_decoder(p);
}

/// The global L2 norm of the projected gradient (what --grad-clip bounds).
pub fn projected_grad_norm(p: &RefParams, grad: &RefParams) -> f64 {
    let mut g = grad.clone();
    project_decoder(&mut g, p);
    g.flat().iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Threshold EMA: the first measurement seeds theta, then `theta <- decay theta + (1-decay) t`.
pub fn threshold_ema(theta: Option<f64>, t: f64, decay: f64) -> f64 {
    match theta {
        None => t,
        Some(th) => decay * th + (1.0 - decay) * t,
    }
}

/// The smallest kept activation of the batch (batchtopk / mutual_choice), if any.
pub fn batch_min(fw: &Forward, mask: &Mask) -> Option<f64> {
    (0..mask.keep.len()).filter(|&e| mask.keep[e]).map(|e| fw.pre[e]).reduce(f64::min)
}

/// Per latent, the smallest kept activation (wta), if the latent kept anything.
pub fn per_latent_min(fw: &Forward, mask: &Mask) -> Vec<Option<f64>> {
    (0..mask.cols)
        .map(|i| (0..mask.rows).filter(|&b| mask.get(b, i)).map(|b| fw.pre[b * mask.cols + i]).reduce(f64::min))
        .collect()
}

/// The aux set of aux_k: per token, the `k_aux` largest strictly positive `pre` among the
/// candidate latents (ties: lower latent index).
pub fn select_aux(pre: &[f64], rows: usize, f: usize, candidate: &[bool], k_aux: usize) -> Mask {
    let mut m = Mask::empty(rows, f);
    for b in 0..rows {
        let mut c: Vec<(f64, usize)> =
            (0..f).filter(|&i| candidate[i] && pre[b * f + i] > 0.0).map(|i| (pre[b * f + i], i)).collect();
        c.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap().then(x.1.cmp(&y.1)));
        for &(_, i) in c.iter().take(k_aux) {
            m.keep[b * f + i] = true;
        }
    }
    m
}
