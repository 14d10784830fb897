//! `saetrain._native`: the Rust side of the Python package. The Python layer
//! (`python/saetrain/__init__.py`) checks and converts inputs, turns keyword arguments into
//! `sae train` flags and wraps results; everything here calls the same functions the CLI calls,
//! so a result from Python is the CLI's result on the same inputs.

use anyhow::Context;
use clap::{Args, FromArgMatches};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use saetrain::cli::export_cmd::{self, ExportArgs, ExportFormat};
use saetrain::cli::train_cmd::{self, TrainArgs};
use saetrain::data::{memory, Dtype};
use saetrain::eval::run::{evaluate, EvalOptions};
use saetrain::export::load::load_sae;
use saetrain::export::ExportedSae;
use saetrain::sparse::SparseCodes;
use saetrain::train::{Interrupted, StepHook};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pyo3::create_exception!(
    _native,
    SaeError,
    pyo3::exceptions::PyRuntimeError,
    "An error from saetrain (the message is the CLI's)."
);

/// A Rust error as a Python exception carrying the whole message chain.
fn py_err(e: anyhow::Error) -> PyErr {
    SaeError::new_err(format!("{e:#}"))
}

/// An array handed over by the Python layer: its address stays valid and its bytes unchanged
/// for the duration of the call that received it (the caller holds a reference).
struct RawArray {
    ptr: usize,
    nbytes: usize,
    dtype: Dtype,
    rows: usize,
    d_in: usize,
}

fn dtype_of(code: &str) -> PyResult<Dtype> {
    match code {
        "f32" => Ok(Dtype::Float32),
        "f16" => Ok(Dtype::Float16),
        "bf16" => Ok(Dtype::Bfloat16),
        other => Err(PyValueError::new_err(format!("unsupported element type {other:?} (expected f32, f16 or bf16)"))),
    }
}

/// The `sae train` argument parser under the Python function's name.
fn train_command() -> clap::Command {
    TrainArgs::augment_args(clap::Command::new("saetrain.train").no_binary_name(true).disable_help_flag(true))
}

/// Every `sae train` option: (keyword name, flag, default or None, help), for the Python layer's
/// signature checks and documentation.
#[pyfunction]
fn train_options() -> Vec<(String, String, Option<String>, String)> {
    train_command()
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let default = a.get_default_values().first().map(|v| v.to_string_lossy().into_owned());
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            Some((long.replace('-', "_"), format!("--{long}"), default, help))
        })
        .collect()
}

/// Train from `argv` (`sae train` flags). `array`: (address, bytes, dtype, rows, d_in) of
/// in-memory activations, registered as `memory:NAME` for the run's duration (the flags then
/// carry `--data memory:NAME`). `progress(step, total, loss)` is called after every step with
/// the GIL held; a Python exception from it (Ctrl-C included) stops the run after writing a
/// checkpoint. Returns the run's summary as JSON.
#[pyfunction]
#[pyo3(signature = (argv, array=None, memory_name="array".to_string(), progress=None, threads=None))]
fn train(
    py: Python<'_>,
    argv: Vec<String>,
    array: Option<(usize, usize, String, usize, usize)>,
    memory_name: String,
    progress: Option<Py<PyAny>>,
    threads: Option<usize>,
) -> PyResult<String> {
    let matches =
        train_command().try_get_matches_from(&argv).map_err(|e| PyValueError::new_err(e.render().to_string()))?;
    let args = TrainArgs::from_arg_matches(&matches).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let raw = match array {
        Some((ptr, nbytes, dtype, rows, d_in)) => Some(RawArray { ptr, nbytes, dtype: dtype_of(&dtype)?, rows, d_in }),
        None => None,
    };
    // The Python exception that stopped the run, re-raised once the run has returned.
    let stopped: Arc<Mutex<Option<PyErr>>> = Arc::default();
    let hook: Option<StepHook> = Some({
        let stopped = stopped.clone();
        Arc::new(move |done, total, stats| {
            Python::attach(|py| {
                let r = py.check_signals().and_then(|_| match &progress {
                    Some(cb) => cb.call1(py, (done, total, stats.loss)).map(|_| ()),
                    None => Ok(()),
                });
                r.map_err(|e| {
                    let msg = e.to_string();
                    *stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    anyhow::anyhow!(msg)
                })
            })
        })
    });
    let result = py.detach(move || -> anyhow::Result<String> {
        let _registration = match &raw {
            // SAFETY: the Python caller keeps the array alive and unmodified during this call,
            // and the registration is dropped (below, on every path) before the call returns.
            Some(a) => {
                Some(unsafe { memory::register(&memory_name, a.ptr as *const u8, a.nbytes, a.dtype, a.rows, a.d_in)? })
            }
            None => None,
        };
        let (cfg, mut opts) = train_cmd::prepare(&args, &matches)?;
        opts.on_step = hook;
        let run = || saetrain::train::run_with(cfg, args.resume.as_deref(), &opts);
        let summary = match threads {
            Some(n) => rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .context("cannot size the thread pool")?
                .install(run),
            None => run(),
        }?;
        Ok(serde_json::to_string(&summary)?)
    });
    match result {
        Ok(s) => Ok(s),
        Err(e) => {
            let pending = stopped.lock().unwrap_or_else(|p| p.into_inner()).take();
            match (e.downcast_ref::<Interrupted>(), pending) {
                (Some(i), Some(p)) if p.is_instance_of::<PyKeyboardInterrupt>(py) => {
                    Err(PyKeyboardInterrupt::new_err(format!("{i} (from Python: saetrain.train(..., resume=...))")))
                }
                (_, Some(p)) => Err(p),
                _ => Err(py_err(e)),
            }
        }
    }
}

