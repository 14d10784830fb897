#!/usr/bin/env python3
"""Test scripts/harvest.py on a tiny random GPT-2 built locally (no downloads), and
scripts/ce_eval.py's choice of held-out token windows.

Runs only when torch and transformers are importable; otherwise prints
"skipped: torch/transformers not installed" and exits 0.  `python scripts/test_harvest.py`
"""

import json
import os
import struct
import sys
import tempfile

try:
    import torch
    import transformers  # noqa: F401
except ImportError:
    print("skipped: torch/transformers not installed")
    sys.exit(0)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harvest  # noqa: E402


def read_npy(path):
    """(descr, shape, raw bytes) of an npy file, parsed by hand."""
    with open(path, "rb") as f:
        b = f.read()
    assert b[:6] == b"\x93NUMPY", path
    n = struct.unpack("<H", b[8:10])[0]
    header = eval(b[10 : 10 + n].decode("latin1"))  # noqa: S307 - our own file
    assert header["fortran_order"] is False
    return header["descr"], header["shape"], b[10 + n :]


def main():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=3, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        mdir = os.path.join(tmp, "model")
        model.save_pretrained(mdir)
        text = os.path.join(tmp, "text.txt")
        with open(text, "w") as f:
            f.write("The quick brown fox jumps over the lazy dog. " * 40)
        for dtype, size, tdt in [("float32", 4, torch.float32), ("float16", 2, torch.float16), ("bfloat16", 2, torch.bfloat16)]:
            out = os.path.join(tmp, "acts_" + dtype)
            m = harvest.main(
                ["--model", mdir, "--tokenizer", "bytes", "--layer", "1", "--text", text, "--out", out,
                 "--context-length", "16", "--batch-size", "4", "--dtype", dtype, "--shard-tokens", "100",
                 "--device", "cpu"]
            )
            with open(os.path.join(out, "manifest.json")) as f:
                man = json.load(f)
            assert man == json.loads(json.dumps(m))
            assert man["d_in"] == 32 and man["dtype"] == dtype and man["hook"] == "blocks.1.hook_resid_pre"
            assert sum(s["rows"] for s in man["shards"]) == man["total_rows"] > 0
            assert all(s["rows"] % 15 == 0 and s["rows"] <= 100 for s in man["shards"])
            descr, shape, raw = read_npy(os.path.join(out, man["shards"][0]["file"]))
            assert descr == harvest.DTYPES[dtype] and shape == (man["shards"][0]["rows"], 32)
            assert len(raw) == shape[0] * 32 * size
            tdescr, tshape, traw = read_npy(os.path.join(out, man["shards"][0]["tokens_file"]))
            assert tdescr == "<i4" and tshape == (shape[0] // 15, 16)
            window = torch.frombuffer(bytearray(traw), dtype=torch.int32).view(tshape)[0].long()
            assert window[0].item() == 0  # BOS
            # Rows 0..14 are hidden_states[1] of window 0 at positions 1..15.
            with torch.no_grad():
                want = model(input_ids=window[None], output_hidden_states=True).hidden_states[1][0, 1:]
            if dtype == "bfloat16":
                got = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(-1, 32)[:15].view(torch.bfloat16)
            else:
                got = torch.frombuffer(bytearray(raw), dtype=tdt).view(-1, 32)[:15]
            # batched vs single-window forward may differ by rounding
            assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2), dtype
        print("ok: harvest writes shards, token windows and manifest (float32, float16, bfloat16)")

        # A second harvest into the same directory: refused, then replaced with --overwrite (stale
        # shards of the larger first one included), and never over a file that is not ours.
        def into(o):
            return ["--model", mdir, "--tokenizer", "bytes", "--layer", "1", "--text", text, "--out", o,
                    "--context-length", "16", "--batch-size", "4", "--dtype", "float32", "--device", "cpu"]

        out = os.path.join(tmp, "acts_float32")
        args = into(out)
        with open(os.path.join(out, "manifest.json")) as f:
            first = f.read()
        assert len(json.loads(first)["shards"]) > 1
        try:
            harvest.main(args + ["--shard-tokens", "100"])
            raise AssertionError("a second harvest into a full --out must be refused")
        except SystemExit as e:
            assert "is not empty" in str(e) and "--overwrite" in str(e), e
        with open(os.path.join(out, "manifest.json")) as f:
            assert f.read() == first
        m = harvest.main(args + ["--shard-tokens", "100000", "--overwrite"])
        assert len(m["shards"]) == 1
        left = sorted(os.listdir(out)) + sorted(os.listdir(os.path.join(out, "tokens")))
        assert left == [".sae.lock", "acts_00000.npy", "manifest.json", "tokens", "windows_00000.npy"], left
        with open(os.path.join(out, "notes.txt"), "w") as f:
            f.write("mine")
        try:
            harvest.main(args + ["--overwrite"])
            raise AssertionError("a file of the user's must stop --overwrite")
        except SystemExit as e:
            assert "notes.txt not part of the data set" in str(e), e
        assert os.path.isfile(os.path.join(out, "manifest.json")) and os.path.isfile(os.path.join(out, "notes.txt"))
        other = os.path.join(tmp, "theirs")
        os.makedirs(other)
        with open(os.path.join(other, "acts_00000.npy"), "wb") as f:
            f.write(b"not ours")
        try:
            harvest.main(into(other) + ["--overwrite"])
            raise AssertionError("--overwrite must refuse a directory without a manifest of ours")
        except SystemExit as e:
            assert "no data set of ours" in str(e), e
        with open(os.path.join(other, "acts_00000.npy"), "rb") as f:
            assert f.read() == b"not ours"
        assert os.listdir(other) == ["acts_00000.npy"], "a refused --out is left as it was, with no lock file"
        print("ok: harvest refuses a full --out, --overwrite replaces only a data set of ours")

        # While another process writes --out (holds its .sae.lock, as `sae` or a harvest does),
        # a harvest into it is refused before anything is touched.
        import subprocess
        holder = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({os.path.join(out, '.sae.lock')!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())\n"
            "print('held', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            try:
                harvest.main(args + ["--overwrite"])
                raise AssertionError("a harvest into a directory being written must be refused")
            except SystemExit as e:
                assert f"is being written by process {holder.pid}" in str(e), e
        finally:
            holder.kill()
            holder.wait()
        assert os.path.isfile(os.path.join(out, "notes.txt")) and os.path.isfile(os.path.join(out, "manifest.json"))
        print("ok: harvest refuses an --out another process is writing")

        # Interrupted in the middle of its third shard (6 windows of 15 rows each): the two whole
        # shards stay, listed by a manifest marked interrupted; --resume continues it to what an
        # uninterrupted harvest writes, and refuses other settings or other text.
        full = os.path.join(tmp, "full")
        harvest.main(into(full) + ["--shard-tokens", "100"])
        real_write = harvest.NpyWriter.write

        def interrupted(o, after_windows, exc):
            calls = [0]

            def failing(self, raw, rows):
                if self.width == 32:  # an activation window (token windows have width 16)
                    calls[0] += 1
                    if calls[0] > after_windows:
                        raise exc
                return real_write(self, raw, rows)

            harvest.NpyWriter.write = failing
            try:
                harvest.main(into(o) + ["--shard-tokens", "100"])
                raise AssertionError("an interrupted harvest must not return")
            except SystemExit as e:
                assert e.code == 130, e
                assert exc is KeyboardInterrupt
            except OSError:
                assert exc is not KeyboardInterrupt
            finally:
                harvest.NpyWriter.write = real_write

        part = os.path.join(tmp, "part")
        interrupted(part, 15, KeyboardInterrupt)
        with open(os.path.join(part, "manifest.json")) as f:
            man = json.load(f)
        assert man["extra"]["interrupted"]["why"] == "KeyboardInterrupt", man["extra"]
        assert len(man["shards"]) == 2 and man["total_rows"] == 180, man
        assert sorted(os.listdir(part)) == [".sae.lock", "acts_00000.npy", "acts_00001.npy", "manifest.json", "tokens"]
        assert sorted(os.listdir(os.path.join(part, "tokens"))) == ["windows_00000.npy", "windows_00001.npy"]
        for extra, says in [
            ([], "pass --resume"),
            (["--resume", "--dtype", "float16"], "dtype 'float32' there, 'float16' now"),
            (["--resume", "--overwrite"], "pass one"),
        ]:
            try:
                harvest.main(into(part) + ["--shard-tokens", "100"] + extra)
                raise AssertionError(f"{extra} must be refused")
            except SystemExit as e:
                assert says in str(e), (extra, e)
        other_text = os.path.join(tmp, "other.txt")
        with open(other_text, "w") as f:
            f.write("Pack my box with five dozen liquor jugs. " * 40)
        args = into(part) + ["--shard-tokens", "100", "--resume"]
        try:
            harvest.main([other_text if a == text else a for a in args])
            raise AssertionError("--resume with other text must be refused")
        except SystemExit as e:
            assert "harvested from other text" in str(e), e

        def same_as_full(o, m):
            with open(os.path.join(full, "manifest.json")) as f:
                want = json.load(f)
            assert "interrupted" not in m["extra"] and m["shards"] == want["shards"], m
            assert m["total_rows"] == want["total_rows"]
            for sh in want["shards"]:
                with open(os.path.join(o, sh["tokens_file"]), "rb") as a, open(os.path.join(full, sh["tokens_file"]), "rb") as b:
                    assert a.read() == b.read(), sh
                _, shape, got = read_npy(os.path.join(o, sh["file"]))
                _, _, exp = read_npy(os.path.join(full, sh["file"]))
                g = torch.frombuffer(bytearray(got), dtype=torch.float32)
                w = torch.frombuffer(bytearray(exp), dtype=torch.float32)
                assert torch.allclose(g, w, rtol=1e-5, atol=1e-6), sh

        same_as_full(part, harvest.main(args))
        print("ok: an interrupted harvest keeps its whole shards in a manifest; --resume finishes it")

        # Killed (no manifest), between the renames of its second shard's two files; and a failed
        # write (OSError: disk full) keeps what is whole, as Ctrl-C does.
        killed = os.path.join(tmp, "killed")
        interrupted(killed, 15, KeyboardInterrupt)
        # A kill leaves no manifest, and the settings written before the first shard.
        with open(os.path.join(killed, "manifest.json")) as f:
            settings = json.load(f)["extra"]["settings"]
        os.remove(os.path.join(killed, "manifest.json"))
        with open(os.path.join(killed, harvest.IN_PROGRESS), "w") as f:
            json.dump(settings, f)
        os.remove(os.path.join(killed, "tokens", "windows_00001.npy"))
        # Another layer of the same model: shards of the same dtype, width and windows, which only
        # the settings tell apart.
        try:
            harvest.main([("0" if a == "1" and p == "--layer" else a) for p, a in zip([""] + into(killed), into(killed))]
                         + ["--shard-tokens", "100", "--resume"])
            raise AssertionError("--resume of a killed harvest with another --layer must be refused")
        except SystemExit as e:
            assert "killed harvest there had other settings" in str(e) and "layer 1 there, 0 now" in str(e), e
        # Another context length: refused by the settings, and (a harvest killed before they were
        # written) by the shards' headers.
        rec = os.path.join(killed, harvest.IN_PROGRESS)
        for says in ["context_length 16 there, 8 now", "windows of"]:
            try:
                harvest.main(into(killed) + ["--shard-tokens", "100", "--resume", "--context-length", "8"])
                raise AssertionError("--resume with another context length must be refused")
            except SystemExit as e:
                assert says in str(e), e
            if says == "windows of":
                os.rename(rec + ".away", rec)
            else:
                os.rename(rec, rec + ".away")  # as a harvest killed before the settings were written
        same_as_full(killed, harvest.main(into(killed) + ["--shard-tokens", "100", "--resume"]))
        assert not os.path.exists(os.path.join(killed, harvest.IN_PROGRESS)), "removed once the manifest is written"
        full_disk = os.path.join(tmp, "full_disk")
        interrupted(full_disk, 20, OSError(28, "No space left on device"))
        with open(os.path.join(full_disk, "manifest.json")) as f:
            assert "No space left" in json.load(f)["extra"]["interrupted"]["why"]
        same_as_full(full_disk, harvest.main(into(full_disk) + ["--shard-tokens", "100", "--resume"]))
        print("ok: --resume continues a killed harvest from its whole shards, and one stopped by a failed write")

        # SIGTERM and SIGHUP become KeyboardInterrupt while a harvest runs (the path above), and
        # their default action is back once it ends.
        import signal

        for sig in (signal.SIGTERM, signal.SIGHUP):
            restore = harvest.stop_on_signals()
            try:
                os.kill(os.getpid(), sig)
                for _ in range(100):  # the handler runs between bytecodes
                    pass
                raise AssertionError(f"{sig!r} did not interrupt")
            except KeyboardInterrupt as e:
                assert signal.Signals(sig).name in str(e), e
            finally:
                restore()
            assert signal.getsignal(sig) == signal.SIG_DFL
        print("ok: SIGTERM and SIGHUP interrupt a harvest as Ctrl-C does")

        # ce_eval.py --held-out takes only the windows whose activation rows (ctx - 1 each) all
        # lie in the run's held-out segments, and every window, marked, when none does.
        import numpy as np

        import ce_eval

        hd = os.path.join(tmp, "windows")
        os.makedirs(os.path.join(hd, "tokens"))
        a_path, t_path = os.path.join(hd, "acts_00000.npy"), os.path.join(hd, "tokens", "windows_00000.npy")
        np.save(a_path, np.zeros((40, 3), np.float32))  # 10 windows of 5 tokens: 4 rows each
        np.save(t_path, np.arange(50, dtype=np.int64).reshape(10, 5))
        with open(os.path.join(hd, "manifest.json"), "w") as f:
            json.dump({"shards": [{"file": "acts_00000.npy", "rows": 40, "tokens_file": "tokens/windows_00000.npy"}]}, f)
        held = {"shards": [{"file": a_path, "rows": 40, "held_out": [[3, 9], [24, 8], [36, 3]]}]}
        shards = [(a_path, t_path)]
        # rows 3..11 hold windows 1 and 2 (rows 4..11), 24..31 windows 6 and 7, 36..38 none.
        assert ce_eval.held_out_windows(held, shards, np) == [[1, 2, 6, 7]]
        w, _, _, from_held_out = ce_eval.load_windows(hd, 10**6, False, np, torch, held)
        assert from_held_out is True and w[:, 0].tolist() == [5, 10, 30, 35], w
        w, _, _, from_held_out = ce_eval.load_windows(hd, 10, False, np, torch, held)
        assert w.shape[0] == 2, "--max-tokens 10: two windows of 5"
        none = {"shards": [{"file": a_path, "rows": 40, "held_out": [[1, 3]]}]}
        w, _, _, from_held_out = ce_eval.load_windows(hd, 10**6, False, np, torch, none)
        assert from_held_out is False and w.shape[0] == 10, "no whole window held out: all, marked"
        try:
            ce_eval.held_out_windows({"shards": [{"file": a_path, "rows": 41, "held_out": []}]}, shards, np)
            raise AssertionError("a shard whose rows do not match its windows must be refused")
        except SystemExit as e:
            assert "cannot tell which windows" in str(e), e
        print("ok: ce_eval.py --held-out keeps only the windows of the held-out rows")


if __name__ == "__main__":
    main()
