//! Reading a `torch.save(state_dict)` file: the zip, then a restricted pickle machine.
//!
//! The machine knows the opcodes torch's pickler emits at protocols 2-5 for a dict of tensors
//! (and the memo), builds only three things by call, `collections.OrderedDict()`,
//! `torch._utils._rebuild_tensor_v2(...)` and `torch._utils._rebuild_parameter(...)`, and refuses
//! every other global: the same promise as `torch.load(weights_only=True)`, for the subset a
//! state dict needs. Storages may be float32, float16, bfloat16, float64, int32 or int64; any
//! stride is read (a transposed view saved as it is, say).

use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// A tensor of the state dict, its values widened or narrowed to one type per kind.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// float32, float16, bfloat16 and float64 storages, as f32.
    Float(Vec<f32>),
    /// int32 and int64 storages.
    Int(Vec<i64>),
}

/// The entries of the state dict in `path`, in the file's order.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, LoadedTensor)>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a torch zip file ({e}); files saved by torch < 1.6 or with \
             _use_new_zipfile_serialization=False are not read: load and torch.save it again",
            path.display()
        )
    })?;
    let pkl = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).and_then(|n| n.ok()).map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .with_context(|| format!("{}: a zip without <name>/data.pkl, so not a torch.save file", path.display()))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut record = |name: &str| -> Result<Vec<u8>> {
        let full = format!("{prefix}{name}");
        let mut f = zip.by_name(&full).with_context(|| format!("{}: no record {full}", path.display()))?;
        // The zip's declared size is not trusted for the allocation.
        let mut v = Vec::with_capacity(f.size().min(1 << 28) as usize);
        f.read_to_end(&mut v).with_context(|| format!("{}: cannot read record {full}", path.display()))?;
        Ok(v)
    };
    if let Ok(order) = record("byteorder") {
        ensure!(
            order == b"little",
            "{}: byteorder {:?}: only little-endian files are read",
            path.display(),
            String::from_utf8_lossy(&order)
        );
    }
    let root = Machine::default().run(&record("data.pkl")?).with_context(|| format!("{}: {pkl}", path.display()))?;
    let V::Dict(items) = root else { bail!("{}: {pkl} holds a {}, not a state dict", path.display(), root.kind()) };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let V::Str(name) = k else { bail!("{}: a state dict key is a {}, not a string", path.display(), k.kind()) };
        let V::Tensor(t) = v else { bail!("{}: entry '{name}' is a {}, not a tensor", path.display(), v.kind()) };
        let bytes = record(&format!("data/{}", t.key))?;
        let tensor = t.gather(&bytes).with_context(|| format!("{}: tensor '{name}'", path.display()))?;
        out.push((name, tensor));
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dtype {
    F32,
    F16,
    Bf16,
    F64,
    I32,
    I64,
}

impl Dtype {
    fn of_storage(class: &str) -> Result<Self> {
        Ok(match class {
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::Bf16,
            "DoubleStorage" => Self::F64,
            "IntStorage" => Self::I32,
            "LongStorage" => Self::I64,
            other => bail!("storage torch.{other}: only float32/16, bfloat16, float64, int32 and int64 are read"),
        })
    }
    fn size(self) -> usize {
        match self {
            Self::F16 | Self::Bf16 => 2,
            Self::F32 | Self::I32 => 4,
            Self::F64 | Self::I64 => 8,
        }
    }
}

