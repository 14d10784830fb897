"""saetrain from Python: train sparse autoencoders on activations in memory or on disk, with the
Rust trainer behind the ``sae`` command.

    import numpy as np, saetrain
    run = saetrain.train(acts, sparsifier="topk", k=32, d_sae=4608, out="runs/topk")
    codes = run.encode(acts[:1000])          # scipy.sparse.csr_matrix, no dense copy
    run.metrics()["explained_variance"]

Every ``sae train`` option is a keyword argument of :func:`train` with the same name (dashes
become underscores) and the same default: the keywords are parsed by the CLI's own parser, so
the two cannot drift apart. Errors from Rust are :class:`SaeError` with the CLI's message.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _native
from ._native import SaeError

__all__ = ["train", "load", "Run", "SaeError", "train_options"]

PathLike = Union[str, "os.PathLike[str]"]


def train_options() -> dict:
    """Every keyword :func:`train` takes: name -> (CLI flag, default as the CLI prints it, help)."""
    return {name: (flag, default, help) for name, flag, default, help in _native.train_options()}


def _flags(options: dict) -> list:
    """Keyword arguments as ``sae train`` flags (True -> the bare flag, lists comma-joined)."""
    known = train_options()
    argv = []
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"train() got an unexpected keyword argument {name!r} (not a `sae train` option)")
        flag = known[name][0]
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return argv


def _rows(x: Any, what: str) -> Tuple[np.ndarray, str]:
    """``x`` as a C-contiguous 2-D array of f32, f16 or bf16 and its code. An array already in
    such a form is used in place; any other numeric array is converted once to float32."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{what}: expected an array of activations (tokens x d_in), got {type(x).__name__}")
    a = np.asarray(x)
    if a.dtype == object:
        raise TypeError(f"{what}: an array of Python objects cannot be read as activations (expected a float array)")
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (tokens x d_in), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what}: the array has shape {a.shape}; expected at least one row and one column")
    if a.dtype.name == "bfloat16":  # ml_dtypes
        return np.ascontiguousarray(a).view(np.uint16), "bf16"
    if a.dtype == np.float32:
        return np.ascontiguousarray(a), "f32"
    if a.dtype == np.float16:
        return np.ascontiguousarray(a), "f16"
    if a.dtype.kind in "fiu":
        return np.ascontiguousarray(a, dtype=np.float32), "f32"
    raise TypeError(f"{what}: element type {a.dtype} is not a real number type (expected float32, float16 or bfloat16)")


def _f32(x: Any, what: str) -> np.ndarray:
    a, code = _rows(x, what)
    if code == "f32":
        return a
    if code == "f16":
        return a.astype(np.float32)
    return (a.astype(np.uint32) << 16).view(np.float32)


