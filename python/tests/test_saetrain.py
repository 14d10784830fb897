"""The Python package against the CLI and against plain NumPy (run by .ci/run after cargo test)."""

import json
import os
import signal
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse

import saetrain

REPO = Path(__file__).resolve().parents[2]
SAE_BIN = Path(os.environ.get("SAE_BIN", REPO / "target" / "release" / "sae"))
SMALL = dict(sparsifier="topk", k=6, d_sae=80, steps=40, batch_size=200, eval_tokens=600, seed=3)


def activations(rows=4000, d=36, seed=0):
    """Superposition-like data: sparse combinations of random unit directions plus noise."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((120, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    active = rng.random((rows, 120)) < 0.05
    x = (active * rng.exponential(1.0, (rows, 120))) @ dirs + 0.01 * rng.standard_normal((rows, d))
    return x.astype(np.float32)


def read_safetensors(path):
    """A safetensors file as NumPy arrays, read with the format's own definition (8-byte header
    length, JSON header, raw little-endian data): no saetrain code involved."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", (name, t["dtype"])
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(t["shape"])
    return out


@pytest.fixture(scope="module")
def data():
    return activations()


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    return saetrain.train(data, out=tmp_path_factory.mktemp("runs") / "topk", progress=False, **SMALL)


def test_every_cli_option_is_a_keyword_with_the_cli_default():
    opts = saetrain.train_options()
    help_text = subprocess.run([SAE_BIN, "train", "--help"], capture_output=True, text=True, check=True).stdout
    for name, (flag, default, _) in opts.items():
        assert flag in help_text, flag
        assert name == flag[2:].replace("-", "_")
    for name in ["sparsifier", "k", "d_sae", "rate", "lr", "steps", "aux", "budget", "normalize", "seed"]:
        assert name in opts, name
    for name, (flag, default, _) in opts.items():
        if default not in (None, "false"):  # clap prints no default for a flag
            assert f"[default: {default}]" in help_text, (name, default)
    assert "[default: " + opts["k"][1] + "]" in help_text


