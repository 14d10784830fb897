//! Select phase (kernels/select.cu; CPU twin `crate::sparsify`): any `Selection` on
//! `ws.b.pre` into device codes, exactly the set the CPU rules keep. The match below is
//! exhaustive, so a new selection variant does not compile until it has a kernel sequence.
//!
//! Every rule ends the same way: per-row (or per-column) cut-offs, then `sel_mask_count`, a
//! scan into row pointers, and `sel_mask_fill` in ascending latent order.

use super::device::{Dev, Ptr};
use super::kernels as K;
use super::launch as L;
use super::nvtx;
use super::workspace::Ws;
use crate::sparsify::Selection;
use anyhow::{ensure, Result};

/// The final mask's rule: its mode and the cut-offs it reads.
struct Mask {
    mode: i32,
    theta: Ptr<f32>,
    thr: Ptr<u32>,
    cut: Ptr<i32>,
    cmask: Ptr<u8>,
    /// A column rule applied before a row rule (hybrid).
    f_thr: Ptr<u32>,
    f_cut: Ptr<i32>,
}

impl Mask {
    fn new(mode: i32) -> Self {
        Self {
            mode,
            theta: Ptr::null(),
            thr: Ptr::null(),
            cut: Ptr::null(),
            cmask: Ptr::null(),
            f_thr: Ptr::null(),
            f_cut: Ptr::null(),
        }
    }
}

/// Run `sel` on `ws.b.pre` (rows x f) into `ws.main`, or into `ws.aux` for `Selection::Aux`.
/// `hist_ready`: the encoder already built batchtopk's first radix histogram in `ws.b.hist`
/// (the fused encoder), so that pass is skipped.
pub fn select(dev: &Dev, ws: &mut Ws, sel: &Selection, hist_ready: bool) -> Result<()> {
    let _r = nvtx::range("select");
    let (rows, f) = (ws.rows, ws.dims.f);
    let (r32, f32_) = (rows as u32, f as u32);
    let row_lines = L::per_line(rows, f);
    let col_lines = L::per_line(f, rows);
    let b = &ws.b;
    // Per-line radix select: the k-th largest key of each row (or column) and its tie cut-off.
    let radix = |lines, transposed: i32, k: u32, kbuf: Ptr<u32>, cmask: Ptr<u8>, ft, fc, thr: Ptr<u32>, cut| {
        K::sel_line_radix(dev, lines, b.pre.p(), r32, f32_, transposed, k, kbuf, cmask, ft, fc, thr, cut)
    };
    let none = (Ptr::null(), Ptr::null());
    let mask = match *sel {
        Selection::TopK { k } => {
            radix(row_lines, 0, k as u32, Ptr::null(), Ptr::null(), none.0, none.1, b.thr_r.p(), b.cut_r.p())?;
            Mask { thr: b.thr_r.p(), cut: b.cut_r.p(), ..Mask::new(K::MASK_ROW) }
        }
        Selection::Aux { candidates, k } => {
            let mut m = vec![0u8; f];
            for &c in candidates {
                m[c as usize] = 1;
            }
            b.cmask.upload(&m)?;
            radix(row_lines, 0, k as u32, Ptr::null(), b.cmask.p(), none.0, none.1, b.thr_r.p(), b.cut_r.p())?;
            Mask { thr: b.thr_r.p(), cut: b.cut_r.p(), cmask: b.cmask.p(), ..Mask::new(K::MASK_ROW) }
        }
        Selection::BatchTopK { k } => {
            let total = (k as u64) * rows as u64;
            ensure!(total < u32::MAX as u64, "k * batch too large");
            b.bstate.upload(&[0u32, 0, total as u32, 0])?;
            if !hist_ready {
                b.hist.zero()?;
            }
            let n = (rows * f) as u64;
            for shift in [24u32, 16, 8, 0] {
                if !(hist_ready && shift == 24) {
                    K::sel_batch_hist(dev, L::batch_hist(n), b.pre.p(), n, b.bstate.p(), b.hist.p(), shift)?;
                }
                K::sel_batch_pick(dev, L::single_thread(), b.bstate.p(), b.hist.p(), shift)?;
            }
            K::sel_row_eq_count(dev, row_lines, b.pre.p(), f32_, b.bstate.p(), b.eq_r.p())?;
            K::sel_batch_split(dev, L::scan(), b.bstate.p(), b.eq_r.p(), r32, b.thr_r.p(), b.need_r.p())?;
            K::sel_row_ties(dev, row_lines, b.pre.p(), r32, f32_, b.thr_r.p(), b.need_r.p(), b.cut_r.p())?;
            Mask { thr: b.thr_r.p(), cut: b.cut_r.p(), ..Mask::new(K::MASK_ROW) }
        }
        Selection::Wta { m } => {
            upload_budgets(ws, m)?;
            radix(col_lines, 1, 0, b.kbuf.p(), Ptr::null(), none.0, none.1, b.thr_c.p(), b.cut_c.p())?;
            Mask { thr: b.thr_c.p(), cut: b.cut_c.p(), ..Mask::new(K::MASK_COL) }
        }
        Selection::Hybrid { m, k_max } => {
            upload_budgets(ws, m)?;
            radix(col_lines, 1, 0, b.kbuf.p(), Ptr::null(), none.0, none.1, b.thr_c.p(), b.cut_c.p())?;
            let (ft, fc) = (b.thr_c.p(), b.cut_c.p());
            radix(row_lines, 0, k_max as u32, Ptr::null(), Ptr::null(), ft, fc, b.thr_r.p(), b.cut_r.p())?;
            Mask { thr: b.thr_r.p(), cut: b.cut_r.p(), f_thr: ft, f_cut: fc, ..Mask::new(K::MASK_ROW) }
        }
        Selection::WtaAbove { m, theta } => {
            let (ft, fc) = upload_filter(ws, theta)?;
            upload_budgets(ws, m)?;
            radix(col_lines, 1, 0, b.kbuf.p(), Ptr::null(), ft, fc, b.thr_c.p(), b.cut_c.p())?;
            Mask { thr: b.thr_c.p(), cut: b.cut_c.p(), f_thr: ft, f_cut: fc, ..Mask::new(K::MASK_COL) }
        }
        Selection::JumpReluCap { theta, k } => {
            // The thresholds as a column filter (key > key(theta_j), no ties kept), then the
            // per-row top-k: the same kernels as hybrid's cap.
            let (ft, fc) = upload_filter(ws, theta)?;
            radix(row_lines, 0, k as u32, Ptr::null(), Ptr::null(), ft, fc, b.thr_r.p(), b.cut_r.p())?;
            Mask { thr: b.thr_r.p(), cut: b.cut_r.p(), f_thr: ft, f_cut: fc, ..Mask::new(K::MASK_ROW) }
        }
        Selection::Relu => Mask::new(K::MASK_THETA),
        Selection::JumpRelu { theta } => {
            ensure!(theta.len() == f, "thresholds for {} latents, expected {f}", theta.len());
            b.theta.upload(theta)?;
            Mask { theta: b.theta.p(), ..Mask::new(K::MASK_THETA) }
        }
    };
    let into_aux = matches!(sel, Selection::Aux { .. });
    let b = &ws.b;
    let codes = if into_aux { &mut ws.aux } else { &mut ws.main };
    let Mask { mode, theta, thr, cut, cmask, f_thr, f_cut } = mask;
    let pre = b.pre.p();
    K::sel_mask_count(dev, row_lines, pre, f32_, mode, theta, thr, cut, cmask, f_thr, f_cut, b.counts_r.p())?;
    K::exclusive_scan(dev, L::scan(), b.counts_r.p(), r32, codes.b.row_ptr.p())?;
    let mut nnz = [0u32];
    codes.b.row_ptr.download_at(rows, &mut nnz)?;
    codes.nnz = nnz[0] as usize;
    codes.reserve(dev, codes.nnz)?;
    let c = &codes.b;
    K::sel_mask_fill(
        dev,
        row_lines,
        pre,
        f32_,
        mode,
        theta,
        thr,
        cut,
        cmask,
        f_thr,
        f_cut,
        c.row_ptr.p(),
        c.idx.p(),
        c.val.p(),
    )
}