def _count(value: Any, what: str) -> Optional[int]:
    """``value`` as a positive int (None stays None), or a ValueError / TypeError naming it (the
    Rust side takes an unsigned size, and would say only "can't convert negative int")."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what}: expected a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{what} = {value}: expected a positive integer")
    return int(value)


def _index_array(a: Any, what: str, dtype, low: int, high: int) -> np.ndarray:
    """An integer array checked against [low, high) before it is narrowed to ``dtype``, so that
    an index of 2**32 + 3 is an error, not latent 3."""
    a = np.asarray(a)
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"codes: {what} must be integers, got {a.dtype}")
    if a.size:
        lo, hi = a.min(), a.max()
        if lo < low or hi >= high:
            bad = lo if lo < low else hi
            raise ValueError(f"codes: {what} {bad} is outside {low}..{high}")
    return np.ascontiguousarray(a, dtype=dtype)


def _raw(a: np.ndarray, code: str) -> tuple:
    return (a.ctypes.data, a.nbytes, code, a.shape[0], a.shape[1])


class _Progress:
    """A progress bar: tqdm's (terminal or notebook, via tqdm.auto) when installed, else one
    line on stderr rewritten in place."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.last = 0

    def __call__(self, step: int, total: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=step - 1, unit="step")
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(step - self.last if self.last else 1)
            if step % 10 == 0 or step == total:
                self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        elif step % 10 == 0 or step == total:
            sys.stderr.write(f"\rstep {step}/{total}  loss {loss:.4g}")
            if step == total:
                sys.stderr.write("\n")
        self.last = step

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def train(
    data: Any = None,
    *,
    resume: Optional[PathLike] = None,
    progress: Optional[bool] = None,
    threads: Optional[int] = None,
    **options: Any,
) -> "Run":
    """Train an SAE and return its :class:`Run`.

    ``data``: None (the built-in synthetic data), a path or glob of activation shards (as
    ``--data``), or activations in memory (a NumPy array or any object with the buffer protocol,
    tokens x d_in, float32 / float16 / bfloat16 read in place; other numeric types converted
    once). In-memory data is not copied: do not modify it while training runs. Its run directory
    records ``data = "memory:array"``; to resume, pass the same array again with ``resume=``.

    ``resume``: a run directory to continue (``sae train --resume``). ``progress``: show a bar
    (default: unless ``quiet=True``). ``threads``: worker threads for this call (default: all
    cores). Every other keyword is a ``sae train`` option (see :func:`train_options`).

    Ctrl-C, SIGTERM and SIGHUP stop training after the current step, write a checkpoint and
    raise KeyboardInterrupt; ``train(same data, resume=run_dir)`` continues exactly. The GIL is
    released while training.
    """
    if "data" in options:
        raise TypeError("pass the data as the first argument of train(), not as data=")
    threads = _count(threads, "threads")
    show = (not options.get("quiet", False)) if progress is None else progress
    argv = _flags({**options, "quiet": True})
    if resume is not None:
        argv += ["--resume", os.fspath(resume)]
    array = None
    keep = None
    if data is not None and (isinstance(data, (str, os.PathLike))):
        argv += ["--data", os.fspath(data)]
    elif data is not None:
        keep, code = _rows(data, "data")
        array = _raw(keep, code)
        argv += ["--data", "memory:array"]
    bar = _Progress(show)
    try:
        with _stop_on_termination():
            summary = json.loads(_native.train(argv, array, "array", bar, threads))
    finally:
        bar.close()
    return Run(summary["out"], summary=summary, data=keep if keep is not None else data)


@contextlib.contextmanager
def _stop_on_termination():
    """While training: SIGTERM (a scheduler's notice before it preempts a job) and SIGHUP (a
    dropped ssh session) raise KeyboardInterrupt, so that they stop the run after its step with
    a checkpoint, as Ctrl-C does, instead of killing the process and losing the steps since the
    last checkpoint. Only in the main thread (where Python runs signal handlers), and only for a
    signal at its default action: a handler of the caller's, or an ignore, is left alone."""
    saved = {}
    if threading.current_thread() is threading.main_thread():

        def stop(signum, _frame):
            raise KeyboardInterrupt(signal.Signals(signum).name)

        for name in ("SIGTERM", "SIGHUP"):
            s = getattr(signal, name, None)
            if s is not None and signal.getsignal(s) == signal.SIG_DFL:
                saved[s] = signal.signal(s, stop)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def load(path: PathLike) -> "Run":
    """A run directory (or an SAE checkpoint in SAELens, sparsify or dictionary_learning layout) as a :class:`Run`."""
    return Run(path)