def test_training_from_memory_matches_the_cli_on_the_same_data(data, run, tmp_path):
    np.save(tmp_path / "acts.npy", data)
    flags = []
    for name, value in SMALL.items():
        flags += [saetrain.train_options()[name][0], str(value)]
    cli = tmp_path / "cli"
    subprocess.run([SAE_BIN, "train", "--data", tmp_path / "acts.npy", *flags, "--out", cli, "--quiet"], check=True)
    ours, theirs = read_safetensors(run.path / "sae_weights.safetensors"), read_safetensors(cli / "sae_weights.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert run.config["data"] == "memory:array"


def test_encode_matches_the_exported_weights_in_numpy(data, run):
    w = read_safetensors(run.path / "sae_weights.safetensors")
    x = data[:257]
    pre = (x.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    k = SMALL["k"]
    want = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(x))[:, None]
    want[rows, top] = np.maximum(pre[rows, top], 0)
    codes = run.encode(x)
    assert isinstance(codes, scipy.sparse.csr_matrix) and codes.shape == (257, SMALL["d_sae"])
    np.testing.assert_allclose(codes.toarray(), want, atol=1e-4)
    indptr, indices, values = run.encode(x, format="arrays")
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and values.dtype == np.float32
    x_hat = w["b_dec"] + want @ w["W_dec"]
    np.testing.assert_allclose(run.decode(codes), x_hat, atol=1e-4)
    np.testing.assert_allclose(run.decode((indptr, indices, values)), x_hat, atol=1e-4)
    np.testing.assert_allclose(run.reconstruct(x), x_hat, atol=1e-4)


def test_weights_metrics_and_export(run, data, tmp_path):
    w = run.weights()
    assert w["W_enc"].shape == (36, 80) and w["W_dec"].shape == (80, 36)
    m = run.metrics()
    assert m["tokens"] == SMALL["eval_tokens"] and abs(m["l0"] - SMALL["k"]) < 1e-9
    assert 0.0 < m["explained_variance"] < 1.0
    # The same numbers as `sae eval` on the same held-out data.
    np.save(tmp_path / "held.npy", data[:900])
    out = subprocess.run(
        [SAE_BIN, "eval", run.path, "--data", tmp_path / "held.npy", "--out", tmp_path / "ev", "--no-plots"],
        check=True,
        capture_output=True,
    )
    assert out.returncode == 0
    cli = json.loads((tmp_path / "ev" / "eval.json").read_text())["runs"][0]
    ours = run.metrics(data[:900])
    for key in ["explained_variance", "mse", "l0", "dead", "cosine"]:
        assert ours[key] == cli["exported"][key], key
    dest = run.to_saelens(tmp_path / "exported")
    assert (dest / "cfg.json").is_file() and (dest / "sae_weights.safetensors").is_file()
    again = saetrain.load(dest)
    np.testing.assert_array_equal(again.encode(data[:50]).toarray(), run.encode(data[:50]).toarray())
    # dictionary_learning's layout (loaded by that library in scripts/test_interop.py)
    dl = run.to_dictionary_learning(tmp_path / "dl")
    assert (dl / "ae.pt").is_file()
    # weights() gives SAELens's names and shapes whatever the layout, equal to the file's own.
    file = read_safetensors(run.path / "sae_weights.safetensors")
    for name, want in file.items():
        np.testing.assert_array_equal(w[name], want, err_msg=name)
    subprocess.run(
        [SAE_BIN, "export", run.path, "--format", "sparsify", "--out", tmp_path / "sp"], check=True, capture_output=True
    )
    for other in [saetrain.load(dl), saetrain.load(tmp_path / "sp")]:
        got = other.weights()
        assert sorted(got) == sorted(w), other
        for name in w:
            np.testing.assert_allclose(got[name], w[name], rtol=1e-6, atol=1e-7, err_msg=f"{other}: {name}")
    assert json.loads((dl / "config.json").read_text())["trainer"]["dict_size"] == 80
    with pytest.raises(Exception, match="holds a training run"):
        run.to_dictionary_learning(run.path, overwrite=True)


def test_other_dtypes_are_read_or_converted_once(data, tmp_path):
    r16 = saetrain.train(data.astype(np.float16), out=tmp_path / "f16", progress=False, **SMALL)
    assert r16.summary["steps"] == SMALL["steps"]
    r64 = saetrain.train(data.astype(np.float64), out=tmp_path / "f64", progress=False, **SMALL)
    base = saetrain.train(data, out=tmp_path / "f32", progress=False, **SMALL)
    np.testing.assert_array_equal(r64.weights()["W_dec"], base.weights()["W_dec"])
    strided = np.asfortranarray(data)
    rs = saetrain.train(strided, out=tmp_path / "fortran", progress=False, **SMALL)
    np.testing.assert_array_equal(rs.weights()["W_dec"], base.weights()["W_dec"])
    mv = saetrain.train(memoryview(data), out=tmp_path / "buffer", progress=False, **SMALL)
    np.testing.assert_array_equal(mv.weights()["W_dec"], base.weights()["W_dec"])


def test_bfloat16_through_ml_dtypes_is_read_in_place(data, tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = data.astype(ml_dtypes.bfloat16)
    got = saetrain.train(bf, out=tmp_path / "bf16", progress=False, **SMALL)
    want = saetrain.train(bf.astype(np.float32), out=tmp_path / "rounded", progress=False, **SMALL)
    np.testing.assert_array_equal(got.weights()["W_dec"], want.weights()["W_dec"])
    np.testing.assert_array_equal(got.encode(bf[:40]).toarray(), want.encode(bf[:40].astype(np.float32)).toarray())


def test_bad_inputs_raise_clear_exceptions(data, run, tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        saetrain.train(data, bogus=1)
    with pytest.raises(ValueError, match="2-D"):
        saetrain.train(data[:, 0])
    with pytest.raises(TypeError, match="Python objects"):
        saetrain.train(np.array([[object()]], dtype=object))
    with pytest.raises(TypeError, match="not a real number"):
        saetrain.train(data.astype(np.complex64))
    with pytest.raises(ValueError, match="invalid value|possible values"):
        saetrain.train(data, sparsifier="nope", out=tmp_path / "x")
    with pytest.raises(saetrain.SaeError, match="fewer than one batch"):
        saetrain.train(data[:500], out=tmp_path / "small", progress=False)
    with pytest.raises(saetrain.SaeError, match="previous run"):
        saetrain.train(data, out=run.path, progress=False, **SMALL)
    with pytest.raises(ValueError, match="d_in 36"):
        run.encode(data[:, :10])
    with pytest.raises(saetrain.SaeError, match="no SAE weight file|cfg.json|cannot"):
        saetrain.load(tmp_path)
    with pytest.raises(ValueError, match="threads = -1: expected a positive integer"):
        saetrain.train(data, threads=-1, out=tmp_path / "neg")
    with pytest.raises(TypeError, match="threads: expected a positive integer"):
        saetrain.train(data, threads=1.5, out=tmp_path / "neg")
    with pytest.raises(ValueError, match="tokens = 0"):
        run.metrics(data[:100], tokens=0)
    # An index past 2**32 is refused, not wrapped onto another latent.
    indptr, indices, values = run.encode(data[:3], format="arrays")
    wide = indices.astype(np.int64)
    wide[0] += 2**32
    with pytest.raises(ValueError, match=f"latent index {wide[0]} is outside 0..80"):
        run.decode((indptr, wide, values))
    with pytest.raises(ValueError, match="latent index -1"):
        run.decode((indptr, np.full_like(indices, -1), values))
    with pytest.raises(TypeError, match="must be integers"):
        run.decode((indptr, indices.astype(np.float32), values))


def test_ctrl_c_leaves_a_run_that_resumes_to_the_uninterrupted_result(data, tmp_path, monkeypatch):
    opts = dict(SMALL, steps=300, checkpoint_every=0)

    def press_ctrl_c_at_step_100(self, step, total, loss):
        if step == 100:
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, as the terminal sends

    monkeypatch.setattr(saetrain._Progress, "__call__", press_ctrl_c_at_step_100)
    with pytest.raises(KeyboardInterrupt, match="interrupted after step 10[01]"):
        saetrain.train(data, out=tmp_path / "cut", **opts)
    monkeypatch.undo()
    state = tmp_path / "cut" / "trainer_state.safetensors"
    assert state.is_file()
    done = saetrain.train(data, resume=tmp_path / "cut", progress=False)
    assert done.summary["steps"] == 300
    whole = saetrain.train(data, out=tmp_path / "whole", progress=False, **opts)
    np.testing.assert_array_equal(done.weights()["W_dec"], whole.weights()["W_dec"])


def test_sigterm_stops_like_ctrl_c_and_the_handler_is_restored(data, tmp_path, monkeypatch):
    opts = dict(SMALL, steps=300, checkpoint_every=0)

    def sigterm_at_step_100(self, step, total, loss):
        if step == 100:
            os.kill(os.getpid(), signal.SIGTERM)  # as a batch scheduler sends before preempting

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.setattr(saetrain._Progress, "__call__", sigterm_at_step_100)
    with pytest.raises(KeyboardInterrupt, match="interrupted after step 10[01]"):
        saetrain.train(data, out=tmp_path / "cut", **opts)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "train() restores the default"
    assert (tmp_path / "cut" / "trainer_state.safetensors").is_file()
    done = saetrain.train(data, resume=tmp_path / "cut", progress=False)
    assert done.summary["steps"] == 300


def test_metrics_of_a_run_from_memory_stay_in_its_held_out_rows(data, run):
    """More tokens than the run held out: its held-out rows, not a larger split that would hold
    rows it trained on."""
    held_out = run.metrics()["tokens"]
    assert 0 < held_out <= SMALL["eval_tokens"]
    assert run.metrics(tokens=3 * SMALL["eval_tokens"])["tokens"] == held_out


def test_resume_on_another_array_of_the_same_shape_is_refused(data, run):
    """A run trained from memory continues only on the array it was trained on: another array of
    the same shape (same row count, so the same split) is refused by name, not trained on."""
    other = activations(seed=1)
    assert other.shape == data.shape
    with pytest.raises(saetrain.SaeError, match="not the data this run was trained on"):
        saetrain.train(other, resume=run.path, steps=SMALL["steps"] + 10, progress=False)


def test_the_gil_is_released_while_training(data, tmp_path):
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.01)

    t = threading.Thread(target=tick)
    t.start()
    saetrain.train(data, out=tmp_path / "gil", progress=False, **dict(SMALL, steps=600))
    stop.set()
    t.join()
    assert len(ticks) > 5, "another Python thread ran while training"
