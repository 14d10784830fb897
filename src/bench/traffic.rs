//! The bytes each phase of a CPU training step moves at least, so that `sae bench step` can put
//! every phase next to the machine's measured memory bandwidth: a phase far below it is
//! compute- or latency-bound (worth optimising), one near it is at its floor for its algorithm.
//!
//! A model, not a measurement. f32 values and u32 indices are 4 bytes; each array a phase
//! must read or write counts once; rows gathered by kept entry (decoder rows in decode, G and
//! xc rows in backward) count in full for every entry, so a phase served from cache can exceed
//! the memory bandwidth. The aux losses' dense-block products are GEMMs (compute-bound, like the
//! encoder's) and are not counted; their selection's read of `pre` is.

use crate::backend::PhaseTimes;
use serde::Serialize;

/// What the model needs to know about one step.
#[derive(Clone, Copy, Debug)]
pub struct StepShape {
    pub d_in: usize,
    pub d_sae: usize,
    pub batch: usize,
    /// Kept entries of the main codes.
    pub nnz: f64,
    /// Whether an aux loss ran (it selects from `pre` once more).
    pub aux: bool,
}

/// Bytes per phase (the `PhaseTimes` fields, in bytes), and GB/s at the measured phase times.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PhaseTraffic {
    pub bytes: PhaseTimes,
    pub gb_per_s: PhaseTimes,
}

/// The minimum bytes per phase of one step.
pub fn step_bytes(s: &StepShape) -> PhaseTimes {
    let (d, f, b) = (s.d_in as f64, s.d_sae as f64, s.batch as f64);
    let w = 4.0;
    let params = 2.0 * f * d + f + d;
    PhaseTimes {
        // x and W_enc read, pre written.
        encode: w * (b * d + f * d + b * f),
        // pre read (twice with an aux loss), the codes (index + value) written.
        select: w * b * f * if s.aux { 2.0 } else { 1.0 } + 2.0 * w * s.nnz,
        // x read; decoder rows gathered for x_hat and again for dz; residual and G written; dz.
        decode: w * (b * d + 2.0 * s.nnz * d + 2.0 * b * d + s.nnz),
        // G and xc rows gathered per entry; dW_enc, dW_dec written; W_enc read for db_dec.
        backward: w * (2.0 * s.nnz * d + 3.0 * f * d),
        // Adam: parameters, gradient, both moments read; parameters and moments written.
        optimizer: w * 7.0 * params,
    }
}

impl PhaseTraffic {
    /// The model's bytes for `shape` against measured phase times in milliseconds.
    pub fn new(shape: &StepShape, ms: &PhaseTimes) -> Self {
        let bytes = step_bytes(shape);
        let rate = |by: f64, t: f64| if t > 0.0 { by / (t * 1e-3) / 1e9 } else { 0.0 };
        let gb_per_s = PhaseTimes {
            encode: rate(bytes.encode, ms.encode),
            select: rate(bytes.select, ms.select),
            decode: rate(bytes.decode, ms.decode),
            backward: rate(bytes.backward, ms.backward),
            optimizer: rate(bytes.optimizer, ms.optimizer),
        };
        Self { bytes, gb_per_s }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_counted_bytes_and_rates() {
        // d 2, F 3, B 4, 5 kept entries, no aux.
        let s = StepShape { d_in: 2, d_sae: 3, batch: 4, nnz: 5.0, aux: false };
        let by = step_bytes(&s);
        assert_eq!(by.encode, 4.0 * (8.0 + 6.0 + 12.0));
        assert_eq!(by.select, 4.0 * 12.0 + 40.0);
        assert_eq!(by.decode, 4.0 * (8.0 + 20.0 + 16.0 + 5.0));
        assert_eq!(by.backward, 4.0 * (20.0 + 18.0));
        assert_eq!(by.optimizer, 4.0 * 7.0 * (12.0 + 3.0 + 2.0));
        let aux = step_bytes(&StepShape { aux: true, ..s });
        assert_eq!(aux.select - by.select, 4.0 * 12.0);
        // 1e9 bytes in 1000 ms is 1 GB/s.
        let t = PhaseTraffic::new(&s, &PhaseTimes { decode: by.decode / 1e6, ..Default::default() });
        assert!((t.gb_per_s.decode - 1.0).abs() < 1e-12);
        assert_eq!(t.gb_per_s.select, 0.0, "a phase with no time has no rate");
    }
}
