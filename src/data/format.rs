//! Shard formats: `.npy` (versions 1.0/2.0/3.0, C order, 2-D) and `.safetensors` (one 2-D tensor,
//! or the named one), in float32, float16 or bfloat16, read through a memory map.
//!
//! Every check happens when a shard is opened, and every error names the file and the problem.

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Element type of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[serde(alias = "f32")]
    Float32,
    #[serde(alias = "f16")]
    Float16,
    #[serde(alias = "bf16")]
    Bfloat16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::Float32 => 4,
            Dtype::Float16 | Dtype::Bfloat16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float16 => "float16",
            Dtype::Bfloat16 => "bfloat16",
        }
    }
    /// Parse `float32|f32|float16|f16|bfloat16|bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "float32" | "f32" => Dtype::Float32,
            "float16" | "f16" | "half" => Dtype::Float16,
            "bfloat16" | "bf16" => Dtype::Bfloat16,
            other => bail!("unknown dtype '{other}' (expected float32, float16 or bfloat16)"),
        })
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One memory-mapped shard: `rows` x `d_in` elements of `dtype`, starting at byte `offset`.
pub struct Shard {
    pub path: PathBuf,
    pub dtype: Dtype,
    pub rows: usize,
    pub d_in: usize,
    pub offset: usize,
    pub storage: Storage,
}

/// Where a shard's bytes are: a read-only file map, watched for truncation while it lives
/// ([`super::map_guard`]; the guard is declared first so that it is dropped before the map is
/// unmapped) with the file's identity when it was mapped, or memory registered by the caller
/// ([`super::memory`]).
pub enum Storage {
    Mapped(super::map_guard::Guard, Mmap, OnDisk),
    Memory(std::sync::Arc<super::memory::MemoryView>),
}

/// A mapped file as it was when mapped: a write to it since (in place: same device and inode)
/// changes its size or modification time. A file replaced by a rename is another inode: the map
/// still reads the one it opened, whole, so that is no change for this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnDisk {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl OnDisk {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        Self { dev: meta.dev(), ino: meta.ino(), len: meta.len(), mtime_ns }
    }
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(_, m, _) => m,
            Storage::Memory(v) => v.bytes(),
        }
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("d_in", &self.d_in)
            .field("offset", &self.offset)
            .finish()
    }
}

