#!/usr/bin/env python3
"""Test scripts/harvest.py on a tiny random GPT-2 built locally (no downloads).

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
        assert left == ["acts_00000.npy", "manifest.json", "tokens", "windows_00000.npy"], left
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
        print("ok: harvest refuses a full --out, --overwrite replaces only a data set of ours")


if __name__ == "__main__":
    main()
