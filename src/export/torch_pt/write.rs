//! Writing a state dict as `torch.save` does (the layout: [`super`]).

use anyhow::{ensure, Context, Result};
use std::io::{Cursor, Write};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::ALIGNMENT;

/// One tensor of a state dict: row-major data and its shape (`[]` for a scalar).
#[derive(Clone)]
pub enum Tensor<'a> {
    F32(&'a [f32], Vec<usize>),
    I32(&'a [i32], Vec<usize>),
}

impl Tensor<'_> {
    fn shape(&self) -> &[usize] {
        match self {
            Self::F32(_, s) | Self::I32(_, s) => s,
        }
    }
    fn numel(&self) -> usize {
        match self {
            Self::F32(d, _) => d.len(),
            Self::I32(d, _) => d.len(),
        }
    }
    /// The storage class `torch.load` rebuilds it with.
    fn storage_class(&self) -> &'static str {
        match self {
            Self::F32(..) => "FloatStorage",
            Self::I32(..) => "IntStorage",
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            Self::F32(d, _) => bytemuck::cast_slice(d),
            Self::I32(d, _) => bytemuck::cast_slice(d),
        }
    }
}

/// The bytes of `torch.save(OrderedDict(entries))`, the archive's folder named `archive_name`
/// (torch uses the file's stem).
pub fn state_dict_bytes(archive_name: &str, entries: &[(&str, Tensor<'_>)]) -> Result<Vec<u8>> {
    for (name, t) in entries {
        let numel: usize = t.shape().iter().product();
        ensure!(numel == t.numel(), "tensor '{name}': shape {:?} holds {numel} values, data {}", t.shape(), t.numel());
    }
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Stored).with_alignment(ALIGNMENT);
    let mut record = |name: &str, data: &[u8]| -> Result<()> {
        zip.start_file(format!("{archive_name}/{name}"), opts).context("torch.save archive")?;
        zip.write_all(data).context("torch.save archive")
    };
    record("data.pkl", &pickle(entries))?;
    record(".format_version", b"1")?;
    record(".storage_alignment", ALIGNMENT.to_string().as_bytes())?;
    record("byteorder", b"little")?;
    for (key, (_, t)) in entries.iter().enumerate() {
        record(&format!("data/{key}"), t.bytes())?;
    }
    record("version", b"3\n")?;
    Ok(zip.finish().context("torch.save archive")?.into_inner())
}

/// The pickle of the state dict (`data.pkl`); storage keys are the entries' indices.
fn pickle(entries: &[(&str, Tensor<'_>)]) -> Vec<u8> {
    let mut p = Pickle(vec![0x80, 2]); // PROTO 2
    p.ordered_dict();
    p.op(b'('); // MARK: the items
    for (key, (name, t)) in entries.iter().enumerate() {
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'('); // MARK: its arguments
        {
            p.op(b'('); // MARK: the persistent id
            p.str("storage");
            p.global("torch", t.storage_class());
            p.str(&key.to_string());
            p.str("cpu");
            p.int(t.numel());
            p.op(b't'); // TUPLE
            p.op(b'Q'); // BINPERSID
        }
        p.int(0); // storage offset
        let shape = t.shape();
        let mut stride = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        p.int_tuple(shape);
        p.int_tuple(&stride);
        p.op(0x89); // NEWFALSE: requires_grad
        p.ordered_dict(); // backward hooks
        p.op(b't'); // TUPLE
        p.op(b'R'); // REDUCE
    }
    p.op(b'u'); // SETITEMS
    p.op(b'.'); // STOP
    p.0
}

struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }
    /// GLOBAL `module name`.
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    /// `collections.OrderedDict()`.
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')'); // EMPTY_TUPLE
        self.op(b'R'); // REDUCE
    }
    /// BINUNICODE.
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    /// The shortest of BININT1, BININT2, BININT and LONG1 that holds `v`.
    fn int(&mut self, v: usize) {
        if v < 0x100 {
            self.0.extend_from_slice(&[b'K', v as u8]);
        } else if v < 0x1_0000 {
            self.0.push(b'M');
            self.0.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= i32::MAX as usize {
            self.0.push(b'J');
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, with a zero byte on top if the top bit is set.
            let mut bytes = (v as u64).to_le_bytes().to_vec();
            while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] & 0x80 == 0 {
                bytes.pop();
            }
            self.0.extend_from_slice(&[0x8a, bytes.len() as u8]);
            self.0.extend_from_slice(&bytes);
        }
    }
    fn int_tuple(&mut self, v: &[usize]) {
        if v.is_empty() {
            self.op(b')'); // EMPTY_TUPLE
        } else {
            self.op(b'('); // MARK
            v.iter().for_each(|&x| self.int(x));
            self.op(b't'); // TUPLE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The pickle of a two-entry state dict, byte for byte: the opcodes `pickletools.dis` shows
    /// for `torch.save(OrderedDict(w=torch.zeros(3, 2), k=torch.tensor(5, dtype=torch.int)))`
    /// (torch 2.15), less the memo (BINPUT / BINGET).
    #[test]
    fn the_pickle_is_torchs_state_dict_pickle() {
        let w = [0f32; 6];
        let k = [5i32];
        let got = pickle(&[("w", Tensor::F32(&w, vec![3, 2])), ("k", Tensor::I32(&k, vec![]))]);
        let mut want: Vec<u8> = vec![0x80, 2];
        let od = b"ccollections\nOrderedDict\n)R";
        want.extend_from_slice(od);
        want.push(b'(');
        let s = |v: &mut Vec<u8>, t: &str| {
            v.push(b'X');
            v.extend_from_slice(&(t.len() as u32).to_le_bytes());
            v.extend_from_slice(t.as_bytes());
        };
        // 'w' -> _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 6), 0, (3, 2), (2, 1), False, OrderedDict())
        s(&mut want, "w");
        want.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut want, "storage");
        want.extend_from_slice(b"ctorch\nFloatStorage\n");
        s(&mut want, "0");
        s(&mut want, "cpu");
        want.extend_from_slice(&[
            b'K', 6, b't', b'Q', b'K', 0, b'(', b'K', 3, b'K', 2, b't', b'(', b'K', 2, b'K', 1, b't', 0x89,
        ]);
        want.extend_from_slice(od);
        want.extend_from_slice(b"tR");
        // 'k' -> a scalar of IntStorage '1': empty size and stride
        s(&mut want, "k");
        want.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut want, "storage");
        want.extend_from_slice(b"ctorch\nIntStorage\n");
        s(&mut want, "1");
        s(&mut want, "cpu");
        want.extend_from_slice(&[b'K', 1, b't', b'Q', b'K', 0, b')', b')', 0x89]);
        want.extend_from_slice(od);
        want.extend_from_slice(b"tRu.");
        assert_eq!(got, want);
    }

    #[test]
    fn ints_take_the_shortest_opcode() {
        let enc = |v: usize| {
            let mut p = Pickle(vec![]);
            p.int(v);
            p.0
        };
        assert_eq!(enc(255), vec![b'K', 255]);
        assert_eq!(enc(256), vec![b'M', 0, 1]);
        assert_eq!(enc(70_000), [vec![b'J'], 70_000i32.to_le_bytes().to_vec()].concat());
        // 2^31: LONG1 of 5 bytes (00 00 00 80 00: the zero on top keeps it positive).
        assert_eq!(enc(1 << 31), vec![0x8a, 5, 0, 0, 0, 0x80, 0]);
        assert_eq!(enc(1 << 32), vec![0x8a, 5, 0, 0, 0, 0, 1]);
    }

    /// The archive: torch's record names under one folder, each record's data 64-byte aligned
    /// and stored, the storages holding the tensors' bytes.
    #[test]
    fn the_archive_holds_aligned_stored_records() {
        let w: Vec<f32> = (0..35).map(|i| i as f32 * 0.5 - 3.0).collect();
        let k = [7i32];
        let bytes =
            state_dict_bytes("ae", &[("w", Tensor::F32(&w, vec![5, 7])), ("k", Tensor::I32(&k, vec![]))]).unwrap();
        let mut z = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        let names: Vec<String> = (0..z.len()).map(|i| z.by_index(i).unwrap().name().unwrap().to_string()).collect();
        assert_eq!(
            names,
            ["data.pkl", ".format_version", ".storage_alignment", "byteorder", "data/0", "data/1", "version"]
                .map(|n| format!("ae/{n}"))
        );
        for i in 0..z.len() {
            let f = z.by_index(i).unwrap();
            assert_eq!(f.compression(), CompressionMethod::Stored, "{:?}", f.name());
            assert_eq!(f.data_start().unwrap() % 64, 0, "{:?} is not 64-byte aligned", f.name());
        }
        let mut read = |name: &str| {
            let mut v = vec![];
            z.by_name(name).unwrap().read_to_end(&mut v).unwrap();
            v
        };
        assert_eq!(read("ae/data/0"), bytemuck::cast_slice::<f32, u8>(&w));
        assert_eq!(read("ae/data/1"), 7i32.to_le_bytes());
        assert_eq!(read("ae/version"), b"3\n");
        assert_eq!(read("ae/byteorder"), b"little");
        assert_eq!(read("ae/.storage_alignment"), b"64");
    }

    #[test]
    fn a_shape_that_disagrees_with_the_data_is_an_error() {
        let w = [0f32; 5];
        let e = state_dict_bytes("ae", &[("w", Tensor::F32(&w, vec![2, 3]))]).unwrap_err();
        assert!(format!("{e:#}").contains("tensor 'w': shape [2, 3] holds 6 values, data 5"), "{e:#}");
    }
}