impl Shard {
    /// Open and validate one shard (format from the extension). `tensor`: safetensors tensor name.
    pub fn open(path: &Path, tensor: Option<&str>) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot read file", path.display()))?;
        if !meta.is_file() {
            bail!("{}: not a regular file", path.display());
        }
        if meta.len() == 0 {
            bail!("{}: empty file (0 bytes)", path.display());
        }
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the mapping is read-only; shards must not be modified while training reads them.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot memory-map", path.display()))?;
        let (dtype, rows, d_in, offset) = match ext.as_str() {
            "npy" => parse_npy(&mmap).map_err(|e| anyhow!("{}: {e}", path.display()))?,
            "safetensors" => parse_safetensors(&mmap, tensor).map_err(|e| anyhow!("{}: {e}", path.display()))?,
            _ => bail!("{}: not a .npy or .safetensors file", path.display()),
        };
        if rows == 0 {
            bail!("{}: zero rows (shape ({rows}, {d_in}))", path.display());
        }
        if d_in == 0 {
            bail!("{}: zero columns (shape ({rows}, {d_in}))", path.display());
        }
        let need = rows as u128 * d_in as u128 * dtype.size() as u128;
        let have = (mmap.len() - offset.min(mmap.len())) as u128;
        if have < need {
            bail!(
                "{}: truncated: the header says ({rows}, {d_in}) {dtype} = {need} bytes of data, the file holds {have}",
                path.display()
            );
        }
        if have > need && ext == "npy" {
            bail!(
                "{}: {} bytes after the ({rows}, {d_in}) {dtype} data the header describes (wrong shape in the header?)",
                path.display(),
                have - need
            );
        }
        let opened = OnDisk::of(&file.metadata().with_context(|| format!("{}: cannot read file", path.display()))?);
        let guard = super::map_guard::guard(&mmap);
        let storage = Storage::Mapped(guard, mmap, opened);
        Ok(Self { path: path.to_path_buf(), dtype, rows, d_in, offset, storage })
    }

    /// The shard of registered memory `memory:NAME` (validated when it was registered).
    pub fn in_memory(name: &str) -> Result<Self> {
        let v = super::memory::lookup(name)?;
        let path = PathBuf::from(format!("{}{name}", super::memory::PREFIX));
        Ok(Self { path, dtype: v.dtype, rows: v.rows, d_in: v.d_in, offset: 0, storage: Storage::Memory(v) })
    }

    pub fn row_bytes(&self) -> usize {
        self.d_in * self.dtype.size()
    }

    /// Raw little-endian bytes of rows `[start, start+n)` (a view into the map).
    pub fn bytes(&self, start: usize, n: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.storage.bytes()[self.offset + start * rb..self.offset + (start + n) * rb]
    }

    /// An error if the file was written to in place since it was opened (its rows read since may
    /// be the new bytes, or a mix), or lost pages under its map (truncated on disk while this
    /// process read it: whatever was read from it since is zeros, not the data). A `stat` of the
    /// path, so callers check the shards a batch read, after reading it.
    pub fn check_intact(&self) -> Result<()> {
        let Storage::Mapped(guard, m, opened) = &self.storage else { return Ok(()) };
        let meta = std::fs::metadata(&self.path);
        if !guard.faulted() {
            let now = match &meta {
                Ok(meta) => OnDisk::of(meta),
                // Gone or unreadable by path: the map still reads the file it opened.
                Err(_) => return Ok(()),
            };
            if (now.dev, now.ino) != (opened.dev, opened.ino) || now == *opened {
                return Ok(());
            }
            bail!(
                "{}: the file was written to on disk while this process read it (it had {} bytes when opened and \
                 now has {}, its modification time changed): rows read from it since may not be the data. A shard \
                 must not change while a run reads it: write new data to another directory (sae data synth and \
                 scripts/harvest.py never rewrite a shard in place)",
                self.path.display(),
                opened.len,
                now.len
            );
        }
        let now = match meta {
            Ok(meta) => format!("it now has {} bytes", meta.len()),
            Err(e) => format!("it cannot be read now: {e}"),
        };
        bail!(
            "{}: the file was truncated or rewritten on disk while this process read it ({now}; it had {} when \
             opened): rows read from it since are lost. A shard must not change while a run reads it: write new \
             data to another directory (sae data synth and scripts/harvest.py never rewrite a shard in place)",
            self.path.display(),
            m.len()
        )
    }

    /// Byte size of the data.
    pub fn data_bytes(&self) -> u64 {
        (self.rows * self.row_bytes()) as u64
    }

    /// Append row `r` as f32 to `out`.
    pub fn push_row_f32(&self, r: usize, out: &mut Vec<f32>) {
        let b = self.bytes(r, 1);
        let start = out.len();
        out.resize(start + self.d_in, 0.0);
        convert_to_f32(self.dtype, b, &mut out[start..]);
    }

    /// Hint the kernel that rows `[start, start+n)` will be read soon.
    pub fn will_need(&self, start: usize, n: usize) {
        let rb = self.row_bytes();
        if let Storage::Mapped(_, m, _) = &self.storage {
            let _ = m.advise_range(memmap2::Advice::WillNeed, self.offset + start * rb, n * rb);
        }
    }

    /// Drop rows `[start, start+n)` from this process's resident set (they stay in the page cache).
    pub fn dont_need(&self, start: usize, n: usize) {
        let rb = self.row_bytes();
        let Storage::Mapped(_, m, _) = &self.storage else { return };
        let (a, b) = page_range(self.offset + start * rb, self.offset + (start + n) * rb, m.len());
        if b > a {
            // SAFETY: the map is read-only and never written: after MADV_DONTNEED a later access
            // re-reads the same file bytes, so no reference can observe different contents.
            unsafe {
                let _ = m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a);
            }
        }
    }

    /// Drop the whole map from the resident set.
    pub fn dont_need_all(&self) {
        self.dont_need(0, self.rows);
    }
}

/// Page range covering `[a, b)` widened to 2 MiB boundaries, clamped to `len`: a read fault maps
/// the pages around the faulting one too (fault-around, and whole large folios of the page cache
/// on recent kernels), and those must be released with it. Releasing a page that is still in use
/// only costs a minor fault later.
fn page_range(a: usize, b: usize, len: usize) -> (usize, usize) {
    const AROUND: usize = 2 << 20;
    let a = a / AROUND * AROUND;
    let b = b.div_ceil(AROUND) * AROUND;
    (a.min(len), b.min(len))
}