/// `sae eval` on one run or checkpoint; `array` (as in [`train`]) evaluates on those activations
/// instead of the run's own held-out split. Returns the evaluation as JSON.
#[pyfunction]
#[pyo3(signature = (path, array=None, memory_name="eval".to_string(), tokens=None))]
fn eval_run(
    py: Python<'_>,
    path: PathBuf,
    array: Option<(usize, usize, String, usize, usize)>,
    memory_name: String,
    tokens: Option<usize>,
) -> PyResult<String> {
    let raw = match array {
        Some((ptr, nbytes, dtype, rows, d_in)) => Some(RawArray { ptr, nbytes, dtype: dtype_of(&dtype)?, rows, d_in }),
        None => None,
    };
    py.detach(move || -> anyhow::Result<String> {
        let registration = match &raw {
            // SAFETY: as in `train`.
            Some(a) => {
                Some(unsafe { memory::register(&memory_name, a.ptr as *const u8, a.nbytes, a.dtype, a.rows, a.d_in)? })
            }
            None => None,
        };
        let opts = EvalOptions { data: registration.as_ref().map(|r| PathBuf::from(r.spec())), tokens };
        let e = evaluate(&path, &path.display().to_string(), &opts)?;
        Ok(serde_json::to_string(&e)?)
    })
    .map_err(py_err)
}

/// Write a run's SAE in SAELens or sparsify layout (`sae export`).
#[pyfunction]
#[pyo3(signature = (run, out, format="saelens", overwrite=false))]
fn export(py: Python<'_>, run: PathBuf, out: PathBuf, format: &str, overwrite: bool) -> PyResult<()> {
    let format = match format {
        "saelens" => ExportFormat::Saelens,
        "sparsify" => ExportFormat::Sparsify,
        "dictionary_learning" => ExportFormat::DictionaryLearning,
        other => {
            return Err(PyValueError::new_err(format!(
                "format {other:?}: expected \"saelens\", \"sparsify\" or \"dictionary_learning\""
            )))
        }
    };
    let args = ExportArgs {
        run,
        format,
        out,
        k: None,
        model_name: None,
        hook_name: None,
        hook_layer: None,
        context_size: None,
        overwrite,
    };
    py.detach(move || export_cmd::run(args)).map_err(py_err)
}

/// A loaded SAE (the inference loader `sae eval` uses), for encode / decode.
#[pyclass(module = "saetrain._native", frozen)]
struct Sae {
    inner: ExportedSae,
    path: PathBuf,
}

