//! Learning-rate schedule: linear warm-up, constant, linear decay to 0 over the last
//! `decay_frac` of the steps (SPEC "Optimiser and schedule").

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub lr: f64,
    pub warmup: u64,
    pub total: u64,
    pub decay_frac: f64,
}

impl Schedule {
    /// Learning rate of step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        let warm = if self.warmup > 0 { ((step + 1) as f64 / self.warmup as f64).min(1.0) } else { 1.0 };
        let decay_steps = (self.total as f64 * self.decay_frac).round() as u64;
        let decay_start = self.total - decay_steps.min(self.total);
        let decay =
            if decay_steps > 0 && step >= decay_start { (self.total - step) as f64 / decay_steps as f64 } else { 1.0 };
        self.lr * warm * decay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_flat_then_decay() {
        let s = Schedule { lr: 1.0, warmup: 10, total: 100, decay_frac: 0.2 };
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert!((s.at(9) - 1.0).abs() < 1e-12);
        assert!((s.at(50) - 1.0).abs() < 1e-12);
        assert!((s.at(80) - 1.0).abs() < 1e-12); // first decay step: (100-80)/20
        assert!((s.at(90) - 0.5).abs() < 1e-12);
        assert!((s.at(99) - 0.05).abs() < 1e-12);
    }

    #[test]
    fn no_warmup_no_decay() {
        let s = Schedule { lr: 2.0, warmup: 0, total: 5, decay_frac: 0.0 };
        assert!((0..5).all(|i| s.at(i) == 2.0));
    }
}
