//! A line-by-line host model of kernels/select.cu (radix select with 8-bit digits, tie cutoff,
//! batch tie split, final mask), checked against the CPU sparsifiers on tie-heavy matrices. It
//! validates the selection algorithm on machines without a GPU; tests/cuda_parity.rs validates
//! the kernels themselves against the same CPU code.

use crate::sparse::SparseCodes;
use crate::sparsify::{self, Selection};

const NO_KEEP: u32 = u32::MAX;

fn act_key(v: f32) -> u32 {
    if v > 0.0 {
        v.to_bits()
    } else {
        0
    }
}

struct Filter<'a> {
    cmask: Option<&'a [u8]>,
    col_rule: Option<(&'a [u32], &'a [i32])>,
}

fn filtered_key(pre: &[f32], cols: usize, b: usize, i: usize, f: &Filter) -> u32 {
    let mut k = act_key(pre[b * cols + i]);
    if k != 0 && f.cmask.is_some_and(|m| m[i] == 0) {
        k = 0;
    }
    if let Some((t, c)) = f.col_rule {
        if k != 0 && !(k > t[i] || (k == t[i] && b as i32 <= c[i])) {
            k = 0;
        }
    }
    k
}

/// sel_line_radix: (threshold key, tie cutoff) of one line.
fn line_radix(keys: &[u32], budget: u32) -> (u32, i32) {
    if budget == 0 {
        return (NO_KEEP, -1);
    }
    let (mut prefix, mut mask, mut remaining) = (0u32, 0u32, budget);
    for shift in [24u32, 16, 8, 0] {
        let mut hist = [0u32; 256];
        for &k in keys {
            if k != 0 && (k & mask) == prefix {
                hist[((k >> shift) & 0xff) as usize] += 1;
            }
        }
        if shift == 24 && hist.iter().sum::<u32>() <= budget {
            return (0, -1);
        }
        let mut cum = 0;
        for bin in (0..256).rev() {
            if cum + hist[bin] >= remaining {
                prefix |= (bin as u32) << shift;
                remaining -= cum;
                break;
            }
            cum += hist[bin];
        }
        mask |= 0xff << shift;
    }
    (prefix, tie_cutoff(keys, prefix, remaining))
}

fn tie_cutoff(keys: &[u32], thr: u32, need: u32) -> i32 {
    if need == 0 || thr == 0 || thr == NO_KEEP {
        return -1;
    }
    let mut seen = 0;
    for (p, &k) in keys.iter().enumerate() {
        if k == thr {
            seen += 1;
            if seen == need {
                return p as i32;
            }
        }
    }
    -1
}

fn row_keys(pre: &[f32], cols: usize, b: usize, f: &Filter) -> Vec<u32> {
    (0..cols).map(|i| filtered_key(pre, cols, b, i, f)).collect()
}

fn col_rule(pre: &[f32], rows: usize, cols: usize, m: &[usize]) -> (Vec<u32>, Vec<i32>) {
    let none = Filter { cmask: None, col_rule: None };
    let (mut t, mut c) = (vec![0; cols], vec![0; cols]);
    for j in 0..cols {
        let keys: Vec<u32> = (0..rows).map(|b| filtered_key(pre, cols, b, j, &none)).collect();
        (t[j], c[j]) = line_radix(&keys, m[j] as u32);
    }
    (t, c)
}

fn row_rule(pre: &[f32], rows: usize, cols: usize, k: usize, f: &Filter) -> (Vec<u32>, Vec<i32>) {
    (0..rows).map(|b| line_radix(&row_keys(pre, cols, b, f), k as u32)).unzip()
}

fn batch_rule(pre: &[f32], rows: usize, cols: usize, k: usize) -> (Vec<u32>, Vec<i32>) {
    let all: Vec<u32> = pre.iter().map(|&v| act_key(v)).collect();
    let (thr, _) = line_radix(&all, (k * rows) as u32);
    if thr == 0 {
        return (vec![0; rows], vec![-1; rows]);
    }
    let above = all.iter().filter(|&&x| x > thr).count() as u32;
    let mut left = (k * rows) as u32 - above;
    let none = Filter { cmask: None, col_rule: None };
    (0..rows)
        .map(|b| {
            let keys = row_keys(pre, cols, b, &none);
            let eq = keys.iter().filter(|&&x| x == thr).count() as u32;
            let take = eq.min(left);
            left -= take;
            (thr, tie_cutoff(&keys, thr, take))
        })
        .unzip()
}

