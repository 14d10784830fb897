//! Small order statistics shared by the data reader and the evaluation.

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