#[pymethods]
impl Sae {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let p = path.clone();
        let inner = py.detach(move || load_sae(&p)).map_err(py_err)?;
        Ok(Self { inner, path })
    }

    #[getter]
    fn d_in(&self) -> usize {
        self.inner.d_in
    }

    #[getter]
    fn d_sae(&self) -> usize {
        self.inner.d_sae
    }

    #[getter]
    fn architecture(&self) -> String {
        self.inner.architecture.clone()
    }

    /// Sparse codes of `x` (rows x d_in, f32, C-contiguous: read in place) as CSR arrays
    /// (indptr int64, indices int32, values float32).
    fn encode<'py>(&self, py: Python<'py>, x: PyReadonlyArray2<'py, f32>) -> PyResult<CsrArrays<'py>> {
        let rows = self.check(&x)?;
        let xs = x.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
        let codes = py.detach(|| self.inner.encode(xs, rows)).map_err(py_err)?;
        Ok(csr_arrays(py, codes))
    }

    /// `x_hat` (rows x d_in) of CSR codes over `rows` tokens.
    fn decode<'py>(
        &self,
        py: Python<'py>,
        indptr: PyReadonlyArray1<'py, i64>,
        indices: PyReadonlyArray1<'py, i32>,
        values: PyReadonlyArray1<'py, f32>,
        rows: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let codes =
            codes_from_csr(indptr.as_slice()?, indices.as_slice()?, values.as_slice()?, rows, self.inner.d_sae)?;
        let x_hat = py.detach(|| self.inner.decode(&codes));
        let d = self.inner.d_in;
        Ok(PyArray1::from_vec(py, x_hat).reshape([rows, d])?.into_any())
    }

    /// (codes as CSR arrays, x_hat) of `x` in one pass.
    #[allow(clippy::type_complexity)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<((Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<f32>>), Bound<'py, PyAny>)>
    {
        let rows = self.check(&x)?;
        let xs = x.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
        let (codes, x_hat) = py.detach(|| self.inner.forward(xs, rows)).map_err(py_err)?;
        let d = self.inner.d_in;
        Ok((csr_arrays(py, codes), PyArray1::from_vec(py, x_hat).reshape([rows, d])?.into_any()))
    }

    /// The weights of the loaded SAE (whatever layout it was read from) in SAELens's names and
    /// shapes: `W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`, `b_dec`, and `threshold`
    /// where one applies. These are the weights `encode` uses, so that for a sparsify or
    /// dictionary_learning checkpoint they are the same as for its SAELens export.
    fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.inner;
        let (d, f) = (s.d_in, s.d_sae);
        // Stored F x d; SAELens's W_enc is d x F.
        let mut w_enc = vec![0f32; d * f];
        for (i, row) in s.w_enc.chunks_exact(d).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                w_enc[j * f + i] = v;
            }
        }
        let out = PyDict::new(py);
        out.set_item("W_enc", PyArray1::from_vec(py, w_enc).reshape([d, f])?)?;
        out.set_item("b_enc", PyArray1::from_vec(py, s.b_enc.clone()))?;
        out.set_item("W_dec", PyArray1::from_vec(py, s.w_dec.clone()).reshape([f, d])?)?;
        out.set_item("b_dec", PyArray1::from_vec(py, s.b_dec.clone()))?;
        if let Some(t) = &s.threshold {
            out.set_item("threshold", PyArray1::from_vec(py, t.clone()))?;
        }
        Ok(out)
    }
}

impl Sae {
    fn check(&self, x: &PyReadonlyArray2<'_, f32>) -> PyResult<usize> {
        let [rows, d] = [x.shape()[0], x.shape()[1]];
        if d != self.inner.d_in {
            return Err(PyValueError::new_err(format!(
                "x has {d} columns but the SAE in {} has d_in {}",
                self.path.display(),
                self.inner.d_in
            )));
        }
        Ok(rows)
    }
}

/// CSR codes as NumPy arrays: (indptr, indices, values).
type CsrArrays<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<f32>>);

fn csr_arrays(py: Python<'_>, c: SparseCodes) -> CsrArrays<'_> {
    let indptr: Vec<i64> = c.row_ptr.iter().map(|&p| p as i64).collect();
    let indices: Vec<i32> = c.idx.iter().map(|&i| i as i32).collect();
    (PyArray1::from_vec(py, indptr), PyArray1::from_vec(py, indices), PyArray1::from_vec(py, c.val))
}

fn codes_from_csr(indptr: &[i64], indices: &[i32], values: &[f32], rows: usize, cols: usize) -> PyResult<SparseCodes> {
    let bad = |m: String| PyValueError::new_err(format!("codes: {m}"));
    if indptr.len() != rows + 1 {
        return Err(bad(format!("indptr has {} entries, expected rows + 1 = {}", indptr.len(), rows + 1)));
    }
    if indices.len() != values.len() {
        return Err(bad(format!("{} indices but {} values", indices.len(), values.len())));
    }
    if indptr[0] != 0 || indptr.windows(2).any(|w| w[1] < w[0]) || indptr[rows] as usize != indices.len() {
        return Err(bad("indptr must start at 0, never decrease and end at the number of entries".into()));
    }
    if let Some(&i) = indices.iter().find(|&&i| i < 0 || i as usize >= cols) {
        return Err(bad(format!("latent index {i} is outside 0..{cols}")));
    }
    Ok(SparseCodes {
        rows,
        cols,
        row_ptr: indptr.iter().map(|&p| p as usize).collect(),
        idx: indices.iter().map(|&i| i as u32).collect(),
        val: values.to_vec(),
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SaeError", m.py().get_type::<SaeError>())?;
    m.add_class::<Sae>()?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(train_options, m)?)?;
    m.add_function(wrap_pyfunction!(eval_run, m)?)?;
    m.add_function(wrap_pyfunction!(export, m)?)?;
    Ok(())
}