/// A tensor as the pickle describes it: a view of a storage record.
#[derive(Clone, Debug)]
struct TensorRef {
    key: String,
    dtype: Dtype,
    numel: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    /// The view's values read out of the storage's bytes, row-major.
    fn gather(&self, bytes: &[u8]) -> Result<LoadedTensor> {
        let size = self.dtype.size();
        ensure!(
            self.numel.checked_mul(size).is_some_and(|n| bytes.len() >= n),
            "storage record data/{} holds {} bytes, its pickle says {} values of {size}",
            self.key,
            bytes.len(),
            self.numel
        );
        let overflow = || anyhow::anyhow!("shape {:?} stride {:?} overflows", self.shape, self.stride);
        let count = self.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n)).ok_or_else(overflow)?;
        // A view of more values than its storage holds is a broadcast, which no state dict has.
        ensure!(count <= self.numel, "shape {:?} holds {count} values, its storage {}", self.shape, self.numel);
        // The largest element offset the view reaches must lie in the storage.
        let last = self
            .shape
            .iter()
            .zip(&self.stride)
            .try_fold(self.offset, |a, (&n, &s)| n.saturating_sub(1).checked_mul(s).and_then(|x| a.checked_add(x)))
            .ok_or_else(overflow)?;
        ensure!(
            count == 0 || last < self.numel,
            "shape {:?} stride {:?} offset {} reaches element {last} of a storage of {}",
            self.shape,
            self.stride,
            self.offset,
            self.numel
        );
        let mut index = Vec::with_capacity(count);
        let mut pos = vec![0usize; self.shape.len()];
        for _ in 0..count {
            index.push(self.offset + pos.iter().zip(&self.stride).map(|(p, s)| p * s).sum::<usize>());
            for a in (0..pos.len()).rev() {
                pos[a] += 1;
                if pos[a] < self.shape[a] {
                    break;
                }
                pos[a] = 0;
            }
        }
        let at = |i: usize| &bytes[i * size..(i + 1) * size];
        let data = match self.dtype {
            Dtype::F32 => {
                TensorData::Float(index.iter().map(|&i| f32::from_le_bytes(at(i).try_into().unwrap())).collect())
            }
            Dtype::F16 => TensorData::Float(
                index.iter().map(|&i| f16::from_le_bytes(at(i).try_into().unwrap()).to_f32()).collect(),
            ),
            Dtype::Bf16 => TensorData::Float(
                index.iter().map(|&i| bf16::from_le_bytes(at(i).try_into().unwrap()).to_f32()).collect(),
            ),
            Dtype::F64 => {
                TensorData::Float(index.iter().map(|&i| f64::from_le_bytes(at(i).try_into().unwrap()) as f32).collect())
            }
            Dtype::I32 => {
                TensorData::Int(index.iter().map(|&i| i32::from_le_bytes(at(i).try_into().unwrap()) as i64).collect())
            }
            Dtype::I64 => {
                TensorData::Int(index.iter().map(|&i| i64::from_le_bytes(at(i).try_into().unwrap())).collect())
            }
        };
        Ok(LoadedTensor { shape: self.shape.clone(), data })
    }
}

/// A value on the machine's stack.
#[derive(Clone, Debug)]
enum V {
    Mark,
    None,
    /// A bool or a float: operands a state dict passes (`requires_grad`) but never needs.
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(String, String),
    Storage {
        key: String,
        dtype: Dtype,
        numel: usize,
    },
    Tensor(TensorRef),
}

impl V {
    fn kind(&self) -> &'static str {
        match self {
            V::Mark => "mark",
            V::None => "None",
            V::Bool => "bool",
            V::Int(_) => "int",
            V::Float => "float",
            V::Str(_) => "str",
            V::Tuple(_) => "tuple",
            V::List(_) => "list",
            V::Dict(_) => "dict",
            V::Global(..) => "global",
            V::Storage { .. } => "storage",
            V::Tensor(_) => "tensor",
        }
    }
    fn usize(&self, what: &str) -> Result<usize> {
        match self {
            V::Int(i) if *i >= 0 => Ok(*i as usize),
            other => bail!("{what}: expected a non-negative int, found {}", other.kind()),
        }
    }
    fn usizes(&self, what: &str) -> Result<Vec<usize>> {
        match self {
            V::Tuple(v) | V::List(v) => v.iter().map(|x| x.usize(what)).collect(),
            other => bail!("{what}: expected a tuple, found {}", other.kind()),
        }
    }
}

/// The pickle's bytes and the position read to.
struct Bytes<'a> {
    p: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self.p.get(self.at..self.at + n).context("the pickle ends inside an opcode")?;
        self.at += n;
        Ok(s)
    }
    /// A GLOBAL operand: up to the next newline.
    fn line(&mut self) -> Result<String> {
        let n = self.p[self.at..].iter().position(|&b| b == b'\n').context("GLOBAL without a newline")?;
        let s = String::from_utf8_lossy(self.take(n)?).into_owned();
        self.at += 1;
        Ok(s)
    }
}

#[derive(Default)]
struct Machine {
    stack: Vec<V>,
    memo: HashMap<u32, V>,
}

