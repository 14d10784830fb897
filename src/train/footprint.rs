//! The host memory a run will need, checked before anything is allocated or written. Without
//! it, a `--d-sae` too large for the machine aborted in the allocator (or overflowed a size and
//! panicked), or was killed by the kernel's OOM killer after minutes of swapping, and left a
//! `config.json` that made the corrected command's `--out` "not empty".

use anyhow::{bail, Result};

/// Bytes of host memory a training step keeps live, at least: the parameters with their
/// gradients and Adam's two moments (4 copies of 2 F d + F + d floats), plus, on the CPU
/// backend, three batch x d_sae buffers (pre-activations, codes, their gradients). A lower
/// bound: exceeding the machine's memory is certain failure.
pub fn training_bytes(d_in: usize, d_sae: usize, batch: usize, on_cpu: bool) -> u128 {
    let (d, f, b) = (d_in as u128, d_sae as u128, batch as u128);
    let params = 2 * f * d + f + d;
    let copies = if on_cpu { 4 } else { 3 };
    let batch_buffers = if on_cpu { 3 * b * f } else { 0 };
    4 * (copies * params + batch_buffers)
}

/// This machine's physical memory (`MemTotal` of /proc/meminfo), when it can be read.
pub fn total_memory() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gib(bytes: u128) -> f64 {
    bytes as f64 / (1u128 << 30) as f64
}

/// Bytes of the held-out set, kept in memory as f32 rows for the whole run.
pub fn held_out_bytes(d_in: usize, eval_tokens: usize) -> u128 {
    4 * d_in as u128 * eval_tokens as u128
}

/// Refuse a run whose held-out set, or whose [`training_bytes`] with it, exceed this machine's
/// memory, naming the options.
pub fn check(d_in: usize, d_sae: usize, batch: usize, eval_tokens: usize, on_cpu: bool) -> Result<()> {
    let held_out = held_out_bytes(d_in, eval_tokens);
    let have = total_memory();
    let limit = have.unwrap_or(isize::MAX as u128).min(isize::MAX as u128);
    if held_out > limit {
        bail!(
            "invalid --eval-tokens {eval_tokens}: the held-out set of {eval_tokens} rows of width {d_in} takes {:.1} GiB, \
             more than this machine's {:.1} GiB of memory; lower --eval-tokens",
            gib(held_out),
            gib(limit)
        );
    }
    let need = training_bytes(d_in, d_sae, batch, on_cpu) + held_out;
    if let Some(have) = have {
        check_against(need, have, d_in, d_sae, batch)?;
    }
    // Even where /proc/meminfo is missing, a size past the address space is refused.
    if need > isize::MAX as u128 {
        check_against(need, isize::MAX as u128, d_in, d_sae, batch)?;
    }
    Ok(())
}

fn check_against(need: u128, have: u128, d_in: usize, d_sae: usize, batch: usize) -> Result<()> {
    if need > have {
        bail!(
            "--d-sae {d_sae} with d_in {d_in} and --batch-size {batch} needs at least {:.1} GiB of memory (parameters, \
             their gradients and Adam's moments, the batch x d_sae buffers and the held-out set), more than this \
             machine's {:.1} GiB: lower --d-sae or --batch-size (or --eval-tokens)",
            gib(need),
            gib(have)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_counts_each_buffer_and_never_overflows() {
        // d 3, F 5, B 7: params 2*15 + 5 + 3 = 38; CPU 4 copies + 3*35 batch floats.
        assert_eq!(training_bytes(3, 5, 7, true), 4 * (4 * 38 + 105));
        assert_eq!(training_bytes(3, 5, 7, false), 4 * 3 * 38);
        let huge = training_bytes(576, usize::MAX, 4096, true);
        assert!(huge > u64::MAX as u128);
        let e = check_against(huge, 24 << 30, 576, usize::MAX, 4096).unwrap_err().to_string();
        assert!(e.contains("--d-sae") && e.contains("24.0 GiB") && e.contains("lower"), "{e}");
        assert!(check_against(1 << 20, 24 << 30, 576, 4608, 4096).is_ok());
        assert_eq!(held_out_bytes(576, 8192), 4 * 576 * 8192);
        let e = check(16, 64, 64, 99_999_999_999_999, true).unwrap_err().to_string();
        assert!(e.contains("invalid --eval-tokens 99999999999999") && e.contains("lower --eval-tokens"), "{e}");
    }
}
