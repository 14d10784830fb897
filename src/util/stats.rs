//! Small statistics shared by the data reader and the evaluation: median, moments, Pearson
//! correlation and Sarle's bimodality coefficient (all in f64).

/// Median (mean of the two middle values for an even count; 0 when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        0.5 * (s[m - 1] + s[m])
    }
}

/// Pearson correlation `sum (x - mx)(y - my) / sqrt(sum (x - mx)^2 sum (y - my)^2)` (two-pass,
/// f64); `None` when fewer than two pairs or either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len());
    let n = x.len();
    if n < 2 {
        return None;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n as f64, y.iter().sum::<f64>() / n as f64);
    let (mut sxy, mut sxx, mut syy) = (0f64, 0f64, 0f64);
    for (a, b) in x.iter().zip(y) {
        let (a, b) = (a - mx, b - my);
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
    }
    (sxx > 0.0 && syy > 0.0).then(|| (sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0))
}

/// Shape of a sample: bias-corrected skewness `G1`, excess kurtosis `G2` and Sarle's
/// bimodality coefficient `BC = (G1^2 + 1) / (G2 + 3 (n-1)^2 / ((n-2)(n-3)))`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    pub skewness: f64,
    pub excess_kurtosis: f64,
    /// Above 5/9 (the value of a uniform distribution) suggests bimodality; a normal sample
    /// gives about 1/3, two equal point masses 1.
    pub bimodality_coefficient: f64,
}

/// Skewness, kurtosis and bimodality coefficient of `v` (central moments `m_j = mean (v -
/// mean)^j`, `g1 = m3 / m2^1.5`, `g2 = m4 / m2^2 - 3`, `G1 = g1 sqrt(n(n-1)) / (n-2)`, `G2 =
/// (n-1) ((n+1) g2 + 6) / ((n-2)(n-3))`); `None` for fewer than 4 values or a constant sample.
pub fn shape(v: &[f64]) -> Option<Shape> {
    let n = v.len();
    if n < 4 {
        return None;
    }
    let nf = n as f64;
    let m = v.iter().sum::<f64>() / nf;
    let (mut m2, mut m3, mut m4) = (0f64, 0f64, 0f64);
    for x in v {
        let d = x - m;
        m2 += d * d;
        m3 += d * d * d;
        m4 += d * d * d * d;
    }
    let (m2, m3, m4) = (m2 / nf, m3 / nf, m4 / nf);
    if m2 <= 0.0 {
        return None;
    }
    let g1 = m3 / m2.powf(1.5);
    let g2 = m4 / (m2 * m2) - 3.0;
    let skew = g1 * (nf * (nf - 1.0)).sqrt() / (nf - 2.0);
    let kurt = (nf - 1.0) * ((nf + 1.0) * g2 + 6.0) / ((nf - 2.0) * (nf - 3.0));
    let bc = (skew * skew + 1.0) / (kurt + 3.0 * (nf - 1.0).powi(2) / ((nf - 2.0) * (nf - 3.0)));
    Some(Shape { skewness: skew, excess_kurtosis: kurt, bimodality_coefficient: bc })
}

/// The `q`-quantile of `sorted` (ascending) by linear interpolation between order statistics
/// (numpy's default): position `q (n - 1)`; 0 when empty.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + frac * (sorted[hi] - sorted[lo])
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantiles_interpolate_between_order_statistics() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(super::quantile_sorted(&v, 0.5), 3.0);
        assert!((super::quantile_sorted(&v, 0.1) - 1.4).abs() < 1e-12);
        assert_eq!(super::quantile_sorted(&v, 1.0), 5.0);
        assert_eq!(super::quantile_sorted(&[], 0.3), 0.0);
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(super::median(&[]), 0.0);
    }
}
