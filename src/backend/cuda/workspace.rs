//! The device buffers of one training step, declared once in a table: the table allocates the
//! workspace (`Ws::new`) and is what the memory plan (`memory.rs`) adds up, so the two cannot
//! disagree. Sparse codes (`DevCodes`) grow with nnz; everything else is sized by the batch.

use super::device::{Dev, DevBuf};
use crate::config::Precision;
use crate::model::Shape;
use crate::sparse::SparseCodes;
use anyhow::{ensure, Result};

/// The dimensions every buffer size is a function of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub rows: usize,
    pub d: usize,
    pub f: usize,
    /// Code budget per token (sizes the main codes before they first grow).
    pub k: usize,
    pub aligned: bool,
    pub bf16: bool,
    /// Whether the dense codes path may run (dense.rs): the B x F `dense` buffer.
    pub dense: bool,
}

impl Dims {
    pub fn new(shape: Shape, rows: usize, k: usize, aligned: bool, precision: Precision) -> Self {
        let bf16 = precision == Precision::Bf16;
        Self { rows, d: shape.d_in, f: shape.d_sae, k, aligned, bf16, dense: false }
    }
    /// Initial capacity of the main and the aux codes (entries).
    fn code_caps(&self) -> (usize, usize) {
        (self.rows * self.k.max(1), self.rows * (self.d / 2).max(1))
    }
}

/// What a buffer is for, in the memory plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// B x d buffers.
    Activations,
    /// The B x F transients (pre-activations; the dense codes path's buffer).
    Pre,
    /// Sparse codes and their per-latent view.
    Codes,
    /// Per-row / per-latent selection state, accumulators, bf16 and aligned copies.
    Workspace,
}

/// One buffer of the table: its name, group and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferSize {
    pub name: &'static str,
    pub group: Group,
    pub bytes: u64,
}

