//! Dataset resolution: a file, directory or glob (or a manifest) to a validated set of
//! activation shards sharing `d_in` and `dtype`, plus the row-norm sample and the helpers the
//! reader's filter and scale are built on.

use super::format::{Dtype, Shard};
use super::manifest::{Manifest, GROUND_TRUTH, MANIFEST};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// A validated set of shards sharing `d_in` and `dtype`.
#[derive(Debug)]
pub struct Dataset {
    /// What the user gave (file, directory or glob).
    pub spec: PathBuf,
    pub shards: Vec<Shard>,
    pub d_in: usize,
    pub dtype: Dtype,
    /// The manifest checked against the shards, when one was found.
    pub manifest: Option<(PathBuf, Manifest)>,
    /// Directory holding the shards (and the manifest / ground truth when present).
    pub root: PathBuf,
}

fn has_wildcard(s: &str) -> bool {
    s.contains('*') || s.contains('?') || s.contains('[')
}

/// Match a file name against a glob pattern with `*`, `?` and `[...]` classes.
pub fn glob_match(pat: &str, name: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    fn rec(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| rec(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && rec(&p[1..], &n[1..]),
            Some('[') => {
                let Some(end) = p.iter().position(|&c| c == ']') else {
                    return !n.is_empty() && n[0] == '[' && rec(&p[1..], &n[1..]);
                };
                if n.is_empty() {
                    return false;
                }
                let (neg, set) = match p.get(1) {
                    Some('!') | Some('^') => (true, &p[2..end]),
                    _ => (false, &p[1..end]),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= set[i] <= n[0] && n[0] <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == n[0];
                        i += 1;
                    }
                }
                hit != neg && rec(&p[end + 1..], &n[1..])
            }
            Some(c) => !n.is_empty() && n[0] == *c && rec(&p[1..], &n[1..]),
        }
    }
    rec(&p, &n)
}

fn has_ext(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

fn is_shard_name(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    (l.ends_with(".npy") || l.ends_with(".safetensors")) && l != GROUND_TRUTH
}

/// Resolve a file / directory / glob to shard paths (sorted) and the manifest to check, if any.
pub fn resolve(spec: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>, PathBuf)> {
    let s = spec.to_string_lossy();
    if s.is_empty() {
        bail!("empty data path");
    }
    if has_wildcard(&s) {
        let parent = spec.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let pat = spec.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("{s}: invalid glob"))?;
        if has_wildcard(&parent.to_string_lossy()) {
            bail!("{s}: wildcards are only supported in the file name, not in directories");
        }
        let rd = std::fs::read_dir(parent)
            .with_context(|| format!("{s}: cannot list directory {} of the glob", parent.display()))?;
        let mut files = vec![];
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if glob_match(pat, &name) && e.path().is_file() && name != MANIFEST {
                files.push(e.path());
            }
        }
        files.sort();
        if files.is_empty() {
            bail!("{s}: no file matches the glob");
        }
        let m = parent.join(MANIFEST);
        return Ok((files, m.is_file().then_some(m), parent.to_path_buf()));
    }
    if !spec.exists() {
        bail!("{}", crate::util::paths::missing(spec, "data path"));
    }
    if spec.is_dir() {
        let m = spec.join(MANIFEST);
        if m.is_file() {
            let man = Manifest::load(&m)?;
            if man.shards.is_empty() {
                bail!("{}: field shards is empty", m.display());
            }
            let files: Vec<PathBuf> = man.shards.iter().map(|x| spec.join(&x.file)).collect();
            for f in &files {
                if !f.is_file() {
                    bail!("{}: listed in {} (field shards) but missing", f.display(), m.display());
                }
            }
            return Ok((files, Some(m), spec.to_path_buf()));
        }
        let mut files = vec![];
        for e in std::fs::read_dir(spec).with_context(|| format!("{s}: cannot list directory"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if is_shard_name(&name) && e.path().is_file() {
                files.push(e.path());
            }
        }
        files.sort();
        if files.is_empty() {
            bail!("{s}: directory holds no .npy or .safetensors file");
        }
        return Ok((files, None, spec.to_path_buf()));
    }
    let root = spec.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    if spec.file_name().is_some_and(|n| n == MANIFEST) {
        return resolve(&root);
    }
    let m = root.join(MANIFEST);
    Ok((vec![spec.to_path_buf()], m.is_file().then_some(m), root))
}