class Run:
    """A trained SAE: a run directory or a checkpoint, loaded with the inference loader that
    ``sae eval`` uses."""

    def __init__(self, path: PathLike, summary: Optional[dict] = None, data: Any = None):
        self.path = Path(path)
        self.summary = summary
        self._data = data
        self._sae = _native.Sae(os.fspath(self.path))

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, architecture={self.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae})"

    @property
    def d_in(self) -> int:
        return self._sae.d_in

    @property
    def d_sae(self) -> int:
        return self._sae.d_sae

    @property
    def architecture(self) -> str:
        return self._sae.architecture

    @property
    def config(self) -> Optional[dict]:
        """The resolved training config (``config.json``), for a run directory."""
        p = self.path / "config.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def _x(self, x: Any) -> np.ndarray:
        a = _f32(x, "x")
        if a.shape[1] != self.d_in:
            raise ValueError(f"x has {a.shape[1]} columns but the SAE in {self.path} has d_in {self.d_in}")
        return a

    def encode(self, x: Any, format: str = "csr"):
        """Sparse codes of ``x`` (tokens x d_in) with the exported sparsifier: a
        ``scipy.sparse.csr_matrix`` (``format="csr"``) or ``(indptr, indices, values)`` NumPy
        arrays (``format="arrays"``); never a dense tokens x d_sae array."""
        a = self._x(x)
        indptr, indices, values = self._sae.encode(a)
        return self._codes_out((indptr, indices, values), a.shape[0], format)

    def _codes_out(self, arrays, rows: int, format: str):
        if format == "arrays":
            return arrays
        if format != "csr":
            raise ValueError(f'format {format!r}: expected "csr" or "arrays"')
        try:
            import scipy.sparse
        except ImportError as e:
            raise ImportError('encode(format="csr") needs scipy; install it or use format="arrays"') from e
        indptr, indices, values = arrays
        return scipy.sparse.csr_matrix((values, indices, indptr), shape=(rows, self.d_sae))

    def decode(self, codes: Any) -> np.ndarray:
        """``x_hat`` (tokens x d_in) of codes from :meth:`encode` (either format)."""
        if isinstance(codes, tuple) and len(codes) == 3:
            indptr, indices, values = codes
        elif hasattr(codes, "indptr") and hasattr(codes, "indices"):
            csr = codes.tocsr() if hasattr(codes, "tocsr") else codes
            if csr.shape[1] != self.d_sae:
                raise ValueError(f"codes have {csr.shape[1]} columns but the SAE has d_sae {self.d_sae}")
            indptr, indices, values = csr.indptr, csr.indices, csr.data
        else:
            raise TypeError("codes: expected a scipy.sparse matrix or (indptr, indices, values) from encode()")
        indices = _index_array(indices, "latent index", np.int32, 0, self.d_sae)
        indptr = _index_array(indptr, "indptr entry", np.int64, 0, len(indices) + 1)
        values = np.ascontiguousarray(values, dtype=np.float32)
        return self._sae.decode(indptr, indices, values, len(indptr) - 1)

    def reconstruct(self, x: Any) -> np.ndarray:
        """``decode(encode(x))`` in one pass."""
        _, x_hat = self._sae.forward(self._x(x))
        return x_hat

    def metrics(self, x: Any = None, tokens: Optional[int] = None) -> dict:
        """The ``sae eval`` core metrics with the exported sparsifier: on ``x`` when given, else on
        the run's own held-out split (for a run trained from memory, the array it was trained on,
        which this object keeps). The whole evaluation is under the key ``"eval"``."""
        tokens = _count(tokens, "tokens")
        array = None
        name = "eval"
        keep = None
        if x is not None:
            keep, code = _rows(x, "x")
            array = _raw(keep, code)
        elif (self.config or {}).get("data") == "memory:array":
            if self._data is None or isinstance(self._data, (str, os.PathLike)):
                raise SaeError(
                    f"{self.path} was trained from an in-memory array: pass activations, run.metrics(x)"
                )
            keep, code = _rows(self._data, "the training data")
            array, name = _raw(keep, code), "array"
        e = json.loads(_native.eval_run(os.fspath(self.path), array, name, tokens))
        out = dict(e["exported"])
        out["eval"] = e
        return out

    def weights(self) -> dict:
        """The weights as NumPy arrays in the SAELens layout: ``W_enc [d_in, d_sae]``, ``b_enc``,
        ``W_dec [d_sae, d_in]``, ``b_dec`` (and ``threshold`` where the SAE has one), whichever
        layout the SAE was loaded from (SAELens, sparsify or dictionary_learning): the weights
        that :meth:`encode` applies."""
        return dict(self._sae.weights())

    def to_saelens(self, out: PathLike, overwrite: bool = False) -> Path:
        """Write the SAE in SAELens layout to ``out`` (``sae export --format saelens``)."""
        _native.export(os.fspath(self.path), os.fspath(out), "saelens", overwrite)
        return Path(out)

    def to_dictionary_learning(self, out: PathLike, overwrite: bool = False) -> Path:
        """Write the SAE in dictionary_learning layout (``ae.pt`` + ``config.json``, for
        ``dictionary_learning.utils.load_dictionary``) to ``out`` (``sae export --format
        dictionary-learning``). Writes the state dict without torch."""
        _native.export(os.fspath(self.path), os.fspath(out), "dictionary_learning", overwrite)
        return Path(out)