/// Convert little-endian elements of `dtype` to f32 (`out.len()` elements). Written as plain loops
/// that the compiler vectorises (the per-element library conversions do not).
pub fn convert_to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::Float32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(s) => out.copy_from_slice(s),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        },
        Dtype::Float16 => {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    unsafe { f16_to_f32_f16c(bytes, out) };
                    return;
                }
            }
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        Dtype::Bfloat16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
    }
}

/// f16 to f32 with the F16C instruction, 8 at a time (`bytes` may be unaligned).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = out.len().min(bytes.len() / 2);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements are in bounds of both slices; unaligned load/store.
        unsafe {
            let h = _mm_loadu_si128(bytes.as_ptr().add(2 * i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for k in i..n {
        out[k] = f16_bits_to_f32(u16::from_le_bytes([bytes[2 * k], bytes[2 * k + 1]]));
    }
}

/// IEEE binary16 to f32, exact for every input (subnormals, infinities, NaN payloads), branch-free.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Exponent and mantissa moved into f32 position, rebiased by multiplying with 2^112 (exact,
    // and handles subnormal halves); infinities and NaNs get the all-ones exponent.
    let scaled = (f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let special = (em << 13) | 0x7f80_0000;
    f32::from_bits(sign | if em >= 0x7c00 { special } else { scaled })
}

/// Parse an npy header: (dtype, rows, cols, data offset).
pub fn parse_npy(buf: &[u8]) -> Result<(Dtype, usize, usize, usize)> {
    if buf.len() < 10 || &buf[..6] != b"\x93NUMPY" {
        bail!("not an npy file (wrong magic: expected \\x93NUMPY)");
    }
    let (major, minor) = (buf[6], buf[7]);
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([buf[8], buf[9]]) as usize, 10),
        2 | 3 => {
            if buf.len() < 12 {
                bail!("npy header truncated");
            }
            (u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize, 12)
        }
        _ => bail!("unsupported npy format version {major}.{minor} (supported: 1.0, 2.0, 3.0)"),
    };
    if minor != 0 {
        bail!("unsupported npy format version {major}.{minor} (supported: 1.0, 2.0, 3.0)");
    }
    let end = start + hlen;
    if buf.len() < end {
        bail!("npy header truncated (header length {hlen}, file {} bytes)", buf.len());
    }
    let text = std::str::from_utf8(&buf[start..end]).map_err(|_| anyhow!("npy header is not valid text"))?;
    let dict = parse_py_dict(text).map_err(|e| anyhow!("malformed npy header {:?}: {e}", text.trim()))?;
    let get = |k: &str| dict.iter().find(|(n, _)| n == k).map(|(_, v)| v);
    let descr = match get("descr") {
        Some(PyVal::Str(s)) => s.clone(),
        Some(PyVal::Other(s)) => bail!("unsupported dtype: structured descr {s} (expected <f4, <f2 or bfloat16)"),
        _ => bail!("malformed npy header: no 'descr' string"),
    };
    match get("fortran_order") {
        Some(PyVal::Bool(false)) => {}
        Some(PyVal::Bool(true)) => {
            bail!("Fortran-order array: save a C-order copy (np.ascontiguousarray(x)) instead")
        }
        _ => bail!("malformed npy header: no 'fortran_order'"),
    }
    let shape = match get("shape") {
        Some(PyVal::Tuple(t)) => t.clone(),
        _ => bail!("malformed npy header: no 'shape' tuple"),
    };
    let dtype = npy_dtype(&descr)?;
    if shape.len() != 2 {
        bail!(
            "{}-D array of shape {:?}: activations must be a 2-D (tokens, d_in) array (reshape with x.reshape(-1, d_in))",
            shape.len(),
            shape
        );
    }
    Ok((dtype, shape[0], shape[1], end))
}

/// npy descr to dtype. bfloat16 from `ml_dtypes` is written as a 2-byte void (`<V2`/`|V2`) or
/// under a name containing `bfloat16`; both are read as bfloat16.
pub fn npy_dtype(descr: &str) -> Result<Dtype> {
    let d = descr.trim();
    if d.contains("bfloat16") {
        return Ok(Dtype::Bfloat16);
    }
    let (order, code) = match d.chars().next() {
        Some(c @ ('<' | '>' | '=' | '|')) => (c, &d[1..]),
        _ => ('=', d),
    };
    if code == "V2" {
        return Ok(Dtype::Bfloat16);
    }
    let dt = match code {
        "f4" => Dtype::Float32,
        "f2" => Dtype::Float16,
        "f8" => bail!("unsupported dtype float64 ({descr}): convert to float32, float16 or bfloat16"),
        _ => bail!("unsupported dtype {descr} (supported: <f4 float32, <f2 float16, bfloat16 as <V2)"),
    };
    if order == '>' {
        bail!("big-endian dtype {descr} is not supported: save with x.astype(x.dtype.newbyteorder('<'))");
    }
    Ok(dt)
}

