//! Backward phase (kernels/backward.cu; CPU twin backend/cpu/backward.rs): dL/dpre at the kept
//! entries, relu's L1 terms, the per-latent (CSC) view, the latent-row gradients of W_enc,
//! b_enc and W_dec (main codes, then aux codes on top), the L1 / aligned finish, and b_dec.

use super::backend::Ctx;
use super::decode;
use super::device::{Dev, DevBuf, Ptr};
use super::kernels as K;
use super::launch as L;
use super::workspace::{DevCodes, Ws};
use anyhow::Result;

/// `dpre[e] = g_b . W_dec_i` at every kept entry of `codes` (main or aux).
pub fn code_grads(dev: &Dev, codes: &DevCodes, g: &DevBuf<f32>, w_dec: Ptr<f32>, d: usize) -> Result<()> {
    let c = &codes.b;
    let rows = c.row_ptr.len() - 1;
    K::code_grads(dev, L::per_line(rows, 128), c.row_ptr.p(), c.idx.p(), g.p(), w_dec, d as u32, c.dpre.p())
}

/// relu: decoder row norms, `dpre += lambda ||W_dec_i||` and the L1 loss (into `acc`); the
/// per-latent code sums come from the main codes' [`latent_grads`].
pub fn l1_terms(cx: &Ctx, ws: &Ws, lambda: f32) -> Result<()> {
    let (dev, b) = (cx.dev, &ws.b);
    let (d, f) = (cx.shape.d_in, cx.shape.d_sae);
    let c = &ws.main.b;
    let nnz = ws.main.nnz as u32;
    K::row_norms(dev, L::per_line(f, d), cx.w_dec(), d as u32, b.norms.p())?;
    let l = L::elementwise(nnz as u64);
    K::l1_terms(dev, l, c.idx.p(), c.val.p(), nnz, b.norms.p(), lambda, c.dpre.p(), b.acc.p())
}

/// The per-latent view of `codes` (counting sort by latent, then each latent's tokens sorted:
/// pairwise ranks for short segments, a token bitmap for long ones).
fn build_csc(dev: &Dev, codes: &DevCodes, f: usize) -> Result<()> {
    let c = &codes.b;
    let rows = c.row_ptr.len() - 1;
    let nnz = codes.nnz as u32;
    c.cursor.zero()?;
    K::csc_count(dev, L::elementwise(nnz as u64), c.idx.p(), nnz, c.cursor.p())?;
    K::exclusive_scan(dev, L::scan(), c.cursor.p(), f as u32, c.col_ptr.p())?;
    c.cursor.zero()?;
    K::csc_fill(
        dev,
        L::per_line(rows, 64),
        c.row_ptr.p(),
        c.idx.p(),
        c.col_ptr.p(),
        c.cursor.p(),
        c.tok_a.p(),
        c.pos_a.p(),
    )?;
    let r32 = rows as u32;
    K::csc_sort(dev, L::csc_sort(f), c.col_ptr.p(), c.tok_a.p(), c.pos_a.p(), r32, c.tok.p(), c.pos.p())
}

/// Where the gradients go: W_enc, b_enc, W_dec and b_dec slices of the flat gradient buffer.
pub struct GradPtrs {
    pub w_enc: Ptr<f32>,
    pub b_enc: Ptr<f32>,
    pub w_dec: Ptr<f32>,
    pub b_dec: Ptr<f32>,
}

/// Latent-row gradients of one group of codes: the main codes overwrite the rows
/// (`accumulate` false), each aux group adds onto them. For relu the main group also writes
/// the per-latent code sums of the L1 term.
pub fn latent_grads(cx: &Ctx, ws: &Ws, grads: &GradPtrs, aux: bool) -> Result<()> {
    let (dev, b) = (cx.dev, &ws.b);
    let (d, f) = (cx.shape.d_in, cx.shape.d_sae);
    let (codes, g) = if aux { (&ws.aux, &b.g_aux) } else { (&ws.main, &b.g) };
    build_csc(dev, codes, f)?;
    let c = &codes.b;
    let (cp, tok, pos, val, dpre) = (c.col_ptr.p(), c.tok.p(), c.pos.p(), c.val.p(), c.dpre.p());
    let lat = L::per_line(f, d);
    let l1_sums = match !aux && cx.cfg.sparsifier.has_l1() {
        true => b.l1_sums.p(),
        false => Ptr::null(),
    };
    K::latent_grads(
        dev,
        lat,
        cp,
        tok,
        pos,
        val,
        dpre,
        g.p(),
        b.xc.p(),
        d as u32,
        aux as i32,
        grads.w_enc,
        grads.b_enc,
        grads.w_dec,
        l1_sums,
    )
}

/// After every group: the L1 and aligned terms of each latent row, then the b_dec gradient.
/// The per-latent views say which rows were touched only when the main codes have one
/// (`main_view`: not after the dense path) and at most one aux group (`aux_groups`) added onto
/// the rows; otherwise every row is finished. `w_enc_eff` is the encoder applied.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    cx: &Ctx,
    ws: &Ws,
    grads: &GradPtrs,
    w_enc_eff: Ptr<f32>,
    aux_groups: usize,
    main_view: bool,
    lambda: f32,
) -> Result<()> {
    let (dev, b) = (cx.dev, &ws.b);
    let (rows, d, f) = (ws.rows, cx.shape.d_in, cx.shape.d_sae);
    let d32 = d as u32;
    let is_relu = cx.cfg.sparsifier.has_l1();
    if is_relu || cx.cfg.aligned {
        let (main_cp, aux_cp) = match (main_view, aux_groups) {
            (true, 0) => (ws.main.b.col_ptr.p(), Ptr::null()),
            (true, 1) => (ws.main.b.col_ptr.p(), ws.aux.b.col_ptr.p()),
            _ => (Ptr::null(), Ptr::null()),
        };
        let (l1, norms) = if is_relu { (b.l1_sums.p(), b.norms.p()) } else { (Ptr::null(), Ptr::null()) };
        let aligned = cx.cfg.aligned as i32;
        let lat = L::per_line(f, d);
        K::latent_finish(
            dev,
            lat,
            main_cp,
            aux_cp,
            cx.w_enc(),
            cx.w_dec(),
            d32,
            l1,
            norms,
            lambda,
            aligned,
            grads.w_enc,
            grads.w_dec,
        )?;
    }
    decode::col_sums(dev, b.g.p(), rows, d, &b.col_part, b.colsum_g.p())?;
    let parts = decode::col_partials(dev, w_enc_eff, grads.b_enc, f, d, &b.col_part)?;
    K::bdec_grad(dev, L::per_column(d), b.colsum_g.p(), b.col_part.p(), parts, d32, grads.b_dec)
}
