//! Activation-shard reader: formats, validation, shuffling, resume, eval split, normalisation,
//! massive-activation exclusion, non-finite skipping, prefetch, CLI helpers.

use saetrain::data::synthetic::SynthSpec;
use saetrain::data::{cli, open_source, BatchData, BatchSource, Dtype, Manifest, ShardOptions, ShardSource};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------- file builders (by hand)

/// An npy file with a hand-written header.
fn npy_raw(version: u8, descr: &str, fortran: bool, shape: &str, payload: &[u8]) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    let pre = if version == 1 { 10 } else { 12 };
    let total = (pre + dict.len() + 1).div_ceil(64) * 64;
    let hlen = total - pre;
    let mut v = b"\x93NUMPY".to_vec();
    v.push(version);
    v.push(0);
    if version == 1 {
        v.extend_from_slice(&(hlen as u16).to_le_bytes());
    } else {
        v.extend_from_slice(&(hlen as u32).to_le_bytes());
    }
    v.extend_from_slice(dict.as_bytes());
    while v.len() < total - 1 {
        v.push(b' ');
    }
    v.push(b'\n');
    v.extend_from_slice(payload);
    v
}

fn encode(dtype: Dtype, x: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::Float32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::Float16 => x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::Bfloat16 => x.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
    }
}

fn descr(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Float32 => "<f4",
        Dtype::Float16 => "<f2",
        Dtype::Bfloat16 => "<V2",
    }
}

fn write_npy(path: &Path, dtype: Dtype, rows: usize, d: usize, x: &[f32]) {
    write_npy_v(path, 1, descr(dtype), dtype, rows, d, x);
}

fn write_npy_v(path: &Path, version: u8, descr: &str, dtype: Dtype, rows: usize, d: usize, x: &[f32]) {
    std::fs::write(path, npy_raw(version, descr, false, &format!("({rows}, {d})"), &encode(dtype, x))).unwrap();
}

fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
    let bufs: Vec<Vec<u8>> = tensors.iter().map(|t| encode(t.1, &t.3)).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bufs)
        .map(|(t, b)| {
            let dt = match t.1 {
                Dtype::Float32 => safetensors::Dtype::F32,
                Dtype::Float16 => safetensors::Dtype::F16,
                Dtype::Bfloat16 => safetensors::Dtype::BF16,
            };
            (t.0.to_string(), safetensors::tensor::TensorView::new(dt, t.2.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Rows whose first element is the global row id (exact in f32), the rest pseudo-random.
fn ident_rows(first: usize, rows: usize, d: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * d);
    for r in first..first + rows {
        v.push(r as f32);
        for j in 1..d {
            v.push((((r * 31 + j * 17) % 97) as f32 - 48.0) / 16.0);
        }
    }
    v
}

/// Synthetic data for `sae data synth` (Zipf 1, noise 0.01).
fn synth_spec(d_in: usize, n_features: usize, mean_active: f64, seed: u64) -> SynthSpec {
    SynthSpec { d_in, n_features, mean_active, zipf: 1.0, noise: 0.01, seed }
}

fn opts(batch: usize) -> ShardOptions {
    ShardOptions {
        batch_size: batch,
        eval_tokens: 0,
        max_norm_multiple: 0.0,
        shuffle_buffer: 64,
        chunk_rows: 16,
        prefetch: 2,
        ..Default::default()
    }
}

fn err_of(path: &Path, o: ShardOptions) -> String {
    match ShardSource::open(path, o) {
        Ok(_) => panic!("expected an error for {}", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_err(path: &Path, o: ShardOptions, needles: &[&str]) {
    let e = err_of(path, o);
    for n in needles {
        assert!(e.contains(n), "error {e:?} does not mention {n:?}");
    }
}

/// Three f32 shards of 100, 60, 40 rows, d = 8, ids 0..200.
fn ident_dataset(dir: &Path) -> PathBuf {
    let d = 8;
    let mut first = 0;
    for (i, rows) in [100, 60, 40].into_iter().enumerate() {
        write_npy(&dir.join(format!("s{i}.npy")), Dtype::Float32, rows, d, &ident_rows(first, rows, d));
        first += rows;
    }
    dir.to_path_buf()
}

fn ids(b: &saetrain::data::Batch) -> Vec<usize> {
    let x = b.to_f32();
    x.chunks(b.d_in).map(|r| r[0] as usize).collect()
}

// ---------------------------------------------------------------- formats

#[test]
fn reads_every_dtype_and_version() {
    let t = tempfile::tempdir().unwrap();
    let (rows, d) = (48, 6);
    let x: Vec<f32> = (0..rows * d).map(|i| ((i % 13) as f32 - 6.0) * 0.25).collect(); // exact in all dtypes
    let cases: Vec<(String, u8, &str, Dtype)> = vec![
        ("f32v1.npy".into(), 1, "<f4", Dtype::Float32),
        ("f32v2.npy".into(), 2, "<f4", Dtype::Float32),
        ("f16v3.npy".into(), 3, "<f2", Dtype::Float16),
        ("bf16v2.npy".into(), 2, "<V2", Dtype::Bfloat16),
        ("bf16pipe.npy".into(), 1, "|V2", Dtype::Bfloat16),
        ("bf16name.npy".into(), 1, "bfloat16", Dtype::Bfloat16),
    ];
    for (name, v, de, dt) in cases {
        let p = t.path().join(&name);
        write_npy_v(&p, v, de, dt, rows, d, &x);
        check_roundtrip(&p, &x, rows, d, dt);
    }
    for dt in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
        let p = t.path().join(format!("{dt}.safetensors"));
        write_st(&p, &[("acts", dt, vec![rows, d], x.clone())]);
        check_roundtrip(&p, &x, rows, d, dt);
    }
}

/// One epoch without shuffling beyond chunks returns every row exactly once, exactly converted.
fn check_roundtrip(p: &Path, x: &[f32], rows: usize, d: usize, dt: Dtype) {
    let mut o = opts(8);
    o.chunk_rows = 8;
    let mut s = ShardSource::open(p, o.clone()).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
    assert_eq!(s.d_in(), d);
    assert_eq!(s.dataset().dtype, dt, "{}", p.display());
    let mut got: Vec<Vec<u32>> = vec![];
    for _ in 0..rows / 8 {
        let b = s.next_batch().unwrap();
        assert!(matches!(b.data, BatchData::F32(_)));
        got.extend(b.to_f32().chunks(d).map(|r| r.iter().map(|v| v.to_bits()).collect()));
    }
    let mut want: Vec<Vec<u32>> = x.chunks(d).map(|r| r.iter().map(|v| v.to_bits()).collect()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{}", p.display());
    // keep_half returns the stored bits.
    o.keep_half = true;
    let mut s = ShardSource::open(p, o).unwrap();
    let b = s.next_batch().unwrap();
    match (dt, &b.data) {
        (Dtype::Float32, BatchData::F32(_))
        | (Dtype::Float16, BatchData::F16(_))
        | (Dtype::Bfloat16, BatchData::Bf16(_)) => {}
        other => panic!("keep_half gave {:?} for {dt}", std::mem::discriminant(other.1)),
    }
    assert_eq!(b.rows * b.d_in, 8 * d);
}

#[test]
fn safetensors_named_and_ambiguous() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("multi.safetensors");
    write_st(
        &p,
        &[("a", Dtype::Float32, vec![32, 4], vec![1.0; 128]), ("b", Dtype::Float16, vec![32, 4], vec![2.0; 128])],
    );
    assert_err(&p, opts(4), &["multi.safetensors", "several tensors", "--tensor"]);
    let mut o = opts(4);
    o.tensor = Some("b".into());
    let mut s = ShardSource::open(&p, o).unwrap();
    assert_eq!(s.dataset().dtype, Dtype::Float16);
    assert!(s.next_batch().unwrap().to_f32().iter().all(|&v| v == 2.0));
    let mut o = opts(4);
    o.tensor = Some("zz".into());
    assert_err(&p, o, &["no tensor named 'zz'"]);
    // One 2-D tensor among others is chosen without a name.
    let p2 = t.path().join("one2d.safetensors");
    write_st(
        &p2,
        &[("bias", Dtype::Float32, vec![4], vec![0.0; 4]), ("acts", Dtype::Float32, vec![32, 4], vec![3.0; 128])],
    );
    let mut s = ShardSource::open(&p2, opts(4)).unwrap();
    assert!(s.next_batch().unwrap().to_f32().iter().all(|&v| v == 3.0));
    // Unsupported dtype / 3-D.
    let p3 = t.path().join("i32.safetensors");
    let b = vec![0u8; 32 * 4 * 4];
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![32, 4], &b).unwrap();
    safetensors::serialize_to_file(vec![("x".to_string(), v)], None, &p3).unwrap();
    assert_err(&p3, opts(4), &["i32.safetensors", "unsupported dtype"]);
    let p4 = t.path().join("3d.safetensors");
    write_st(&p4, &[("x", Dtype::Float32, vec![4, 8, 4], vec![0.0; 128])]);
    assert_err(&p4, opts(4), &["3d.safetensors", "3-D"]);
    // Truncated.
    let p5 = t.path().join("trunc.safetensors");
    let full = std::fs::read(&p2).unwrap();
    std::fs::write(&p5, &full[..full.len() - 10]).unwrap();
    assert_err(&p5, opts(4), &["trunc.safetensors", "truncated"]);
}

// ---------------------------------------------------------------- validation

#[test]
fn bad_files_have_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let o = || opts(4);
    let payload = encode(Dtype::Float32, &[0.5; 64]);

    assert_err(&dir.join("nope.npy"), o(), &["nope.npy", "does not exist"]);
    let empty_dir = dir.join("emptydir");
    std::fs::create_dir(&empty_dir).unwrap();
    assert_err(&empty_dir, o(), &["emptydir", "no .npy or .safetensors"]);
    let p = dir.join("empty.npy");
    std::fs::write(&p, b"").unwrap();
    assert_err(&p, o(), &["empty.npy", "empty file"]);
    let p = dir.join("x.csv");
    std::fs::write(&p, b"1,2,3").unwrap();
    assert_err(&p, o(), &["x.csv", "not a .npy or .safetensors"]);
    let p = dir.join("magic.npy");
    std::fs::write(&p, b"PK\x03\x04 this is a zip file, not npy").unwrap();
    assert_err(&p, o(), &["magic.npy", "magic"]);
    let p = dir.join("header.npy");
    std::fs::write(
        &p,
        npy_raw(1, "<f4", false, "(16 4)", &payload)
            .iter()
            .map(|&c| if c == b',' { b';' } else { c })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_err(&p, o(), &["header.npy", "header"]);
    let p = dir.join("version.npy");
    let mut v = npy_raw(1, "<f4", false, "(16, 4)", &payload);
    v[6] = 9;
    std::fs::write(&p, v).unwrap();
    assert_err(&p, o(), &["version.npy", "version 9.0"]);
    let p = dir.join("fortran.npy");
    std::fs::write(&p, npy_raw(1, "<f4", true, "(16, 4)", &payload)).unwrap();
    assert_err(&p, o(), &["fortran.npy", "Fortran"]);
    let p = dir.join("oned.npy");
    std::fs::write(&p, npy_raw(1, "<f4", false, "(64,)", &payload)).unwrap();
    assert_err(&p, o(), &["oned.npy", "1-D"]);
    let p = dir.join("threed.npy");
    std::fs::write(&p, npy_raw(1, "<f4", false, "(4, 4, 4)", &payload)).unwrap();
    assert_err(&p, o(), &["threed.npy", "3-D"]);
    let p = dir.join("f64.npy");
    std::fs::write(&p, npy_raw(1, "<f8", false, "(8, 4)", &payload[..256])).unwrap();
    assert_err(&p, o(), &["f64.npy", "unsupported dtype", "<f8"]);
    let p = dir.join("i4.npy");
    std::fs::write(&p, npy_raw(1, "<i4", false, "(16, 4)", &payload)).unwrap();
    assert_err(&p, o(), &["i4.npy", "unsupported dtype", "<i4"]);
    let p = dir.join("bigend.npy");
    std::fs::write(&p, npy_raw(1, ">f4", false, "(16, 4)", &payload)).unwrap();
    assert_err(&p, o(), &["bigend.npy", "big-endian"]);
    let p = dir.join("trunc.npy");
    std::fs::write(&p, npy_raw(1, "<f4", false, "(32, 4)", &payload)).unwrap();
    assert_err(&p, o(), &["trunc.npy", "truncated", "(32, 4)"]);
    let p = dir.join("zero.npy");
    std::fs::write(&p, npy_raw(1, "<f4", false, "(0, 4)", &[])).unwrap();
    assert_err(&p, o(), &["zero.npy", "zero rows"]);

    // d_in mismatch between shards, dtype mismatch, config d_in.
    let sd = dir.join("mixed");
    std::fs::create_dir(&sd).unwrap();
    write_npy(&sd.join("a.npy"), Dtype::Float32, 16, 4, &[0.5; 64]);
    write_npy(&sd.join("b.npy"), Dtype::Float32, 8, 8, &[0.5; 64]);
    assert_err(&sd, o(), &["b.npy", "d_in 8", "a.npy"]);
    write_npy(&sd.join("b.npy"), Dtype::Float16, 16, 4, &[0.5; 64]);
    assert_err(&sd, o(), &["b.npy", "dtype float16"]);
    let mut oo = o();
    oo.d_in = Some(5);
    assert_err(&sd.join("a.npy"), oo, &["--d-in 5", "d_in 4"]);

    // Globs.
    assert_err(&dir.join("mixed/zz_*.npy"), o(), &["no file matches"]);
    let mut s = ShardSource::open(&dir.join("mixed/a*.npy"), o()).unwrap();
    assert_eq!(s.dataset().shards.len(), 1);
    s.next_batch().unwrap();
}

#[test]
fn manifest_is_checked() {
    let t = tempfile::tempdir().unwrap();
    let spec = synth_spec(16, 40, 3.0, 3);
    let m = cli::synth(t.path(), &spec, 1000, Dtype::Float16, 300, false, &|| Ok(())).unwrap();
    assert_eq!(m.shards.len(), 4);
    assert_eq!(m.shards[3].rows, 100);
    let mut o = opts(32);
    o.eval_tokens = 128;
    let mut s = ShardSource::open(t.path(), o.clone()).unwrap();
    assert_eq!(s.dataset().dtype, Dtype::Float16);
    let gt = s.ground_truth().expect("ground truth beside the manifest");
    assert_eq!(gt.len(), 40 * 16);
    s.next_batch().unwrap();
    assert!(s.describe().contains("synthetic"), "{}", s.describe());

    // Single file and glob also find the manifest.
    ShardSource::open(&t.path().join("acts_00000.npy"), opts(32)).unwrap();
    ShardSource::open(&t.path().join("acts_*.npy"), opts(32)).unwrap();

    // Rows mismatch.
    let mp = t.path().join("manifest.json");
    let orig = std::fs::read_to_string(&mp).unwrap();
    let mut bad: Manifest = serde_json::from_str(&orig).unwrap();
    bad.shards[1].rows = 299;
    bad.total_rows = None;
    bad.save(&mp).unwrap();
    assert_err(t.path(), o.clone(), &["acts_00001.npy", "rows", "manifest.json"]);
    // d_in mismatch.
    let mut bad: Manifest = serde_json::from_str(&orig).unwrap();
    bad.d_in = 17;
    bad.save(&mp).unwrap();
    assert_err(t.path(), o.clone(), &["acts_00000.npy", "d_in", "manifest.json"]);
    // dtype mismatch.
    let mut bad: Manifest = serde_json::from_str(&orig).unwrap();
    bad.dtype = Dtype::Float32;
    bad.save(&mp).unwrap();
    assert_err(t.path(), o.clone(), &["acts_00000.npy", "dtype", "manifest.json"]);
    // Missing shard.
    let mut bad: Manifest = serde_json::from_str(&orig).unwrap();
    bad.shards.push(saetrain::data::manifest::ManifestShard { file: "gone.npy".into(), rows: 5, tokens_file: None });
    bad.total_rows = None;
    bad.save(&mp).unwrap();
    assert_err(t.path(), o.clone(), &["gone.npy", "missing"]);
    // total_rows mismatch.
    let mut bad: Manifest = serde_json::from_str(&orig).unwrap();
    bad.total_rows = Some(7);
    bad.save(&mp).unwrap();
    // Saves are atomic: none left a temporary, and one that cannot rename (the target is a
    // directory) names the file, keeps what was there and removes its temporary.
    let names = |d: &Path| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect::<HashSet<_>>();
    let before = names(t.path());
    assert!(before.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")), "{before:?}");
    let blocked = t.path().join("blocked.json");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    let e = format!("{:#}", bad.save(&blocked).unwrap_err());
    assert!(e.contains("blocked.json"), "{e}");
    assert!(blocked.join("keep").exists());
    assert_eq!(names(t.path()).len(), before.len() + 1, "only the directory was added");
    assert_err(t.path(), o.clone(), &["manifest.json", "total_rows"]);
    // A harvest's manifest of the whole shards written before it was stopped says so.
    let mut part: Manifest = serde_json::from_str(&orig).unwrap();
    part.extra = Some(serde_json::json!({"interrupted": {"why": "KeyboardInterrupt", "rows": 1000, "shards": 4}}));
    part.save(&mp).unwrap();
    let d = ShardSource::open(t.path(), o.clone()).unwrap().describe();
    assert!(d.contains("an interrupted harvest (KeyboardInterrupt)") && d.contains("--resume"), "{d}");
    std::fs::write(&mp, orig).unwrap();
    assert!(!ShardSource::open(t.path(), o.clone()).unwrap().describe().contains("interrupted"));

    // inspect on the synthetic set.
    let r = cli::inspect(t.path(), None, None).unwrap();
    assert_eq!((r.rows, r.d_in, r.shards.len(), r.nonfinite_values), (1000, 16, 4, 0));
    assert!(r.render().contains("dtype float16"));
}

// ---------------------------------------------------------------- order, resume, split

#[test]
fn deterministic_and_seed_dependent() {
    let t = tempfile::tempdir().unwrap();
    let dir = ident_dataset(t.path());
    let run = |seed: u64, prefetch: usize| {
        let mut o = opts(10);
        o.seed = seed;
        o.prefetch = prefetch;
        o.eval_tokens = 20;
        let mut s = ShardSource::open(&dir, o).unwrap();
        (0..40).map(|_| ids(&s.next_batch().unwrap())).collect::<Vec<_>>()
    };
    let a = run(1, 2);
    assert_eq!(a, run(1, 2));
    assert_eq!(a, run(1, 0), "prefetch must not change the stream");
    assert_ne!(a, run(2, 2));
    // The first epoch is a permutation of the 180 training rows; so is the second, in another order.
    let e0: Vec<usize> = a[..18].concat();
    let e1: Vec<usize> = a[18..36].concat();
    assert_eq!(e0.iter().collect::<HashSet<_>>().len(), 180);
    assert_eq!(e0.iter().collect::<HashSet<_>>(), e1.iter().collect::<HashSet<_>>());
    assert_ne!(e0, e1);
    // Shuffled: not in file order.
    let sorted: Vec<usize> = {
        let mut v = e0.clone();
        v.sort();
        v
    };
    assert_ne!(e0, sorted);
}

#[test]
fn resume_sees_the_same_batches() {
    let t = tempfile::tempdir().unwrap();
    let dir = ident_dataset(t.path());
    for prefetch in [0, 3] {
        let mut o = opts(7);
        o.seed = 11;
        o.prefetch = prefetch;
        o.eval_tokens = 30;
        let mut s = ShardSource::open(&dir, o.clone()).unwrap();
        let mut all = vec![];
        let mut positions = vec![s.position()];
        for _ in 0..70 {
            // crosses several windows and epochs (170 training rows)
            all.push(ids(&s.next_batch().unwrap()));
            positions.push(s.position());
        }
        for k in [0, 1, 9, 24, 25, 50] {
            let mut r = ShardSource::open(&dir, o.clone()).unwrap();
            let pos: serde_json::Value = serde_json::from_str(&positions[k].to_string()).unwrap();
            r.seek(&pos).unwrap();
            for (j, want) in all.iter().enumerate().skip(k).take(15) {
                assert_eq!(&ids(&r.next_batch().unwrap()), want, "resume at {k}, batch {j}");
            }
            assert_eq!(r.stats().epochs, s_stats_epochs(&positions[(k + 15).min(70)]));
        }
        // Seeking a live source mid-stream also works (worker restarted).
        s.seek(&positions[5]).unwrap();
        assert_eq!(ids(&s.next_batch().unwrap()), all[5]);
        // Position from another seed is refused.
        let mut o2 = o.clone();
        o2.seed = 12;
        let mut r = ShardSource::open(&dir, o2).unwrap();
        assert!(r.seek(&positions[3]).is_err());
    }
}

fn s_stats_epochs(p: &serde_json::Value) -> u64 {
    p["epoch"].as_u64().unwrap()
}

#[test]
fn eval_split_never_trained_on() {
    let t = tempfile::tempdir().unwrap();
    let dir = ident_dataset(t.path());
    let mut o = opts(10);
    o.eval_tokens = 70; // spans shard boundaries: blocks of 256 rows, here one block
    let mut s = ShardSource::open(&dir, o.clone()).unwrap();
    let ev: Vec<usize> = s.eval_batches(1000).unwrap().iter().flat_map(ids).collect();
    assert_eq!(ev.len(), 70);
    let train: HashSet<usize> = (0..39).flat_map(|_| ids(&s.next_batch().unwrap())).collect(); // > 2 epochs
    assert_eq!(train.len(), 130);
    assert!(ev.iter().all(|i| !train.contains(i)));
    let all: HashSet<usize> = train.iter().copied().chain(ev.iter().copied()).collect();
    assert_eq!(all.len(), 200);
    // Same split for any seed; eval_batches(tokens) caps rows; batches of batch_size.
    let mut o2 = o.clone();
    o2.seed = 99;
    let mut s2 = ShardSource::open(&dir, o2).unwrap();
    let b = s2.eval_batches(25).unwrap();
    assert_eq!(b.iter().map(|b| b.rows).collect::<Vec<_>>(), vec![10, 10, 5]);
    assert_eq!(b.iter().flat_map(ids).collect::<Vec<_>>(), ev[..25].to_vec());
    // Too large a split is an error.
    let mut o3 = o.clone();
    o3.eval_tokens = 150;
    assert_err(&dir, o3, &["--eval-tokens 150"]);
}

#[test]
fn eval_block_across_shard_boundary() {
    let t = tempfile::tempdir().unwrap();
    let d = 2;
    write_npy(&t.path().join("a.npy"), Dtype::Float32, 200, d, &ident_rows(0, 200, d));
    write_npy(&t.path().join("b.npy"), Dtype::Float32, 400, d, &ident_rows(200, 400, d));
    let mut o = opts(10);
    o.eval_tokens = 300; // blocks 0..256 (crosses into b.npy) and 406..450
    let mut s = ShardSource::open(t.path(), o).unwrap();
    let ev: Vec<usize> = s.eval_batches(300).unwrap().iter().flat_map(ids).collect();
    let want: Vec<usize> = (0..256).chain(406..450).collect();
    assert_eq!(ev, want);
    let train: HashSet<usize> = (0..60).flat_map(|_| ids(&s.next_batch().unwrap())).collect();
    let want: HashSet<usize> = (256..406).chain(450..600).collect();
    assert_eq!(train, want);
    // Too little data for one batch.
    let mut o = opts(601);
    o.eval_tokens = 0;
    assert_err(t.path(), o, &["fewer than one batch"]);
}

#[test]
fn eval_blocks_spread_over_large_data() {
    let t = tempfile::tempdir().unwrap();
    let d = 4;
    for i in 0..4 {
        write_npy(&t.path().join(format!("p{i}.npy")), Dtype::Float32, 3000, d, &ident_rows(i * 3000, 3000, d));
    }
    let mut o = opts(100);
    o.eval_tokens = 1000;
    o.chunk_rows = 500;
    o.shuffle_buffer = 2000;
    let mut s = ShardSource::open(t.path(), o).unwrap();
    let ev: Vec<usize> = s.eval_batches(1000).unwrap().iter().flat_map(ids).collect();
    assert_eq!(ev.len(), 1000);
    let shards: HashSet<usize> = ev.iter().map(|i| i / 3000).collect();
    assert_eq!(shards.len(), 4, "held-out rows come from every part of the data");
    let evs: HashSet<usize> = ev.into_iter().collect();
    let mut seen = HashSet::new();
    for _ in 0..110 {
        for i in ids(&s.next_batch().unwrap()) {
            assert!(!evs.contains(&i));
            seen.insert(i);
        }
    }
    assert_eq!(seen.len(), 11000);
}

// ---------------------------------------------------------------- values

#[test]
fn normalisation_scales_to_d_in() {
    let t = tempfile::tempdir().unwrap();
    let (rows, d) = (4000, 32);
    let x: Vec<f32> = (0..rows * d).map(|i| 7.0 + ((i * 7919) % 1000) as f32 / 100.0).collect();
    let p = t.path().join("big.npy");
    write_npy(&p, Dtype::Float32, rows, d, &x);
    let mut o = opts(500);
    o.normalize = true;
    o.eval_tokens = 500;
    let mut s = ShardSource::open(&p, o.clone()).unwrap();
    let sc = s.input_scale();
    assert!(sc > 0.0 && sc < 1.0);
    let mut sum = 0f64;
    let mut n = 0;
    for _ in 0..7 {
        let b = s.next_batch().unwrap();
        for r in b.to_f32().chunks(d) {
            sum += r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            n += 1;
        }
    }
    let ms = sum / n as f64;
    assert!((ms / d as f64 - 1.0).abs() < 0.02, "E||sx||^2 = {ms}, d_in = {d}");
    // Eval rows are scaled the same way; unnormalised source has scale 1.
    let e = s.eval_batches(100).unwrap();
    assert!(e[0].to_f32().iter().all(|v| *v < 17.0 * sc + 1e-3));
    o.normalize = false;
    assert_eq!(ShardSource::open(&p, o).unwrap().input_scale(), 1.0);
}

#[test]
fn nonfinite_batches_are_skipped() {
    let t = tempfile::tempdir().unwrap();
    let (rows, d) = (16, 4);
    let mut x: Vec<f32> = (0..rows * d).map(|i| 1.0 + (i % 5) as f32).collect();
    x[1] = f32::NAN; // row 0
    x[5 * d + 2] = f32::INFINITY; // row 5
    x[5 * d + 3] = f32::NEG_INFINITY;
    for dt in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
        let p = t.path().join(format!("nan_{dt}.npy"));
        write_npy(&p, dt, rows, d, &x);
        let mut o = opts(4);
        o.chunk_rows = 4;
        o.shuffle_buffer = 0; // batches = chunks: rows 0 and 5 land in two different batches
        let mut s = ShardSource::open(&p, o).unwrap();
        for _ in 0..6 {
            // 2 good batches per epoch: 6 batches = 3 epochs
            let b = s.next_batch().unwrap();
            assert!(b.to_f32().iter().all(|v| v.is_finite()), "{dt}");
        }
        let st = s.stats();
        assert!(st.skipped_nonfinite_batches >= 4, "{dt}: {st:?}");
        assert!(s.nonfinite_values() >= 6, "{dt}");
        assert_eq!(s.eval_batches(100).unwrap().len(), 0);
    }
    // All rows bad: an error, not a hang.
    let p = t.path().join("allnan.npy");
    write_npy(&p, Dtype::Float32, 8, 2, &[f32::NAN; 16]);
    let mut s = ShardSource::open(&p, opts(4)).unwrap();
    let e = format!("{:#}", s.next_batch().unwrap_err());
    assert!(e.contains("NaN"), "{e}");
}

#[test]
fn large_norm_rows_excluded_and_counted() {
    let t = tempfile::tempdir().unwrap();
    let (rows, d) = (200, 4);
    let mut x = vec![1.0f32; rows * d];
    for r in [3, 50, 120] {
        for j in 0..d {
            x[r * d + j] = 100.0;
        }
    }
    let p = t.path().join("massive.npy");
    write_npy(&p, Dtype::Float32, rows, d, &x);
    let mut o = opts(1);
    o.max_norm_multiple = 10.0;
    o.prefetch = 0;
    let mut s = ShardSource::open(&p, o.clone()).unwrap();
    assert!((s.median_norm() - 2.0).abs() < 1e-9);
    for _ in 0..197 {
        let b = s.next_batch().unwrap();
        assert_eq!(b.to_f32()[0], 1.0);
    }
    assert_eq!(s.stats().epochs, 0);
    s.next_batch().unwrap();
    assert_eq!(s.stats().epochs, 1);
    assert!(s.stats().excluded_large_norm_rows >= 3);
    // Eval never returns them either; 0 disables.
    o.eval_tokens = 100;
    let mut s = ShardSource::open(&p, o.clone()).unwrap();
    let n: usize = s.eval_batches(100).unwrap().iter().map(|b| b.rows).sum();
    assert!(n < 100);
    o.max_norm_multiple = 0.0;
    o.eval_tokens = 0;
    let mut s = ShardSource::open(&p, o).unwrap();
    let big = (0..200).filter(|_| s.next_batch().unwrap().to_f32()[0] == 100.0).count();
    assert_eq!(big, 3);
    assert_eq!(s.stats().excluded_large_norm_rows, 0);
}

fn real_sample() -> Option<PathBuf> {
    let rel = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/smollm2-l15/sample_f16.npy");
    let abs = PathBuf::from("/work/shared/data/smollm2-l15/sample_f16.npy");
    [rel, abs].into_iter().find(|p| p.is_file())
}

#[test]
fn real_sample_massive_activations() {
    let Some(p) = real_sample() else {
        println!("skipped: smollm2-l15/sample_f16.npy not found");
        return;
    };
    let r = cli::inspect(&p, None, None).unwrap();
    assert_eq!((r.rows, r.d_in, r.dtype.as_str()), (32768, 576, "float16"));
    assert_eq!(r.rows_over_10x_median, 63);
    assert!((r.median_norm - 151.32).abs() < 0.1, "{}", r.median_norm);
    // The reader, with every row in the median sample, excludes exactly those 63 over one epoch.
    let o = ShardOptions {
        batch_size: 1,
        eval_tokens: 0,
        sample_rows: 1 << 20,
        prefetch: 4,
        keep_half: true,
        ..Default::default()
    };
    let mut s = ShardSource::open(&p, o).unwrap();
    let thr = s.max_norm();
    for _ in 0..32768 - 63 {
        let b = s.next_batch().unwrap();
        assert!(matches!(b.data, BatchData::F16(_)));
        let n = b.to_f32().iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        assert!(n <= thr);
    }
    assert_eq!(s.stats().epochs, 0);
    assert!(s.stats().excluded_large_norm_rows <= 63);
    s.next_batch().unwrap();
    let st = s.stats();
    assert_eq!(st.epochs, 1);
    assert!(st.excluded_large_norm_rows >= 63 && st.excluded_large_norm_rows < 70, "{st:?}");
    // Default settings (10k-row sample, normalised): the scale brings E||x||^2 to d_in.
    let cfg = saetrain::config::TrainConfig {
        data: Some(p.clone()),
        normalize: saetrain::config::Normalize::Global,
        batch_size: 4096,
        ..Default::default()
    };
    let mut s = open_source(&cfg).unwrap();
    let b = s.next_batch().unwrap();
    let ms = b.to_f32().chunks(576).map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()).sum::<f64>() / 4096.0;
    assert!((ms / 576.0 - 1.0).abs() < 0.1, "{ms}");
    println!("{}", s.describe());
}

// ---------------------------------------------------------------- trainer entry point

#[test]
fn open_source_synthetic_and_shards() {
    let cfg = saetrain::config::TrainConfig { batch_size: 64, ..Default::default() };
    let mut s = open_source(&cfg).unwrap();
    assert_eq!(s.d_in(), cfg.synth_d_in);
    assert!(s.ground_truth().is_some());
    assert_eq!(s.next_batch().unwrap().rows, 64);

    let t = tempfile::tempdir().unwrap();
    let dir = ident_dataset(t.path());
    let cfg = saetrain::config::TrainConfig {
        data: Some(dir.clone()),
        batch_size: 16,
        eval_tokens: 32,
        shuffle_buffer: 50,
        ..Default::default()
    };
    let mut s = open_source(&cfg).unwrap();
    assert_eq!(s.d_in(), 8);
    assert!(s.ground_truth().is_none());
    assert_eq!(s.next_batch().unwrap().rows, 16);
    let cfg = saetrain::config::TrainConfig { d_in: Some(9), ..cfg };
    let e = open_source(&cfg).err().map(|e| format!("{e:#}")).unwrap();
    assert!(e.contains("--d-in 9"), "{e}");
}

#[test]
fn synth_recovers_ground_truth_directions() {
    // Rows read from disk equal the in-memory generator's rows (f32), so recovery is measurable.
    let t = tempfile::tempdir().unwrap();
    let spec = SynthSpec { noise: 0.0, ..synth_spec(8, 20, 2.0, 5) };
    cli::synth(t.path(), &spec, 256, Dtype::Float32, 256, false, &|| Ok(())).unwrap();
    let gen = saetrain::data::synthetic::Synthetic::new(spec.clone(), 256).unwrap();
    let want = gen.generate(0, 0, 256).to_f32().into_owned();
    let (_, _, got) = saetrain::data::format::read_f32(&t.path().join("acts_00000.npy")).unwrap();
    assert_eq!(want, got);
    let mut s = ShardSource::open(t.path(), opts(16)).unwrap();
    assert_eq!(s.ground_truth().unwrap(), gen.ground_truth().unwrap());
    s.next_batch().unwrap();
}

#[test]
fn data_subcommands_parse_and_run() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: cli::DataArgs,
    }
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("syn");
    let o = out.to_str().unwrap();
    let args = ["sae", "synth", "--out", o, "--tokens", "700", "--d-in", "12", "--features", "30", "--dtype", "bf16"];
    cli::run(Cli::parse_from(args).cmd).unwrap();
    cli::run(Cli::parse_from(["sae", "inspect", o, "--full"]).cmd).unwrap();
    let r = cli::inspect(&out, None, Some(100)).unwrap();
    assert_eq!((r.rows, r.d_in, r.dtype.as_str(), r.scanned_rows), (700, 12, "bfloat16", 100));
    let mut s = ShardSource::open(&out, opts(50)).unwrap();
    assert_eq!(s.ground_truth().unwrap().len(), 30 * 12);
    s.next_batch().unwrap();
}

// ---------------------------------------------------------------- memory (run by hand)

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Peak RSS while streaming one epoch of SAE_RSS_GB (default 0.5) GB of f16 shards (d_in 1024)
/// with the default shuffle window and prefetch:
/// `SAE_RSS_GB=4 cargo test --release --test data stream_rss -- --ignored --nocapture`
#[test]
#[ignore]
fn stream_rss() {
    use std::io::Write;
    let gb: f64 = std::env::var("SAE_RSS_GB").ok().and_then(|v| v.parse().ok()).unwrap_or(0.5);
    let d = 1024;
    let shard_rows = 131_072; // 256 MiB per f16 shard
    let n_shards = ((gb * 1e9) / (shard_rows * d * 2) as f64).ceil() as usize;
    let t = tempfile::tempdir().unwrap();
    let pattern: Vec<u8> = encode(
        Dtype::Float16,
        &(0..1024 * d).map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 500.0 - 1.0).collect::<Vec<_>>(),
    );
    for s in 0..n_shards {
        let mut f = std::io::BufWriter::new(std::fs::File::create(t.path().join(format!("a{s:03}.npy"))).unwrap());
        f.write_all(&saetrain::data::format::npy_header(Dtype::Float16, shard_rows, d)).unwrap();
        for _ in 0..shard_rows / 1024 {
            f.write_all(&pattern).unwrap();
        }
    }
    drop(pattern);
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // reset VmHWM
    let before = status_kb("VmHWM:");
    if std::env::var("SAE_RSS_TRACE").is_ok() {
        let ds = saetrain::data::Dataset::open(t.path(), None).unwrap();
        println!("dataset open: hwm {} MB", status_kb("VmHWM:") / 1024);
        let n: usize = std::env::var("SAE_SAMPLE_N").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
        saetrain::data::dataset::sample_norms(&ds, n);
        println!("sampled: hwm {} MB", status_kb("VmHWM:") / 1024);
    }
    let o = ShardOptions { batch_size: 4096, ..Default::default() };
    let mut s = ShardSource::open(t.path(), o).unwrap();
    let batches = s.train_rows() / 4096;
    if std::env::var("SAE_RSS_TRACE").is_ok() {
        println!("after open: hwm {} MB, file {} MB", status_kb("VmHWM:") / 1024, status_kb("RssFile:") / 1024);
    }
    let t0 = std::time::Instant::now();
    let mut acc = 0f32;
    for _i in 0..batches {
        let b = s.next_batch().unwrap();
        acc += b.to_f32()[0];
        if std::env::var("SAE_RSS_TRACE").is_ok() && _i % 40 == 0 {
            println!("batch {_i}: anon {} MB file {} MB", status_kb("RssAnon:") / 1024, status_kb("RssFile:") / 1024);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let bytes = (batches * 4096 * d * 2) as f64;
    println!(
        "streamed {:.2} GB of f16 shards ({} shards, {} rows) in {secs:.2} s: {:.2} GB/s read, {:.0} rows/s; \
         VmHWM before {} MB, after {} MB; VmRSS {} MB (checksum {acc})",
        bytes / 1e9,
        n_shards,
        batches * 4096,
        bytes / 1e9 / secs,
        (batches * 4096) as f64 / secs,
        before / 1024,
        status_kb("VmHWM:") / 1024,
        status_kb("VmRSS:") / 1024
    );
}

#[test]
fn a_shard_truncated_or_rewritten_under_a_running_reader_is_an_error_naming_it_and_the_position_stays_put() {
    use std::io::{Seek, Write};
    for (prefetch, truncate) in [(0, true), (2, true), (0, false), (2, false)] {
        let t = tempfile::tempdir().unwrap();
        let (rows, d) = (2048, 16);
        for (i, name) in ["a.npy", "b.npy"].into_iter().enumerate() {
            write_npy(&t.path().join(name), Dtype::Float32, rows, d, &ident_rows(i * rows, rows, d));
        }
        let mut o = opts(64);
        o.prefetch = prefetch;
        let mut s = ShardSource::open(t.path(), o.clone()).unwrap();
        for _ in 0..3 {
            s.next_batch().unwrap();
        }
        let a = t.path().join("a.npy");
        let mut f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        if truncate {
            // Keep one page: every later read of a.npy past it faults (SIGBUS without the guard).
            f.set_len(4096).unwrap();
        } else {
            // Rewritten in place at the same length (new rows, same shape): nothing faults, and
            // only the modification time tells (past the clock tick of the file's creation).
            std::thread::sleep(std::time::Duration::from_millis(50));
            f.seek(std::io::SeekFrom::Start(4096)).unwrap();
            f.write_all(&vec![0x3f; 8192]).unwrap();
        }
        drop(f);
        let mut last_good = s.position();
        let mut err = None;
        for _ in 0..(2 * rows / 64 + 4) {
            match s.next_batch() {
                Ok(b) => {
                    // Batches read before the change (prefetched) are the data: no zero or new rows.
                    let x = b.to_f32();
                    let new = f32::from_le_bytes([0x3f; 4]);
                    let ours = |r: &[f32]| r[1..].iter().any(|&v| v != 0.0) && r[1] != new;
                    assert!(x.chunks(d).all(ours), "prefetch {prefetch}, truncate {truncate}: a row not the data");
                    last_good = s.position();
                }
                Err(e) => {
                    err = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        let e = err.unwrap_or_else(|| panic!("prefetch {prefetch}: reading on after the truncation never failed"));
        assert!(e.contains(&a.display().to_string()) && !e.contains("b.npy"), "{e}");
        let says = if truncate { "truncated or rewritten" } else { "written to on disk" };
        let size = if truncate { "it now has 4096 bytes" } else { "now has 131200" };
        assert!(e.contains(says) && e.contains(size), "{e}");
        assert_eq!(s.position(), last_good, "prefetch {prefetch}: the failed batch must not move the position");
        assert!(s.next_batch().is_err(), "prefetch {prefetch}: the lost rows stay lost");
    }
}

/// A resume must train on the data it was trained on: a saved position is refused by a source
/// whose sampled rows differ (the same directory written again with other contents, same row
/// count and seed), accepted by the same contents, and a position saved before the digest
/// existed is accepted and gains it.
#[test]
fn a_position_saved_on_other_contents_at_the_same_path_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let spec = |seed| synth_spec(16, 40, 3.0, seed);
    let write = |seed| cli::synth(t.path(), &spec(seed), 1000, Dtype::Float32, 300, true, &|| Ok(())).unwrap();
    write(1);
    let mut s = ShardSource::open(t.path(), opts(32)).unwrap();
    s.next_batch().unwrap();
    let saved = s.position();
    assert!(saved["data_sample"].is_string(), "{saved}");

    write(2);
    let mut other = ShardSource::open(t.path(), opts(32)).unwrap();
    let e = format!("{:#}", other.seek(&saved).unwrap_err());
    assert!(e.contains("not the data this run was trained on") && e.contains(&t.path().display().to_string()), "{e}");
    let mut old = saved.clone();
    old.as_object_mut().unwrap().remove("data_sample");
    other.seek(&old).unwrap();
    assert!(other.position()["data_sample"].is_string(), "an old position gains the digest");
    assert_ne!(other.position()["data_sample"], saved["data_sample"], "the position now names these contents");

    write(1);
    let mut same = ShardSource::open(t.path(), opts(32)).unwrap();
    same.seek(&saved).unwrap();
    let (a, b) = (same.next_batch().unwrap(), s.next_batch().unwrap());
    assert_eq!(a, b, "the same contents continue where the run stopped");
}

/// With `held_out_windows` (every run since 2026-12-07), a harvested data set (its manifest
/// gives `rows_per_window`) is held out in whole token windows: every held-out segment starts
/// and ends on a window boundary, the split is rounded up to whole windows, and no window has
/// rows on both sides. Without it (older configs), or where shards do not hold whole windows,
/// the split is the earlier one of 256-row blocks.
#[test]
fn a_harvested_data_set_is_held_out_in_whole_token_windows() {
    let t = tempfile::tempdir().unwrap();
    let spec = synth_spec(8, 20, 2.0, 4);
    // Shards of 700, 700 and 630 rows: windows of 7 rows (an 8-token context, BOS not stored).
    cli::synth(t.path(), &spec, 2030, Dtype::Float32, 700, false, &|| Ok(())).unwrap();
    let manifest = t.path().join("manifest.json");
    let with_windows = |per: usize| {
        let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        m["extra"] = serde_json::json!({ "rows_per_window": per, "context_length": per + 1 });
        std::fs::write(&manifest, m.to_string()).unwrap();
    };
    let split = |windows: bool| {
        let o = ShardOptions { eval_tokens: 600, held_out_windows: windows, ..opts(64) };
        let s = ShardSource::open(t.path(), o).unwrap();
        let segs: Vec<(usize, usize, usize)> = s
            .held_out_segments()
            .into_iter()
            .map(|(p, a, n)| (s.dataset().shards.iter().position(|sh| sh.path == p).unwrap(), a, n))
            .collect();
        (segs, s.eval_rows(), s.train_rows())
    };
    with_windows(7);
    let (segs, eval_rows, train_rows) = split(true);
    assert_eq!(eval_rows, 602, "600 rows rounded up to 86 windows of 7");
    assert_eq!(eval_rows + train_rows, 2030);
    assert_eq!(segs.iter().map(|s| s.2).sum::<usize>(), 602);
    for &(shard, start, rows) in &segs {
        assert!(start % 7 == 0 && rows % 7 == 0, "segment ({shard}, {start}, {rows}) cuts a window");
    }
    assert!(segs.len() >= 2 && segs.iter().any(|s| s.0 == 2), "spread over the shards: {segs:?}");

    // The earlier layout: 600 rows in blocks of 256, which cut windows.
    let (old, eval_rows, _) = split(false);
    assert_eq!(eval_rows, 600);
    assert!(old.iter().any(|&(_, a, n)| a % 7 != 0 || n % 7 != 0), "{old:?}");
    // Shards that do not hold whole windows (700 is not a multiple of 6): the earlier layout.
    with_windows(6);
    assert_eq!(split(true).0, old);
}