impl Machine {
    fn pop(&mut self) -> Result<V> {
        match self.stack.pop() {
            Some(V::Mark) | None => bail!("the pickle pops past its stack"),
            Some(v) => Ok(v),
        }
    }
    /// Everything above the topmost mark, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<V>> {
        let at =
            self.stack.iter().rposition(|v| matches!(v, V::Mark)).context("the pickle closes a mark it never set")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> Result<&mut V> {
        self.stack.last_mut().filter(|v| !matches!(v, V::Mark)).context("the pickle's stack is empty")
    }

    fn run(mut self, p: &[u8]) -> Result<V> {
        let mut r = Bytes { p, at: 0 };
        loop {
            let op = r.take(1)?[0];
            match op {
                0x80 => {
                    let v = r.take(1)?[0];
                    ensure!((2..=5).contains(&v), "pickle protocol {v}: only 2-5 are read");
                }
                0x95 => drop(r.take(8)?), // FRAME: a length hint
                b'c' => {
                    let (module, name) = (r.line()?, r.line()?);
                    self.stack.push(V::Global(module, name));
                }
                0x93 => {
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (V::Str(module), V::Str(name)) = (module, name) else { bail!("STACK_GLOBAL of non-strings") };
                    self.stack.push(V::Global(module, name));
                }
                b'q' => {
                    let k = r.take(1)?[0] as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'r' => {
                    let k = u32::from_le_bytes(r.take(4)?.try_into().unwrap());
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' {
                        r.take(1)?[0] as u32
                    } else {
                        u32::from_le_bytes(r.take(4)?.try_into().unwrap())
                    };
                    let v = self.memo.get(&k).with_context(|| format!("memo {k} read before it was written"))?.clone();
                    self.stack.push(v);
                }
                b'(' => self.stack.push(V::Mark),
                b')' => self.stack.push(V::Tuple(vec![])),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    ensure!(self.stack.len() >= n, "the pickle pops past its stack");
                    let items = self.stack.split_off(self.stack.len() - n);
                    ensure!(!items.iter().any(|v| matches!(v, V::Mark)), "a tuple of a mark");
                    self.stack.push(V::Tuple(items));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(V::Tuple(items));
                }
                b']' => self.stack.push(V::List(vec![])),
                b'a' => {
                    let v = self.pop()?;
                    let V::List(l) = self.top()? else { bail!("APPEND to a non-list") };
                    l.push(v);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let V::List(l) = self.top()? else { bail!("APPENDS to a non-list") };
                    l.extend(items);
                }
                b'}' => self.stack.push(V::Dict(vec![])),
                b's' => {
                    let (v, k) = (self.pop()?, self.pop()?);
                    let V::Dict(d) = self.top()? else { bail!("SETITEM on a non-dict") };
                    d.push((k, v));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    ensure!(items.len() % 2 == 0, "SETITEMS with an odd number of items");
                    let V::Dict(d) = self.top()? else { bail!("SETITEMS on a non-dict") };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => r.take(1)?[0] as usize,
                        b'X' => u32::from_le_bytes(r.take(4)?.try_into().unwrap()) as usize,
                        _ => usize::try_from(u64::from_le_bytes(r.take(8)?.try_into().unwrap()))?,
                    };
                    let s = std::str::from_utf8(r.take(n)?).context("a string that is not UTF-8")?.to_string();
                    self.stack.push(V::Str(s));
                }
                b'K' => {
                    let v = r.take(1)?[0] as i64;
                    self.stack.push(V::Int(v));
                }
                b'M' => {
                    let v = u16::from_le_bytes(r.take(2)?.try_into().unwrap()) as i64;
                    self.stack.push(V::Int(v));
                }
                b'J' => {
                    let v = i32::from_le_bytes(r.take(4)?.try_into().unwrap()) as i64;
                    self.stack.push(V::Int(v));
                }
                0x8a => {
                    let n = r.take(1)?[0] as usize;
                    ensure!(n <= 8, "an int of {n} bytes");
                    let b = r.take(n)?;
                    let mut v = 0i64;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // negative: two's complement of n bytes
                    }
                    self.stack.push(V::Int(v));
                }
                b'G' => {
                    r.take(8)?;
                    self.stack.push(V::Float);
                }
                b'N' => self.stack.push(V::None),
                0x88 | 0x89 => self.stack.push(V::Bool),
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(storage(pid)?);
                }
                b'R' => {
                    let (args, f) = (self.pop()?, self.pop()?);
                    let V::Tuple(args) = args else { bail!("REDUCE with arguments that are not a tuple") };
                    self.stack.push(call(f, args)?);
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (its `_metadata`) or of a parameter;
                    // a state dict's tensors do not need it.
                    self.pop()?;
                    self.top()?;
                }
                b'.' => return self.pop(),
                other => bail!("pickle opcode 0x{other:02x} is not one a state dict needs"),
            }
        }
    }
}

