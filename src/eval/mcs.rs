//! Cross-SAE maximum cosine similarity (the bimodality paper, sections 1 and 4.2): for each
//! latent i of SAE A, `MCS_i = max_j cos(A_i, B_j)` over the rows j of SAE B, for the decoder
//! rows and, separately, the encoder rows; its summary (mean, median, shares near 1 and below
//! 0.5, Sarle's bimodality coefficient) and its Pearson correlation with A's alignment score
//! `W_enc_i . W_dec_i` (as `weight_metrics` computes it).
//!
//! Blockwise: a tile of A's rows times a tile of B's rows (one f32 GEMM, the CPU backend's
//! `gemm::abt`) gives the dot products, divided by the f64 row norms; a running max and argmax
//! per row of A is kept across B's tiles. Memory is one `tile_a x tile_b` buffer: the F_A x F_B
//! matrix is never formed, so 65k x 65k latents fit.

use crate::backend::cpu::gemm::abt;
use crate::export::load::{checkpoint_dir, load_sae};
use crate::util::stats::{median, pearson, shape, Shape};
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Rows of A and of B per tile (a 4096 x 4096 f32 buffer: 64 MiB).
pub const TILE: usize = 4096;
/// "Near 1" and "far" thresholds of the summary.
pub const HIGH: f64 = 0.9;
pub const LOW: f64 = 0.5;

/// Per row of A: the best cosine to any row of B and that row's index (ties: the lowest index).
#[derive(Clone, Debug, PartialEq)]
pub struct MaxCos {
    pub value: Vec<f64>,
    pub argmax: Vec<usize>,
}

fn row_norms(m: &[f32], d: usize) -> Vec<f64> {
    m.chunks(d).map(|r| r.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt()).collect()
}

/// `max_j cos(a_i, b_j)` for every row i of `a` (F_A x d) over the rows of `b` (F_B x d), in
/// tiles of `tile_a` x `tile_b` rows. A zero row has cosine 0 with everything.
pub fn max_cosine(a: &[f32], b: &[f32], d: usize, tile_a: usize, tile_b: usize) -> MaxCos {
    assert!(d > 0 && tile_a > 0 && tile_b > 0);
    assert_eq!(a.len() % d, 0);
    assert_eq!(b.len() % d, 0);
    let (fa, fb) = (a.len() / d, b.len() / d);
    let (na, nb) = (row_norms(a, d), row_norms(b, d));
    let inv = |n: f64| if n > 0.0 { 1.0 / n } else { 0.0 };
    let inv_b: Vec<f64> = nb.iter().map(|&n| inv(n)).collect();
    let mut value = vec![f64::NEG_INFINITY; fa];
    let mut argmax = vec![0usize; fa];
    let mut buf = vec![0f32; tile_a.min(fa) * tile_b.min(fb)];
    for a0 in (0..fa).step_by(tile_a) {
        let ra = tile_a.min(fa - a0);
        let at = &a[a0 * d..(a0 + ra) * d];
        for b0 in (0..fb).step_by(tile_b) {
            let rb = tile_b.min(fb - b0);
            let dots = &mut buf[..ra * rb];
            abt(at, &b[b0 * d..(b0 + rb) * d], ra, rb, d, dots, false);
            let ib = &inv_b[b0..b0 + rb];
            value[a0..a0 + ra]
                .par_iter_mut()
                .zip(argmax[a0..a0 + ra].par_iter_mut())
                .zip(dots.par_chunks(rb))
                .enumerate()
                .for_each(|(i, ((best, arg), row))| {
                    let ia = inv(na[a0 + i]);
                    for (j, (&dot, &s)) in row.iter().zip(ib).enumerate() {
                        let c = dot as f64 * ia * s;
                        if c > *best {
                            *best = c;
                            *arg = b0 + j;
                        }
                    }
                });
        }
    }
    MaxCos { value, argmax }
}

/// Summary of one side's MCS values.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct McsSummary {
    pub mean: f64,
    pub median: f64,
    /// Share of A's latents with MCS > 0.9 (a near-copy in B).
    pub frac_above_0_9: f64,
    /// Share with MCS < 0.5 (nothing like it in B).
    pub frac_below_0_5: f64,
    /// Skewness, excess kurtosis and Sarle's bimodality coefficient (`None` for fewer than 4
    /// latents or constant values).
    pub shape: Option<Shape>,
}

pub fn summarise(v: &[f64]) -> McsSummary {
    let n = v.len().max(1) as f64;
    McsSummary {
        mean: v.iter().sum::<f64>() / n,
        median: median(v),
        frac_above_0_9: v.iter().filter(|&&c| c > HIGH).count() as f64 / n,
        frac_below_0_5: v.iter().filter(|&&c| c < LOW).count() as f64 / n,
        shape: shape(v),
    }
}