#[derive(Clone, Debug, PartialEq)]
enum PyVal {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
    Other(String),
}

/// Parse the python dict literal of an npy header.
fn parse_py_dict(s: &str) -> Result<Vec<(String, PyVal)>> {
    let s = s.trim();
    let inner = s.strip_prefix('{').and_then(|x| x.strip_suffix('}')).ok_or_else(|| anyhow!("not a dict"))?;
    let b = inner.as_bytes();
    let mut i = 0;
    let mut out = vec![];
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] as char).is_whitespace() {
            *i += 1;
        }
    };
    let read_str = |i: &mut usize| -> Result<String> {
        let q = b[*i];
        let st = *i + 1;
        let mut j = st;
        while j < b.len() && b[j] != q {
            j += 1;
        }
        if j >= b.len() {
            bail!("unterminated string");
        }
        *i = j + 1;
        Ok(inner[st..j].to_string())
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        if b[i] != b'\'' && b[i] != b'"' {
            bail!("expected a quoted key at byte {i}");
        }
        let key = read_str(&mut i)?;
        skip_ws(&mut i);
        if i >= b.len() || b[i] != b':' {
            bail!("expected ':' after key '{key}'");
        }
        i += 1;
        skip_ws(&mut i);
        if i >= b.len() {
            bail!("missing value for '{key}'");
        }
        let val = match b[i] {
            b'\'' | b'"' => PyVal::Str(read_str(&mut i)?),
            b'(' => {
                let j = inner[i..].find(')').ok_or_else(|| anyhow!("unterminated tuple"))? + i;
                let body = &inner[i + 1..j];
                i = j + 1;
                let mut v = vec![];
                for p in body.split(',') {
                    let p = p.trim().trim_end_matches('L');
                    if p.is_empty() {
                        continue;
                    }
                    v.push(p.parse::<usize>().map_err(|_| anyhow!("bad shape entry '{p}'"))?);
                }
                PyVal::Tuple(v)
            }
            b'[' => {
                // Structured dtype: find the matching bracket.
                let mut depth = 0;
                let mut j = i;
                while j < b.len() {
                    match b[j] {
                        b'[' => depth += 1,
                        b']' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                let v = PyVal::Other(inner[i..(j + 1).min(inner.len())].to_string());
                i = j + 1;
                v
            }
            _ => {
                let st = i;
                while i < b.len() && b[i] != b',' {
                    i += 1;
                }
                match inner[st..i].trim() {
                    "True" => PyVal::Bool(true),
                    "False" => PyVal::Bool(false),
                    o => PyVal::Other(o.to_string()),
                }
            }
        };
        out.push((key, val));
        skip_ws(&mut i);
        if i < b.len() && b[i] == b',' {
            i += 1;
        }
    }
    Ok(out)
}

/// Parse a safetensors header: (dtype, rows, cols, data offset) of the chosen tensor.
pub fn parse_safetensors(buf: &[u8], tensor: Option<&str>) -> Result<(Dtype, usize, usize, usize)> {
    let (n, meta) = safetensors::SafeTensors::read_metadata(buf).map_err(|e| {
        let hint = match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                " (truncated: the file is shorter or longer than its header says)"
            }
            safetensors::SafeTensorError::TensorInvalidInfo => {
                " (a tensor's shape and dtype in the header disagree with the bytes it says it spans)"
            }
            _ => "",
        };
        anyhow!("invalid safetensors file: {e:?}{hint}")
    })?;
    let tensors = meta.tensors();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let name: String = match tensor {
        Some(t) => {
            if !tensors.contains_key(t) {
                bail!("no tensor named '{t}' (tensors: {names:?})");
            }
            t.to_string()
        }
        None => {
            let two_d: Vec<&&String> = names.iter().filter(|n| tensors[n.as_str()].shape.len() == 2).collect();
            match (names.len(), two_d.len()) {
                (0, _) => bail!("the safetensors file holds no tensor"),
                (1, _) => names[0].clone(),
                (_, 1) => (*two_d[0]).clone(),
                _ => bail!("several tensors {names:?}: choose one with --tensor NAME"),
            }
        }
    };
    let info = tensors[name.as_str()];
    let dtype = match info.dtype {
        safetensors::Dtype::F32 => Dtype::Float32,
        safetensors::Dtype::F16 => Dtype::Float16,
        safetensors::Dtype::BF16 => Dtype::Bfloat16,
        other => bail!("tensor '{name}': unsupported dtype {other:?} (supported: F32, F16, BF16)"),
    };
    if info.shape.len() != 2 {
        bail!(
            "tensor '{name}': {}-D shape {:?}: activations must be a 2-D (tokens, d_in) tensor",
            info.shape.len(),
            info.shape
        );
    }
    Ok((dtype, info.shape[0], info.shape[1], 8 + n + info.data_offsets.0))
}