/// A persistent id `('storage', torch.<Type>Storage, key, location, numel)`.
fn storage(pid: V) -> Result<V> {
    let V::Tuple(t) = pid else { bail!("a persistent id that is not a tuple") };
    match t.as_slice() {
        [V::Str(tag), V::Global(module, class), V::Str(key), _location, numel]
            if tag == "storage" && module == "torch" =>
        {
            Ok(V::Storage { key: key.clone(), dtype: Dtype::of_storage(class)?, numel: numel.usize("storage size")? })
        }
        _ => bail!("a persistent id that is not ('storage', torch.<Type>Storage, key, location, numel)"),
    }
}

/// The only callables a state dict needs.
fn call(f: V, args: Vec<V>) -> Result<V> {
    let V::Global(module, name) = f else { bail!("REDUCE of a {}, not a global", f.kind()) };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") if args.is_empty() => Ok(V::Dict(vec![])),
        ("torch._utils", "_rebuild_tensor_v2") => {
            ensure!(args.len() >= 4, "_rebuild_tensor_v2 with {} arguments", args.len());
            let V::Storage { key, dtype, numel } = &args[0] else { bail!("_rebuild_tensor_v2 of a {}", args[0].kind()) };
            let shape = args[2].usizes("tensor size")?;
            let stride = args[3].usizes("tensor stride")?;
            ensure!(shape.len() == stride.len(), "tensor size {shape:?} and stride {stride:?} differ in rank");
            Ok(V::Tensor(TensorRef {
                key: key.clone(),
                dtype: *dtype,
                numel: *numel,
                offset: args[1].usize("storage offset")?,
                shape,
                stride,
            }))
        }
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            match args.into_iter().next() {
                Some(t @ V::Tensor(_)) => Ok(t),
                _ => bail!("_rebuild_parameter of something that is not a tensor"),
            }
        }
        (m, n) => bail!("the pickle calls {m}.{n}, which a state dict of tensors does not (refused, as torch.load(weights_only=True) would)"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::write::{state_dict_bytes, Tensor};
    use super::*;

    fn file(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ae.pt");
        std::fs::write(&p, bytes).unwrap();
        (dir, p)
    }

    #[test]
    fn what_the_writer_writes_reads_back() {
        let w: Vec<f32> = (0..35).map(|i| i as f32 * 0.25 - 3.0).collect();
        let k = [7i32];
        let bytes =
            state_dict_bytes("ae", &[("w", Tensor::F32(&w, vec![5, 7])), ("k", Tensor::I32(&k, vec![]))]).unwrap();
        let (_d, p) = file(&bytes);
        let sd = read_state_dict(&p).unwrap();
        assert_eq!(sd.len(), 2);
        assert_eq!(sd[0], ("w".into(), LoadedTensor { shape: vec![5, 7], data: TensorData::Float(w) }));
        assert_eq!(sd[1], ("k".into(), LoadedTensor { shape: vec![], data: TensorData::Int(vec![7]) }));
    }

    /// A pickle as torch writes it (memo, protocol 2, a transposed view, a half storage, a
    /// parameter), assembled by hand: the values come out row-major.
    #[test]
    fn torch_style_pickles_with_memo_views_and_halves_are_read() {
        let mut p: Vec<u8> = vec![0x80, 2];
        p.extend_from_slice(b"ccollections\nOrderedDict\nq\x00)Rq\x01(");
        let s = |v: &mut Vec<u8>, t: &str| {
            v.push(b'X');
            v.extend_from_slice(&(t.len() as u32).to_le_bytes());
            v.extend_from_slice(t.as_bytes());
        };
        // 'wt': a 3 x 2 view with stride (1, 3) of a 6-value float storage: the transpose of [[0,1,2],[3,4,5]]
        s(&mut p, "wt");
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((");
        s(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\nq\x03");
        s(&mut p, "0");
        s(&mut p, "cpu");
        p.extend_from_slice(b"K\x06tQK\x00K\x03K\x02\x86K\x01K\x03\x86\x89h\x00)Rtq\x04R");
        // 'h': a parameter of a half storage, 2 values at offset 1 of 3
        s(&mut p, "h");
        p.extend_from_slice(b"ctorch._utils\n_rebuild_parameter\nh\x02((");
        s(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nHalfStorage\n");
        s(&mut p, "1");
        s(&mut p, "cpu");
        p.extend_from_slice(b"K\x03tQK\x01K\x02\x85K\x01\x85\x89h\x00)RtR\x88h\x00)R\x87R");
        p.extend_from_slice(b"u.");
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        use std::io::Write;
        z.start_file("archive/data.pkl", o).unwrap();
        z.write_all(&p).unwrap();
        z.start_file("archive/data/0", o).unwrap();
        z.write_all(bytemuck::cast_slice(&[0f32, 1., 2., 3., 4., 5.])).unwrap();
        z.start_file("archive/data/1", o).unwrap();
        let halves: Vec<u8> = [9.0f32, 0.5, -2.0].iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        z.write_all(&halves).unwrap();
        let (_d, path) = file(&z.finish().unwrap().into_inner());
        let sd = read_state_dict(&path).unwrap();
        assert_eq!(sd[0].1, LoadedTensor { shape: vec![3, 2], data: TensorData::Float(vec![0., 3., 1., 4., 2., 5.]) });
        assert_eq!(sd[1].1, LoadedTensor { shape: vec![2], data: TensorData::Float(vec![0.5, -2.0]) });
    }

    #[test]
    fn a_pickle_that_calls_anything_else_is_refused() {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        use std::io::Write;
        z.start_file("a/data.pkl", o).unwrap();
        z.write_all(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.").unwrap();
        let (_d, path) = file(&z.finish().unwrap().into_inner());
        let e = read_state_dict(&path).unwrap_err();
        assert!(format!("{e:#}").contains("calls os.system"), "{e:#}");
    }

    /// A hostile view: 2^40 values broadcast (stride 0) from a one-value storage is refused
    /// before anything is allocated for it.
    #[test]
    fn a_view_larger_than_its_storage_is_refused() {
        let mut p: Vec<u8> =
            b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage".to_vec();
        p.extend_from_slice(b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00");
        p.extend_from_slice(&[0x8a, 6, 0, 0, 0, 0, 0, 1, 0x85, b'K', 0, 0x85, 0x89]);
        p.extend_from_slice(b"ccollections\nOrderedDict\n)RtRu.");
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        use std::io::Write;
        z.start_file("a/data.pkl", o).unwrap();
        z.write_all(&p).unwrap();
        z.start_file("a/data/0", o).unwrap();
        z.write_all(&1f32.to_le_bytes()).unwrap();
        let (_d, path) = file(&z.finish().unwrap().into_inner());
        let e = format!("{:#}", read_state_dict(&path).unwrap_err());
        assert!(e.contains("tensor 'w'") && e.contains("holds 1099511627776 values, its storage 1"), "{e}");
    }

    #[test]
    fn truncated_and_foreign_files_are_errors_naming_the_file() {
        let w = [1f32; 4];
        let bytes = state_dict_bytes("ae", &[("w", Tensor::F32(&w, vec![4]))]).unwrap();
        let (_d, p) = file(&bytes[..bytes.len() / 2]);
        let e = format!("{:#}", read_state_dict(&p).unwrap_err());
        assert!(e.contains("ae.pt") && e.contains("not a torch zip file"), "{e}");
        let (_d, p) = file(b"\x80\x02}q\x00.");
        let e = format!("{:#}", read_state_dict(&p).unwrap_err());
        assert!(e.contains("torch < 1.6"), "{e}");
        // a storage record shorter than its pickle says
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes.clone())).unwrap();
        let mut pkl = vec![];
        z.by_name("ae/data.pkl").unwrap().read_to_end(&mut pkl).unwrap();
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        use std::io::Write;
        w.start_file("ae/data.pkl", o).unwrap();
        w.write_all(&pkl).unwrap();
        w.start_file("ae/data/0", o).unwrap();
        w.write_all(&[0u8; 12]).unwrap();
        let (_d, p) = file(&w.finish().unwrap().into_inner());
        let e = format!("{:#}", read_state_dict(&p).unwrap_err());
        assert!(e.contains("tensor 'w'") && e.contains("holds 12 bytes"), "{e}");
    }
}