impl Dataset {
    /// Open and validate every shard: format, header, dtype, shape, size; shared d_in and dtype;
    /// the manifest when present.
    pub fn open(spec: &Path, tensor: Option<&str>) -> Result<Self> {
        if let Some(name) = super::memory::name_of(spec) {
            let sh = Shard::in_memory(name)?;
            let (d_in, dtype) = (sh.d_in, sh.dtype);
            let root = PathBuf::from(".");
            return Ok(Self { spec: spec.to_path_buf(), shards: vec![sh], d_in, dtype, manifest: None, root });
        }
        let (files, manifest_path, root) = resolve(spec)?;
        // `sae data synth` holds the directory's lock while it writes shards: read now, a run
        // would train on the shards written so far, without a word.
        if crate::train::rundir::being_written(&root) {
            bail!(
                "{}: {} is being written now (another sae process holds {}): wait for it to finish",
                spec.display(),
                root.display(),
                root.join(crate::train::rundir::LOCK_FILE).display()
            );
        }
        if let (Some(t), Some(npy)) = (tensor, files.iter().find(|f| has_ext(f, "npy"))) {
            bail!(
                "--tensor {t}: {} is a .npy file, which holds one unnamed array; --tensor chooses a tensor \
                 in .safetensors shards only (drop it for .npy data)",
                npy.display()
            );
        }
        let manifest = match &manifest_path {
            Some(p) => Some((p.clone(), Manifest::load(p)?)),
            None => None,
        };
        let mut shards: Vec<Shard> = Vec::with_capacity(files.len());
        // The same file twice (a manifest listing `a.npy` and `./a.npy`, or a link to a shard)
        // would put one copy's held-out rows in the other copy's training rows.
        let mut seen: Vec<(PathBuf, &PathBuf)> = Vec::with_capacity(files.len());
        for f in &files {
            let canonical = f.canonicalize().unwrap_or_else(|_| f.clone());
            if let Some((_, first)) = seen.iter().find(|(c, _)| *c == canonical) {
                let listed = manifest_path.as_ref().map(|m| format!(" (listed twice in {})", m.display()));
                bail!(
                    "{}: the same file as {}{}: each shard may appear once",
                    f.display(),
                    first.display(),
                    listed.unwrap_or_default()
                );
            }
            seen.push((canonical, f));
            let sh = Shard::open(f, tensor)?;
            if let Some(first) = shards.first() {
                if sh.d_in != first.d_in {
                    bail!(
                        "{}: d_in {} differs from {} in {} (all shards must share d_in)",
                        f.display(),
                        sh.d_in,
                        first.d_in,
                        first.path.display()
                    );
                }
                if sh.dtype != first.dtype {
                    bail!(
                        "{}: dtype {} differs from {} in {} (all shards must share the dtype)",
                        f.display(),
                        sh.dtype,
                        first.dtype,
                        first.path.display()
                    );
                }
            }
            if let Some((mp, m)) = &manifest {
                m.check(mp, &sh)?;
            }
            shards.push(sh);
        }
        let d_in = shards[0].d_in;
        let dtype = shards[0].dtype;
        Ok(Self { spec: spec.to_path_buf(), shards, d_in, dtype, manifest, root })
    }

    /// An error naming the first shard written to or truncated on disk since it was opened
    /// ([`super::format::Shard::check_intact`]); callers check after reading, before using what
    /// they read.
    pub fn check_intact(&self) -> Result<()> {
        self.shards.iter().try_for_each(|s| s.check_intact())
    }

    /// [`Self::check_intact`] for the shards `indices` (those a batch read from).
    pub fn check_intact_of(&self, indices: &[u32]) -> Result<()> {
        indices.iter().try_for_each(|&i| self.shards[i as usize].check_intact())
    }

    pub fn total_rows(&self) -> usize {
        self.shards.iter().map(|s| s.rows).sum()
    }
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.data_bytes()).sum()
    }

    /// (shard, row) of global row `g`.
    pub fn locate(&self, mut g: usize) -> (usize, usize) {
        for (i, s) in self.shards.iter().enumerate() {
            if g < s.rows {
                return (i, g);
            }
            g -= s.rows;
        }
        panic!("row out of range");
    }

    /// `ground_truth.npy` beside the shards, checked against d_in.
    pub fn ground_truth(&self) -> Result<Option<Vec<f32>>> {
        if super::memory::name_of(&self.spec).is_some() {
            return Ok(None);
        }
        let p = self.root.join(GROUND_TRUTH);
        if !p.is_file() {
            return Ok(None);
        }
        let (_, d, v) = super::format::read_f32(&p)?;
        if d != self.d_in {
            bail!("{}: d_in {d} differs from the data's d_in {}", p.display(), self.d_in);
        }
        Ok(Some(v))
    }
}

/// Row norms of an evenly spaced sample of up to `n` rows (non-finite rows are left out;
/// second value: how many were).
pub fn sample_norms(ds: &Dataset, n: usize) -> (Vec<f64>, usize) {
    let total = ds.total_rows();
    let n = n.min(total).max(1);
    let mut norms = Vec::with_capacity(n);
    let mut bad = 0;
    let mut row = Vec::with_capacity(ds.d_in);
    for i in 0..n {
        let g = (i as u128 * total as u128 / n as u128) as usize;
        let (s, r) = ds.locate(g);
        row.clear();
        ds.shards[s].push_row_f32(r, &mut row);
        let sq = sum_sq(&row);
        if sq.is_finite() {
            norms.push(sq.sqrt());
        } else {
            bad += 1;
        }
        // A read maps the row's neighbourhood too (up to megabytes with large folios): release
        // it at once so the sample does not pull the whole data set into the resident set.
        ds.shards[s].dont_need(r, 1);
    }
    for s in &ds.shards {
        s.dont_need_all();
    }
    (norms, bad)
}

/// Sum of squares in f64 (vectorisable); NaN/Inf when the row holds a non-finite value.
pub fn sum_sq(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            acc[k] += c[k] as f64 * c[k] as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &v in it.remainder() {
        s += v as f64 * v as f64;
    }
    s
}

pub use crate::util::stats::median;