/// The key a kept value must exceed to pass threshold `t` (`v > t` and `v > 0`): the bits of a
/// positive t, 0 for t <= 0, and above every key for NaN (nothing passes a NaN threshold).
fn threshold_key(t: f32) -> u32 {
    if t.is_nan() {
        u32::MAX
    } else if t > 0.0 {
        t.to_bits()
    } else {
        0
    }
}

/// Thresholds as a column filter in `ws.b.flt_t` / `flt_c`: an entry passes when its key is
/// above its latent's threshold key (cut-off -1: no ties pass).
fn upload_filter(ws: &Ws, theta: &[f32]) -> Result<(Ptr<u32>, Ptr<i32>)> {
    let f = ws.dims.f;
    ensure!(theta.len() == f, "thresholds for {} latents, expected {f}", theta.len());
    let keys: Vec<u32> = theta.iter().map(|&t| threshold_key(t)).collect();
    ws.b.flt_t.upload(&keys)?;
    ws.b.flt_c.upload(&vec![-1i32; f])?;
    Ok((ws.b.flt_t.p(), ws.b.flt_c.p()))
}

/// Feature-choice budgets m_j into `ws.b.kbuf` (as u32).
fn upload_budgets(ws: &Ws, m: &[usize]) -> Result<()> {
    let f = ws.dims.f;
    ensure!(m.len() == f, "budgets for {} latents, expected {f}", m.len());
    let m32: Vec<u32> = m.iter().map(|&v| v.min(u32::MAX as usize) as u32).collect();
    ws.b.kbuf.upload(&m32)
}