/// Declares a struct of device buffers from `field: type = element count, group;` lines, with
/// `new` (allocates every buffer) and `table` (their sizes) generated from the same lines.
macro_rules! buffers {
    ($(#[$sm:meta])* $name:ident ($s:ident : $dims:ty) { $( $(#[$m:meta])* $field:ident : $t:ty = $n:expr, $group:ident; )* }) => {
        $(#[$sm])*
        pub struct $name {
            $( $(#[$m])* pub $field: DevBuf<$t>, )*
        }
        impl $name {
            fn alloc(dev: &Dev, $s: $dims) -> Result<Self> {
                Ok(Self { $( $field: dev.alloc::<$t>($n)?, )* })
            }
            /// Every buffer's size at these dimensions.
            pub fn table($s: $dims) -> Vec<BufferSize> {
                vec![$( BufferSize {
                    name: stringify!($field),
                    group: Group::$group,
                    bytes: (($n) as u64) * std::mem::size_of::<$t>() as u64,
                }, )*]
            }
        }
    };
}

buffers! {
    /// Buffers sized by the batch (see `Ws`).
    Batch(s: Dims) {
        /// The batch in f32.
        x: f32 = s.rows * s.d, Activations;
        /// The batch as uploaded when it is f16 / bf16.
        x_raw: u16 = s.rows * s.d, Activations;
        /// x - b_dec.
        xc: f32 = s.rows * s.d, Activations;
        x_hat: f32 = s.rows * s.d, Activations;
        /// x_hat - x.
        resid: f32 = s.rows * s.d, Activations;
        /// dL_rec/dx_hat.
        g: f32 = s.rows * s.d, Activations;
        /// dL_aux/dE_hat.
        g_aux: f32 = s.rows * s.d, Activations;
        /// The aux reconstruction of the residual.
        e_hat: f32 = s.rows * s.d, Activations;
        /// Pre-activations (B x F).
        pre: f32 = s.rows * s.f, Pre;
        /// The dense codes path's Z, dZ and dP in turn (dense.rs).
        dense: f32 = if s.dense { s.rows * s.f } else { 0 }, Pre;
        /// Aligned training's effective encoder A + alpha W_dec.
        w_eff: f32 = if s.aligned { s.f * s.d } else { 0 }, Workspace;
        xc_bf16: u16 = if s.bf16 { s.rows * s.d } else { 0 }, Workspace;
        w_bf16: u16 = if s.bf16 { s.f * s.d } else { 0 }, Workspace;
        /// Per-row selection threshold keys, tie cut-offs, tie quotas, equal counts, kept counts.
        thr_r: u32 = s.rows, Workspace;
        cut_r: i32 = s.rows, Workspace;
        need_r: u32 = s.rows, Workspace;
        eq_r: u32 = s.rows, Workspace;
        counts_r: u32 = s.rows, Workspace;
        /// Per-latent threshold keys and cut-offs (feature choice), budgets.
        thr_c: u32 = s.f, Workspace;
        cut_c: i32 = s.f, Workspace;
        kbuf: u32 = s.f, Workspace;
        /// A per-latent filter applied before a rule (threshold keys, tie cut-offs = -1).
        flt_t: u32 = s.f, Workspace;
        flt_c: i32 = s.f, Workspace;
        /// Aux candidates (1 = candidate).
        cmask: u8 = s.f, Workspace;
        theta: f32 = s.f, Workspace;
        /// Batch top-k radix state (prefix, mask, remaining, all-kept flag) and histogram.
        bstate: u32 = 4, Workspace;
        hist: u32 = 256, Workspace;
        colsum_x: f64 = s.d, Workspace;
        colsum_r: f64 = s.d, Workspace;
        colsum_g: f64 = s.d, Workspace;
        /// Row parts of a column sum (col_partials), added in order by its finishing kernel.
        col_part: f64 = super::launch::COLSUM_PARTS * if s.dense { s.d.max(s.f) } else { s.d }, Workspace;
        /// The step's f64 sums, slots `kernels::ACC_*`.
        acc: f64 = super::kernels::ACC_SLOTS, Workspace;
        /// Decoder row norms and per-latent code sums (relu's L1).
        norms: f32 = s.f, Workspace;
        l1_sums: f32 = s.f, Workspace;
        /// Per-latent firing counts and smallest kept value bits.
        lat_counts: u32 = s.f, Workspace;
        lat_min: u32 = s.f, Workspace;
    }
}

/// The dimensions of one set of codes.
#[derive(Clone, Copy, Debug)]
pub struct CodeDims {
    pub rows: usize,
    pub f: usize,
    pub cap: usize,
}

buffers! {
    /// Buffers of one set of codes.
    CodeBufs(s: CodeDims) {
        row_ptr: u32 = s.rows + 1, Codes;
        idx: u32 = s.cap, Codes;
        val: f32 = s.cap, Codes;
        /// dL/dpre per entry.
        dpre: f32 = s.cap, Codes;
        col_ptr: u32 = s.f + 1, Codes;
        cursor: u32 = s.f, Codes;
        /// Per-latent view before and after sorting each latent's tokens.
        tok_a: u32 = s.cap, Codes;
        pos_a: u32 = s.cap, Codes;
        tok: u32 = s.cap, Codes;
        pos: u32 = s.cap, Codes;
    }
}

/// Sparse codes on the device (CSR by token, ascending latent) and their per-latent view.
pub struct DevCodes {
    pub nnz: usize,
    dims: CodeDims,
    pub b: CodeBufs,
}

impl DevCodes {
    fn new(dev: &Dev, rows: usize, f: usize, cap: usize) -> Result<Self> {
        let dims = CodeDims { rows, f, cap: cap.max(1) };
        Ok(Self { nnz: 0, dims, b: CodeBufs::alloc(dev, dims)? })
    }

    /// Make room for `nnz` entries (reallocating with 25 % headroom when they do not fit).
    pub fn reserve(&mut self, dev: &Dev, nnz: usize) -> Result<()> {
        if nnz > self.dims.cap {
            let dims = CodeDims { cap: nnz + nnz / 4, ..self.dims };
            let mut b = CodeBufs::alloc(dev, dims)?;
            // The row pointers were just written by the selection's scan.
            std::mem::swap(&mut b.row_ptr, &mut self.b.row_ptr);
            self.b = b;
            self.dims = dims;
        }
        Ok(())
    }

    /// Host copy (CSR).
    pub fn download(&self, rows: usize, cols: usize) -> Result<SparseCodes> {
        let rp: Vec<u32> = self.b.row_ptr.to_vec(rows + 1)?;
        Ok(SparseCodes {
            rows,
            cols,
            row_ptr: rp.iter().map(|&v| v as usize).collect(),
            idx: self.b.idx.to_vec(self.nnz)?,
            val: self.b.val.to_vec(self.nnz)?,
        })
    }

    /// Bytes of one set of codes with room for `cap` entries.
    pub fn plan(rows: usize, f: usize, cap: usize) -> u64 {
        CodeBufs::table(CodeDims { rows, f, cap }).iter().map(|b| b.bytes).sum()
    }
}

/// Everything a step needs on the device for one batch size.
pub struct Ws {
    pub dims: Dims,
    pub rows: usize,
    pub b: Batch,
    pub main: DevCodes,
    pub aux: DevCodes,
}

impl Ws {
    pub fn new(dev: &Dev, dims: Dims) -> Result<Self> {
        ensure!(
            (dims.rows as u64) * (dims.f as u64) < super::memory::MAX_PRE_ENTRIES,
            "batch x d_sae must stay below 2^32 entries"
        );
        let (main_cap, aux_cap) = dims.code_caps();
        Ok(Self {
            dims,
            rows: dims.rows,
            b: Batch::alloc(dev, dims)?,
            main: DevCodes::new(dev, dims.rows, dims.f, main_cap)?,
            aux: DevCodes::new(dev, dims.rows, dims.f, aux_cap)?,
        })
    }

    /// Every buffer's size at these dimensions: the batch table plus both sets of codes at
    /// their initial capacity.
    pub fn table(dims: Dims) -> Vec<BufferSize> {
        let (main_cap, aux_cap) = dims.code_caps();
        let mut t = Batch::table(dims);
        for (name, cap) in [("main codes", main_cap), ("aux codes", aux_cap)] {
            t.push(BufferSize { name, group: Group::Codes, bytes: DevCodes::plan(dims.rows, dims.f, cap) });
        }
        t
    }
}