/// npy header (version 1.0, or 2.0 when needed) for a C-order 2-D array.
pub fn npy_header(dtype: Dtype, rows: usize, cols: usize) -> Vec<u8> {
    let descr = match dtype {
        Dtype::Float32 => "<f4",
        Dtype::Float16 => "<f2",
        Dtype::Bfloat16 => "<V2",
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let mut h = Vec::new();
    let base = dict.len() + 1;
    let (v2, pre) = if base + 10 > 65535 { (true, 12) } else { (false, 10) };
    let total = (pre + base).div_ceil(64) * 64;
    let hlen = total - pre;
    h.extend_from_slice(b"\x93NUMPY");
    if v2 {
        h.extend_from_slice(&[2, 0]);
        h.extend_from_slice(&(hlen as u32).to_le_bytes());
    } else {
        h.extend_from_slice(&[1, 0]);
        h.extend_from_slice(&(hlen as u16).to_le_bytes());
    }
    h.extend_from_slice(dict.as_bytes());
    h.resize(total - 1, b' ');
    h.push(b'\n');
    h
}

/// Write a 2-D f32 array as npy in `dtype` (converted).
pub fn write_npy(path: &Path, dtype: Dtype, rows: usize, cols: usize, data: &[f32]) -> Result<()> {
    assert_eq!(data.len(), rows * cols);
    // Atomically: an interrupted write must not leave a shard whose header promises rows that
    // are not there.
    crate::util::atomic::write_atomic_with(path, |w| {
        w.write_all(&npy_header(dtype, rows, cols))?;
        match dtype {
            Dtype::Float32 => w.write_all(bytemuck::cast_slice(data))?,
            Dtype::Float16 => {
                let v: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                w.write_all(bytemuck::cast_slice(&v))?
            }
            Dtype::Bfloat16 => {
                let v: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                w.write_all(bytemuck::cast_slice(&v))?
            }
        }
        Ok(())
    })
}

/// Read a whole 2-D npy/safetensors file as f32 (small files: ground truth).
pub fn read_f32(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let s = Shard::open(path, None)?;
    let mut v = Vec::with_capacity(s.rows * s.d_in);
    for r in 0..s.rows {
        s.push_row_f32(r, &mut v);
    }
    Ok((s.rows, s.d_in, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = npy_header(Dtype::Float16, 7, 3);
        assert_eq!(h.len() % 64, 0);
        let mut buf = h.clone();
        buf.extend(vec![0u8; 7 * 3 * 2]);
        assert_eq!(parse_npy(&buf).unwrap(), (Dtype::Float16, 7, 3, h.len()));
    }

    #[test]
    fn f16_conversion_exact() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_bits_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
            }
        }
    }

    #[test]
    fn f16_slice_conversion_exact() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        for skip in [0usize, 1] {
            // unaligned start and a tail shorter than 8
            let src = &bytes[2 * skip..bytes.len() - 6];
            let mut out = vec![0f32; src.len() / 2];
            convert_to_f32(Dtype::Float16, src, &mut out);
            for (k, o) in out.iter().enumerate() {
                let w = half::f16::from_bits(bits[k + skip]).to_f32();
                assert!(if w.is_nan() { o.is_nan() } else { o.to_bits() == w.to_bits() }, "{:#x}", bits[k + skip]);
            }
        }
    }

    #[test]
    fn descr() {
        assert_eq!(npy_dtype("<V2").unwrap(), Dtype::Bfloat16);
        assert_eq!(npy_dtype("|V2").unwrap(), Dtype::Bfloat16);
        assert_eq!(npy_dtype("bfloat16").unwrap(), Dtype::Bfloat16);
        assert!(npy_dtype(">f4").is_err());
        assert!(npy_dtype("<f8").is_err());
    }
}