/// One side (decoder or encoder rows): per latent of A its MCS and best match in B.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct McsSide {
    pub mcs: Vec<f64>,
    pub argmax: Vec<usize>,
    pub summary: McsSummary,
}

impl McsSide {
    fn from(m: MaxCos) -> Self {
        let summary = summarise(&m.value);
        Self { mcs: m.value, argmax: m.argmax, summary }
    }
}

/// `sae eval A --against B`: A's latents against B's.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Against {
    /// B (the SAE compared against).
    pub path: PathBuf,
    pub d_sae: usize,
    pub decoder: McsSide,
    pub encoder: McsSide,
    /// Pearson correlation over A's latents of decoder MCS and A's alignment `W_enc_i . W_dec_i`.
    pub decoder_mcs_vs_alignment: Option<f64>,
    /// The same for the encoder MCS.
    pub encoder_mcs_vs_alignment: Option<f64>,
}

/// Decoder and encoder MCS of `a` against `b` (both F x d row-major, `w_dec` and `w_enc` as
/// [`crate::export::ExportedSae`] holds them); `alignment`: A's per-latent alignment scores.
pub fn cross(
    a_dec: &[f32],
    a_enc: &[f32],
    b_dec: &[f32],
    b_enc: &[f32],
    d: usize,
    alignment: &[f64],
    tile: usize,
) -> (McsSide, McsSide, Option<f64>, Option<f64>) {
    let dec = McsSide::from(max_cosine(a_dec, b_dec, d, tile, tile));
    let enc = McsSide::from(max_cosine(a_enc, b_enc, d, tile, tile));
    let (cd, ce) = (pearson(&dec.mcs, alignment), pearson(&enc.mcs, alignment));
    (dec, enc, cd, ce)
}

/// Load A (`a_path`) and B (`b_path`) and compare them; A and B must have the same d_in.
pub fn against(a_path: &Path, b_path: &Path, alignment: &[f64]) -> Result<Against> {
    let a = load_sae(a_path).with_context(|| format!("--against: loading {}", a_path.display()))?;
    let b = load_sae(b_path).with_context(|| format!("--against: loading {}", b_path.display()))?;
    ensure!(
        a.d_in == b.d_in,
        "--against: {} has d_in {} but {} has d_in {}: cosines need the same input space",
        a_path.display(),
        a.d_in,
        b_path.display(),
        b.d_in
    );
    ensure!(alignment.len() == a.d_sae, "alignment scores for {} latents, A has {}", alignment.len(), a.d_sae);
    let (decoder, encoder, dc, ec) = cross(&a.w_dec, &a.w_enc, &b.w_dec, &b.w_enc, a.d_in, alignment, TILE);
    Ok(Against {
        path: checkpoint_dir(b_path),
        d_sae: b.d_sae,
        decoder,
        encoder,
        decoder_mcs_vs_alignment: dc,
        encoder_mcs_vs_alignment: ec,
    })
}

/// Histogram of A's decoder and encoder MCS against B (`who`: A's label), to see whether it is
/// bimodal.
pub fn picture(path: &Path, who: &str, x: &Against) -> Result<()> {
    use crate::plot::{histogram, HistSpec, Sample};
    let samples = [
        Sample { label: "decoder rows".into(), values: x.decoder.mcs.clone() },
        Sample { label: "encoder rows".into(), values: x.encoder.mcs.clone() },
    ];
    let bc = |s: &McsSide| s.summary.shape.map(|s| format!("{:.3}", s.bimodality_coefficient)).unwrap_or("-".into());
    let lo = x.decoder.mcs.iter().chain(&x.encoder.mcs).copied().fold(0.0, f64::min);
    let b = x.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    histogram(
        path,
        &samples,
        &HistSpec {
            title: format!("max cosine of {who}'s latents to {b}'s"),
            x_label: "max_j cos(A_i, B_j)".into(),
            range: Some((lo, 1.0)),
            bins: 60,
            integer: false,
            note: Some(format!("bimodality coeff. dec {}, enc {}; > 0.555: bimodal", bc(&x.decoder), bc(&x.encoder))),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rows_have_cosine_zero() {
        let a = [0.0f32, 0.0, 1.0, 0.0];
        let b = [0.0f32, 1.0, 0.0, 0.0];
        let m = max_cosine(&a, &b, 2, 1, 1);
        assert_eq!(m.value, vec![0.0, 0.0]);
        assert_eq!(m.argmax, vec![0, 0]);
    }
}