enum Mode<'a> {
    Theta(Option<&'a [f32]>),
    Row(&'a [u32], &'a [i32]),
    Col(&'a [u32], &'a [i32]),
}

fn mask(pre: &[f32], rows: usize, cols: usize, mode: Mode, f: &Filter) -> SparseCodes {
    SparseCodes::from_mask(pre, rows, cols, |b, i| {
        if let Mode::Theta(theta) = mode {
            let v = pre[b * cols + i];
            return f.cmask.is_none_or(|m| m[i] != 0) && v > 0.0 && theta.is_none_or(|t| v > t[i]);
        }
        let key = filtered_key(pre, cols, b, i, f);
        if key == 0 {
            return false;
        }
        match mode {
            Mode::Row(t, c) => key > t[b] || (key == t[b] && i as i32 <= c[b]),
            Mode::Col(t, c) => key > t[i] || (key == t[i] && b as i32 <= c[i]),
            Mode::Theta(_) => unreachable!(),
        }
    })
}

/// The model's answer for a CPU selection rule.
fn model_select(pre: &[f32], rows: usize, cols: usize, sel: &Selection) -> SparseCodes {
    let none = Filter { cmask: None, col_rule: None };
    match *sel {
        Selection::TopK { k } => {
            let (t, c) = row_rule(pre, rows, cols, k, &none);
            mask(pre, rows, cols, Mode::Row(&t, &c), &none)
        }
        Selection::BatchTopK { k } => {
            let (t, c) = batch_rule(pre, rows, cols, k);
            mask(pre, rows, cols, Mode::Row(&t, &c), &none)
        }
        Selection::Wta { m } => {
            let (t, c) = col_rule(pre, rows, cols, m);
            mask(pre, rows, cols, Mode::Col(&t, &c), &none)
        }
        Selection::Hybrid { m, k_max } => {
            let (ct, cc) = col_rule(pre, rows, cols, m);
            let f = Filter { cmask: None, col_rule: Some((&ct, &cc)) };
            let (t, c) = row_rule(pre, rows, cols, k_max, &f);
            mask(pre, rows, cols, Mode::Row(&t, &c), &f)
        }
        Selection::Relu => mask(pre, rows, cols, Mode::Theta(None), &none),
        Selection::JumpRelu { theta } => mask(pre, rows, cols, Mode::Theta(Some(theta)), &none),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn model_matches_cpu_sparsifiers() {
        let (rows, cols) = (61, 47);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let matrices: Vec<Vec<f32>> = vec![
            (0..rows * cols).map(|_| rng.random_range(-4i32..=4) as f32 * 0.5).collect(),
            (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
            vec![1.0; rows * cols],
            // denormals and large values: keys spanning every radix digit
            (0..rows * cols).map(|i| f32::from_bits(1 + (i as u32 * 2_654_435_761) % 0x7f00_0000)).collect(),
        ];
        let m_varied: Vec<usize> = (0..cols).map(|_| rng.random_range(0..9)).collect();
        let m_uniform = vec![3usize; cols];
        let theta: Vec<f32> = (0..cols).map(|_| rng.random_range(-0.5f32..1.0)).collect();
        for pre in &matrices {
            let sels = [
                Selection::TopK { k: 5 },
                Selection::TopK { k: 0 },
                Selection::TopK { k: cols },
                Selection::BatchTopK { k: 5 },
                Selection::BatchTopK { k: cols },
                Selection::Wta { m: &m_uniform },
                Selection::Wta { m: &m_varied },
                Selection::Hybrid { m: &m_varied, k_max: 2 },
                Selection::Relu,
                Selection::JumpRelu { theta: &theta },
            ];
            for sel in &sels {
                let want = sparsify::select(pre, rows, cols, sel);
                let got = model_select(pre, rows, cols, sel);
                assert_eq!(got, want, "{sel:?}");
            }
        }
    }

    #[test]
    fn aux_model_matches_cpu() {
        let (rows, cols) = (40, 30);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let pre: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-3i32..=3) as f32).collect();
        let cand: Vec<u32> = (0..cols as u32).filter(|i| i % 4 != 0).collect();
        let mut cm = vec![0u8; cols];
        cand.iter().for_each(|&c| cm[c as usize] = 1);
        let f = Filter { cmask: Some(&cm), col_rule: None };
        let (t, c) = row_rule(&pre, rows, cols, 4, &f);
        let got = mask(&pre, rows, cols, Mode::Row(&t, &c), &f);
        let want = crate::backend::cpu::aux::select_aux(&pre, rows, cols, &cand, 4);
        assert_eq!(got, want);
    }
}
