//! Device memory plan of one training step: pure arithmetic over the shapes. The workspace
//! sizes come from the same table `workspace::Ws` allocates from (params, grads, Adam m and v
//! are one allocation each; `pre` is the one B x F transient; everything sparse is sized by nnz).

use super::workspace::{Dims, Group, Ws};
use crate::config::Precision;
use crate::model::Shape;
use std::fmt;

const GIB: f64 = (1u64 << 30) as f64;
/// cuBLAS keeps a workspace per handle; budget it generously.
pub const CUBLAS_WORKSPACE: u64 = 32 << 20;

#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub d_in: usize,
    pub d_sae: usize,
    pub batch: usize,
    pub k: usize,
    pub precision: Precision,
    /// Parameters (f32, flat).
    pub params: u64,
    /// Gradients (same layout).
    pub grads: u64,
    /// Adam m and v.
    pub adam: u64,
    /// B x d buffers: x, xc, x_hat, residual, G, G_aux, E_hat, raw half input.
    pub activations: u64,
    /// The B x F pre-activation transient.
    pub pre: u64,
    /// Sparse codes (main + aux): index, value, dpre, the per-latent view.
    pub codes: u64,
    /// Per-row / per-latent selection state, bf16 copies, cuBLAS workspace.
    pub workspace: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.adam + self.activations + self.pre + self.codes + self.workspace
    }
    /// Does the plan fit in `gb` GiB (with 5 % left for the context and fragmentation)?
    pub fn fits(&self, gb: f64) -> bool {
        (self.total() as f64) <= gb * GIB * 0.95
    }
}

/// Entries of the B x F pre-activations the workspace allows (`Ws::new`): 2^32 - 1.
pub const MAX_PRE_ENTRIES: u64 = (1u64 << 32) - 1;
/// The most weights (d_in x d_sae) a plan or a bench counts: 2^40, 4 TiB of f32.
pub const MAX_WEIGHTS: u64 = 1 << 40;

/// The plan for a step at these shapes. `k` is the mean L0 (the code budget per token); the aux
/// codes are budgeted at d_in/2 per token (aux_k's default).
pub fn memory_plan(d_in: usize, d_sae: usize, batch: usize, k: usize, precision: Precision) -> MemoryPlan {
    let (d, f) = (d_in as u64, d_sae as u64);
    let p = 2 * f * d + f + d;
    let params = 4 * p;
    // A k-sparse rule under --dense-codes auto with cuBLAS (what a GPU run is): the dense codes
    // path's B x F buffer is there when k is above its crossover (dense::may_run). relu's codes
    // are not k-sized at all; this plan is for the k rules.
    let dense = k as f64 > super::dense::DENSE_ABOVE * d_sae as f64;
    let dims = Dims { dense, ..Dims::new(Shape::new(d_in, d_sae), batch, k, false, precision) };
    let group = |g: Group| Ws::table(dims).iter().filter(|b| b.group == g).map(|b| b.bytes).sum::<u64>();
    let (activations, pre, codes) = (group(Group::Activations), group(Group::Pre), group(Group::Codes));
    let workspace = group(Group::Workspace) + CUBLAS_WORKSPACE;
    MemoryPlan {
        d_in,
        d_sae,
        batch,
        k,
        precision,
        params,
        grads: params,
        adam: 2 * params,
        activations,
        pre,
        codes,
        workspace,
    }
}

/// The largest d_sae (a multiple of 1024) whose plan fits in `gb` GiB at these shapes.
/// The search stops at the workspace's own limit, batch x d_sae below [`MAX_PRE_ENTRIES`] (and
/// d_in x d_sae within [`MAX_WEIGHTS`]): beyond it no step runs, whatever the memory.
pub fn largest_d_sae(gb: f64, d_in: usize, batch: usize, k: usize, precision: Precision) -> usize {
    let limit = ((MAX_PRE_ENTRIES - 1) / batch.max(1) as u64).min(MAX_WEIGHTS / d_in.max(1) as u64) as usize;
    let fits = |f: usize| f <= limit && memory_plan(d_in, f, batch, k, precision).fits(gb);
    if !fits(1024) {
        return 0;
    }
    let (mut lo, mut hi) = (1usize, 2usize);
    while fits(hi * 1024) {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid * 1024) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo * 1024
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "CUDA memory plan: d_in {} d_sae {} batch {} k {} precision {:?}",
            self.d_in, self.d_sae, self.batch, self.k, self.precision
        )?;
        let rows = [
            ("params", self.params, "W_enc, b_enc, W_dec, b_dec (f32, one allocation)"),
            ("grads", self.grads, "same layout"),
            ("adam", self.adam, "m and v"),
            ("activations", self.activations, "B x d: x, xc, x_hat, residual, G, G_aux, E_hat"),
            ("pre", self.pre, "B x F transient (encoder output, read by selection)"),
            ("codes", self.codes, "sparse codes + per-latent view (main + aux)"),
            ("workspace", self.workspace, "selection state, bf16 copies, cuBLAS"),
        ];
        for (name, bytes, what) in rows {
            writeln!(f, "  {name:<12} {:>12}  {what}", human(bytes))?;
        }
        write!(f, "  {:<12} {:>12}", "total", human(self.total()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_plan_adds_up() {
        let p = memory_plan(1024, 8192, 8192, 32, Precision::F32);
        let params = 4 * (2 * 8192 * 1024 + 8192 + 1024) as u64;
        assert_eq!(p.params, params);
        assert_eq!(p.adam, 2 * params);
        assert_eq!(p.pre, 8192 * 8192 * 4);
        assert_eq!(p.total(), p.params + p.grads + p.adam + p.activations + p.pre + p.codes + p.workspace);
        assert!(p.fits(80.0));
        assert!(p.total() < 2 << 30, "{p}");
        let text = p.to_string();
        assert!(text.contains("params") && text.contains("total"));
    }

    #[test]
    fn largest_dictionary_is_monotone_and_tight() {
        let f80 = largest_d_sae(80.0, 4096, 4096, 32, Precision::F32);
        let f40 = largest_d_sae(40.0, 4096, 4096, 32, Precision::F32);
        assert!(f80 > f40 && f40 > 0);
        assert!(memory_plan(4096, f80, 4096, 32, Precision::F32).fits(80.0));
        assert!(!memory_plan(4096, f80 + 1024, 4096, 32, Precision::F32).fits(80.0));
        // ~147 KB per latent at d_in 4096, batch 4096: about half a million latents in 80 GiB.
        assert!((400_000..700_000).contains(&f80), "{f80}");
        assert_eq!(largest_d_sae(0.001, 4096, 4096, 32, Precision::F32), 0);
    }
}
