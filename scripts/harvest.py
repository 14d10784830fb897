#!/usr/bin/env python3
"""Harvest residual-stream activations of a Hugging Face causal LM into npy shards + manifest.json
that `sae train --data DIR` reads.

Text is tokenised, concatenated and cut into windows of --context-length tokens, each starting with
the BOS token (or the tokenizer's EOS when it has no BOS, as GPT-2). The activation at the first
position of every window is NOT saved (Gao et al. 2024: the BOS/attention-sink position has a huge
norm and says nothing about the text), so each window gives context_length - 1 rows.

Hook points (scripts/saetrain_hooks.py, shared with ce_eval.py): `resid_pre` of block L = the
input of block L (SAELens `blocks.L.hook_resid_pre`, HF hidden_states[L]) or `resid_post` = its
output (`blocks.L.hook_resid_post`, hidden_states[L + 1] except after the last block, where HF
returns the final-norm output). Activations are read by a hook on the block itself, the same one
ce_eval.py splices at; the forward pass stops there.

Output directory:
  acts_00000.npy ...          (rows, d_model) float32 / float16 / bfloat16 (bfloat16 written as '<V2')
  tokens/windows_00000.npy    (windows, context_length) int32: the token windows of that shard, BOS
                              included; activation row i of the shard is window i // (ctx-1),
                              position 1 + i % (ctx-1). Enough to evaluate CE loss with x replaced.
  manifest.json               model, layer, hook, d_in, dtype, per-shard files and rows, context
                              length, prepend_bos, ... (`sae train` copies model, hook, layer,
                              context length and prepend_bos into the run's cfg.json)

--model takes a Hugging Face id, a local directory or a .gguf file (transformers + gguf load it).

Interrupted (Ctrl-C, SIGTERM, SIGHUP, a failed write): the whole shards written so far stay, and
manifest.json lists them with extra.interrupted set, so that the data is usable as it is; the same
command with --resume continues from there (also after a kill, from the whole shards and the
settings in harvest_in_progress.json).

Example:
  python scripts/harvest.py --model HuggingFaceTB/SmolLM2-135M --layer 15 --text corpus.txt \\
      --out data/smollm2-l15 --context-length 128 --batch-size 32 --dtype float16 --max-tokens 10000000
"""

import argparse
import fcntl
import glob
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import saetrain_hooks as hooks  # noqa: E402

NPY_HEADER_BYTES = 128  # fixed, so that the header can be rewritten with the final row count


def npy_header(descr, shape, total=NPY_HEADER_BYTES):
    d = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (
        descr,
        ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else ""),
    )
    pad = total - 10 - len(d) - 1
    if pad < 0:
        raise ValueError("npy header too long")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", total - 10) + d.encode("latin1") + b" " * pad + b"\n"


def temporary(path):
    """The temporary a file is written to before it is renamed onto `path`: `.NAME.PID.tmp`, the
    pattern of saetrain's own atomic writes."""
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.{os.getpid()}.tmp")


def is_temporary(name):
    parts = name.split(".")
    return name.startswith(".") and name.endswith(".tmp") and len(parts) >= 4 and parts[-2].isdigit()


class NpyWriter:
    """Append rows to an npy file; the header is rewritten with the final shape on close. Written
    to a temporary and renamed on close, so that an interrupted harvest leaves no shard whose
    header disagrees with its rows."""

    def __init__(self, path, descr, width):
        self.path, self.descr, self.width, self.rows = path, descr, width, 0
        self.tmp = temporary(path)
        self.f = open(self.tmp, "wb")
        self.f.write(npy_header(descr, (0, width) if width else (0,)))

    def write(self, raw_bytes, rows):
        self.f.write(raw_bytes)
        self.rows += rows

    def close(self):
        self.f.seek(0)
        self.f.write(npy_header(self.descr, (self.rows, self.width) if self.width else (self.rows,)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def discard(self):
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_json_atomic(path, value):
    tmp = temporary(path)
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(out):
    """Temporaries of ours in `out` (and its tokens/) whose writer is no longer running."""
    for d in (out, os.path.join(out, hooks.TOKENS_DIR)):
        for n in os.listdir(d) if os.path.isdir(d) else []:
            if not is_temporary(n):
                continue
            try:
                os.kill(int(n.split(".")[-2]), 0)
            except ProcessLookupError:
                os.remove(os.path.join(d, n))
            except (PermissionError, OverflowError, ValueError):
                pass


class OutLock:
    """The directory lock `sae` takes (`.sae.lock`, an exclusive flock holding the writer's pid):
    while a harvest writes, `sae train --data OUT` refuses the data as being written, and a
    second harvest into OUT refuses to start. The OS releases it if the process dies."""

    def __init__(self, out):
        self.path = os.path.join(out, ".sae.lock")
        self.had = os.path.lexists(self.path)
        try:
            # Never through a link: a planted `.sae.lock` link would truncate the file it names.
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            why = "it is a symbolic link (remove it)" if os.path.islink(self.path) else e.strerror
            sys.exit(f"error: cannot open the lock file {self.path}: {why}")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip()
            os.close(self.fd)
            who = f"process {holder}" if holder else "another process"
            sys.exit(f"error: {out} is being written by {who} (lock {self.path}); wait for it to finish or "
                     "choose another --out")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self, remove=False):
        """Unlock; `remove` takes away a lock file this harvest created (a refused --out, a
        directory of the user's, is left as it was)."""
        if remove and not self.had:
            os.remove(self.path)
        os.close(self.fd)


def prepare_out(out, overwrite, resume=False):
    """Create `out`, or check that it may be written: empty, or (with --overwrite) holding only
    a data set of ours (its manifest.json and the files that lists), which is removed, manifest
    first. A harvest costs GPU hours, and its shards' names are every harvest's names: a second
    harvest into the same directory must not silently replace the first."""
    os.makedirs(out, exist_ok=True)
    remove_stale_temporaries(out)
    names = sorted(n for n in os.listdir(out) if not is_temporary(n) and n != ".sae.lock")
    tokens_dir = os.path.join(out, hooks.TOKENS_DIR)
    if names == [hooks.TOKENS_DIR] and not [n for n in os.listdir(tokens_dir) if not is_temporary(n)]:
        names = []  # an empty tokens/ left by a harvest that wrote nothing
    if resume:
        manifest = os.path.join(out, hooks.MANIFEST)
        if os.path.exists(manifest):
            try:
                with open(manifest) as f:
                    finished = not (json.load(f).get("extra") or {}).get("interrupted")
            except (OSError, ValueError, AttributeError):
                sys.exit(f"error: --resume {out}: {manifest} is not a manifest of ours")
            if finished:
                sys.exit(f"error: --resume {out}: {manifest} is a finished harvest (pass --overwrite to replace it)")
        return
    if not names:
        return
    listing = ", ".join(names[:4]) + (f", ... ({len(names)} entries)" if len(names) > 4 else "")
    if not overwrite:
        sys.exit(f"error: --out {out} is not empty ({listing}): pass --resume to continue an interrupted harvest "
                 "there, --overwrite to replace a data set written there before (its manifest.json and the files it "
                 "lists; nothing else), or choose another --out")
    manifest = os.path.join(out, "manifest.json")
    try:
        with open(manifest) as f:
            m = json.load(f)
        if m.get("format") != "saetrain-activations":
            raise ValueError("not a saetrain-activations manifest")
        listed = {"manifest.json", "ground_truth.npy"}
        for sh in m["shards"]:
            listed.add(sh["file"])
            if sh.get("tokens_file"):
                listed.add(sh["tokens_file"])
    except (OSError, ValueError, KeyError, TypeError):
        sys.exit(f"error: --out {out} holds {listing} but no data set of ours (a saetrain-activations "
                 "manifest.json): --overwrite replaces only that; choose another --out")
    present = set(names) - {hooks.TOKENS_DIR}
    if os.path.isdir(tokens_dir):
        present |= {f"{hooks.TOKENS_DIR}/{n}" for n in os.listdir(tokens_dir) if not is_temporary(n)}
    foreign = sorted(present - listed)
    if foreign:
        sys.exit(f"error: --out {out}: {', '.join(foreign)} not part of the data set there (manifest.json does "
                 "not list them); --overwrite replaces only that data set: move them or choose another --out")
    os.remove(manifest)  # first: a directory half replaced is no data set, never a stale one
    for n in sorted(present - {"manifest.json"}):
        os.remove(os.path.join(out, n))


DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<V2"}

# The settings a resumed harvest must share with the one it continues (manifest "extra.settings").
RESUMED_SETTINGS = ("model", "layer", "hook", "tokenizer", "context_length", "dtype", "model_dtype", "shard_tokens")
# Those settings, written before the first shard and removed once a manifest holds them: after a
# kill (no manifest) --resume still knows which model and layer the shards came from, which their
# headers (dtype, width, context) and token windows cannot tell.
IN_PROGRESS = "harvest_in_progress.json"


def settings_differ(theirs, settings):
    return [f"{k} {theirs.get(k)!r} there, {settings[k]!r} now" for k in RESUMED_SETTINGS if theirs.get(k) != settings[k]]


def read_npy_header(path):
    """(descr, shape) of an npy file of ours, from its header."""
    with open(path, "rb") as f:
        head = f.read(NPY_HEADER_BYTES)
    if head[:6] != b"\x93NUMPY":
        raise ValueError(f"{path}: not an npy file")
    n = struct.unpack("<H", head[8:10])[0]
    import ast

    h = ast.literal_eval(head[10 : 10 + n].decode("latin1"))
    return h["descr"], tuple(h["shape"])


def done_so_far(out, settings, d_model):
    """The whole shards of an interrupted harvest in `out`, as manifest entries: those its
    manifest.json lists (written when it was interrupted; its settings must be these), or after a
    kill, acts_00000.npy, acts_00001.npy, ... with their token windows, as far as both are there.
    Exits with an error naming what differs."""
    manifest = os.path.join(out, hooks.MANIFEST)
    if os.path.exists(manifest):
        with open(manifest) as f:
            m = json.load(f)
        # prepare_out refused a finished harvest's manifest before the model loaded.
        theirs = (m.get("extra") or {}).get("settings") or {}
        differ = settings_differ(theirs, settings)
        if differ:
            sys.exit(f"error: --resume {out}: the interrupted harvest there had other settings: {'; '.join(differ)}")
        return list(m["shards"])
    in_progress = os.path.join(out, IN_PROGRESS)
    if os.path.exists(in_progress):
        try:
            with open(in_progress) as f:
                theirs = json.load(f)
            assert isinstance(theirs, dict)
        except (OSError, ValueError, AssertionError):
            sys.exit(f"error: --resume {out}: {in_progress} is not a record of ours (a harvest's settings)")
        differ = settings_differ(theirs, settings)
        if differ:
            sys.exit(f"error: --resume {out}: the killed harvest there had other settings ({in_progress}): "
                     f"{'; '.join(differ)}")
    else:
        print(f"note: --resume {out}: no manifest and no {IN_PROGRESS} (a harvest killed before 2026-12-07): "
              "the shards' dtype, width, context and token windows are checked, their model and layer cannot be",
              file=sys.stderr)
    shards = []
    descr = DTYPES[settings["dtype"]]
    while os.path.exists(os.path.join(out, hooks.acts_file(len(shards)))):
        i = len(shards)
        acts, toks = os.path.join(out, hooks.acts_file(i)), os.path.join(out, hooks.tokens_file(i))
        if not os.path.exists(toks):
            break  # killed between the two renames: this shard is written again
        a, t = read_npy_header(acts), read_npy_header(toks)
        if a[0] != descr or a[1][1:] != (d_model,) or t[1][1:] != (settings["context_length"],):
            sys.exit(f"error: --resume {out}: {acts} holds {a[0]} rows of width {a[1][1:]} with windows of "
                     f"{t[1][1:]} tokens; this harvest writes {descr} rows of width {d_model} from windows of "
                     f"{settings['context_length']}")
        shards.append({"file": hooks.acts_file(i), "rows": a[1][0], "tokens_file": hooks.tokens_file(i)})
    return shards


def stored_windows(out, shard):
    """The token windows a shard of ours was harvested from, as lists of ids."""
    import numpy as np

    return np.load(os.path.join(out, shard["tokens_file"])).tolist()


def stop_on_signals():
    """SIGTERM and SIGHUP (a scheduler's notice, a dropped ssh session) raise KeyboardInterrupt as
    Ctrl-C does, so that the harvest keeps its whole shards; only where their action is the
    default (an inherited ignore stays). Returns what restores the handlers."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    changed = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) == signal.SIG_DFL]
    for sig in changed:
        signal.signal(sig, interrupt)
    return lambda: [signal.signal(sig, signal.SIG_DFL) for sig in changed]


def to_numpy(t, dtype_name):
    """A tensor on the CPU in the stored dtype, as a numpy array (bfloat16 as its raw int16 words)."""
    import torch

    tt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    t = t.detach().to(device="cpu", dtype=tt).contiguous()
    if dtype_name == "bfloat16":
        t = t.view(torch.int16)  # numpy has no bfloat16: write the raw 2-byte words
    return t.numpy()


class ByteTokenizer:
    """Offline test tokenizer: byte b -> id b + 1, BOS = 0 (`--tokenizer bytes`)."""

    bos_token_id = 0
    eos_token_id = 0
    name_or_path = "bytes"

    def encode(self, text):
        return [b + 1 for b in text.encode("utf-8")]


def load_texts(patterns):
    files = []
    for p in patterns:
        hits = sorted(glob.glob(p))
        if not hits:
            sys.exit(f"error: --text {p}: no such file")
        files += hits
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield f, fh.read()


def windows(tokenizer, texts, ctx, max_windows):
    """Yield windows of ctx token ids: [BOS] + ctx-1 tokens of the concatenated texts."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        sys.exit("error: the tokenizer has neither a BOS nor an EOS token")
    buf, n = [], 0
    for _, text in texts:
        ids = tokenizer.encode(text) if isinstance(tokenizer, ByteTokenizer) else tokenizer(text)["input_ids"]
        if ids and ids[0] == bos:
            ids = ids[1:]
        buf.extend(ids)
        buf.append(bos if tokenizer.eos_token_id is None else tokenizer.eos_token_id)
        while len(buf) >= ctx - 1:
            yield [bos] + buf[: ctx - 1]
            buf = buf[ctx - 1 :]
            n += 1
            if max_windows and n >= max_windows:
                return


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model id, local directory or .gguf file")
    ap.add_argument("--layer", type=int, required=True, help="block index L")
    ap.add_argument("--hook", choices=["resid_pre", "resid_post"], default=hooks.DEFAULT_KIND,
                    help="blocks.L.hook_resid_pre (input of block L) or ..._post (its output)")
    ap.add_argument("--text", nargs="+", required=True, help="UTF-8 text file(s) or globs")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer id/dir (default: the model's); 'bytes' for tests")
    ap.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored dtype")
    ap.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--shard-tokens", type=int, default=1 << 20, help="rows per shard (rounded to windows)")
    ap.add_argument("--max-tokens", type=int, default=0, help="stop after this many rows (0: all text)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the data set in --out (only one of ours: its manifest.json and the files it lists)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the interrupted harvest in --out (the same command otherwise)")
    args = ap.parse_args(argv)
    if args.resume and args.overwrite:
        sys.exit("error: --resume continues the harvest in --out, --overwrite replaces it: pass one")
    if args.resume and not os.path.isdir(args.out):
        sys.exit(f"error: --resume {args.out}: no such directory")
    # Before the model loads: a refusal should not cost a model download.
    os.makedirs(args.out, exist_ok=True)
    lock = OutLock(args.out)
    try:
        prepare_out(args.out, args.overwrite, args.resume)
    except SystemExit:
        lock.release(remove=True)
        raise
    try:
        return harvest(args)
    finally:
        lock.release()


def harvest(args):
    """The harvest itself, into the prepared and locked `args.out`."""
    import torch

    if args.context_length < 2:
        sys.exit("error: --context-length must be >= 2 (the first position is not saved)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.model_dtype]
    model = hooks.load_model(args.model, mdt, device)
    n_layers = len(hooks.find_blocks(model))
    if not 0 <= args.layer < n_layers:
        sys.exit(f"error: --layer {args.layer}: the model has blocks 0..{n_layers - 1}")
    hook = hooks.hook_name(args.layer, args.hook)
    if args.tokenizer == "bytes":
        tok = ByteTokenizer()
    else:
        tok = hooks.load_tokenizer(args.tokenizer or args.model)

    captured = {}

    class Captured(Exception):
        """Raised by the hook: nothing after the hook point is needed."""

    def capture(h):
        captured["h"] = h
        raise Captured

    hooks.attach(model, hook, capture)
    d_model = model.config.hidden_size
    ctx = args.context_length
    per_window = ctx - 1
    windows_per_shard = max(1, args.shard_tokens // per_window)
    max_windows = -(-args.max_tokens // per_window) if args.max_tokens else 0

    os.makedirs(os.path.join(args.out, hooks.TOKENS_DIR), exist_ok=True)
    descr = DTYPES[args.dtype]
    settings = {"model": hooks.model_record(args.model), "layer": args.layer, "hook": hook,
                "tokenizer": getattr(tok, "name_or_path", None), "context_length": ctx, "dtype": args.dtype,
                "model_dtype": args.model_dtype, "shard_tokens": args.shard_tokens}
    shards = done_so_far(args.out, settings, d_model) if args.resume else []
    write_json_atomic(os.path.join(args.out, IN_PROGRESS), settings)
    resumed_windows = sum(s["rows"] for s in shards) // per_window
    acts, toks = None, None

    def open_shard():
        i = len(shards)
        name, tname = hooks.acts_file(i), hooks.tokens_file(i)
        shards.append({"file": name, "rows": 0, "tokens_file": tname})
        return NpyWriter(os.path.join(args.out, name), descr, d_model), NpyWriter(
            os.path.join(args.out, tname), "<i4", ctx
        )

    def close_shard():
        acts.close()
        toks.close()
        shards[-1]["rows"] = acts.rows

    text_files = []

    def texts():
        for f, t in load_texts(args.text):
            text_files.append(f)
            yield f, t

    batch, total = [], 0
    it = windows(tok, texts(), ctx, max_windows)
    # A resumed harvest skips the windows of the shards it keeps, checking that they are the
    # windows those shards were harvested from (the same text, tokenizer and context length).
    for sh in shards:
        for w in stored_windows(args.out, sh):
            if next(it, None) != w:
                sys.exit(f"error: --resume {args.out}: {sh['tokens_file']} was harvested from other text (or "
                         "another tokenizer or --text order) than this command's: its windows differ")
        total += sh["rows"]
    if args.resume:
        print(f"resuming after {total} rows in {len(shards)} whole shard(s)", file=sys.stderr)

    def manifest_of(interrupted=None):
        extra = {
            "context_length": ctx,
            "prepend_bos": True,
            "bos_excluded": True,
            "rows_per_window": per_window,
            "tokenizer": getattr(tok, "name_or_path", None),
            "model_dtype": args.model_dtype,
            "text_files": text_files,
            "hidden_states_index": hooks.hidden_states_index(args.layer, args.hook),
            "settings": settings,
        }
        if interrupted:
            extra["interrupted"] = interrupted
        return {
            "format": "saetrain-activations",
            "version": 1,
            "model": hooks.model_record(args.model),
            "layer": args.layer,
            "hook": hook,
            "d_in": d_model,
            "dtype": args.dtype,
            "shards": shards,
            "total_rows": sum(s["rows"] for s in shards),
            "normalization": "none: raw residual stream (sae train --normalize scales it)",
            "extra": extra,
        }

    restore_signals = stop_on_signals()
    done = False
    try:
        while not done:
            try:
                batch.append(next(it))
            except StopIteration:
                done = True
            if batch and (len(batch) == args.batch_size or done):
                ids = torch.tensor(batch, dtype=torch.long, device=device)
                with torch.no_grad():
                    try:
                        model(input_ids=ids)
                    except Captured:
                        pass
                h = to_numpy(captured.pop("h")[:, 1:, :], args.dtype)  # BOS position excluded
                for w in range(len(batch)):
                    if acts is None or acts.rows >= windows_per_shard * per_window:
                        if acts is not None:
                            close_shard()
                        acts, toks = open_shard()
                    acts.write(h[w].tobytes(), per_window)
                    toks.write(torch.tensor(batch[w], dtype=torch.int32).numpy().tobytes(), 1)
                    total += per_window
                batch = []
                print(f"\r{total} rows, {len(shards)} shard(s)", end="", file=sys.stderr, flush=True)
    except BaseException as e:
        # Ctrl-C, a signal, a failed write, a model error: the shard being written goes with its
        # temporary; the whole ones stay, listed by a manifest marked interrupted.
        for w in (acts, toks):
            if w is not None and not w.f.closed:
                w.discard()
        if shards and shards[-1]["rows"] == 0:
            # The shard under way (its rows are set once both of its files are whole): gone, with
            # its activations if they were renamed into place before its windows failed.
            under_way = os.path.join(args.out, shards.pop()["file"])
            if os.path.exists(under_way):
                os.remove(under_way)
        print(file=sys.stderr)
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if not shards and os.path.exists(os.path.join(args.out, IN_PROGRESS)):
            os.remove(os.path.join(args.out, IN_PROGRESS))  # nothing kept: --out is empty again
        if shards:
            rows = sum(s["rows"] for s in shards)
            try:
                write_json_atomic(os.path.join(args.out, hooks.MANIFEST),
                                  manifest_of({"why": why, "rows": rows, "shards": len(shards)}))
                os.remove(os.path.join(args.out, IN_PROGRESS))  # the manifest holds the settings now
                print(f"harvest interrupted ({why}) after {rows} rows in {len(shards)} whole shard(s): "
                      f"{os.path.join(args.out, hooks.MANIFEST)} lists them (extra.interrupted); the same command "
                      "with --resume continues it", file=sys.stderr)
            except OSError as w:
                print(f"harvest interrupted ({why}) after {rows} rows in {len(shards)} whole shard(s); its manifest "
                      f"could not be written ({w}): the same command with --resume continues from the shards",
                      file=sys.stderr)
        if isinstance(e, KeyboardInterrupt):
            sys.exit(130)
        raise
    finally:
        restore_signals()
    if acts is None and not shards:
        os.remove(os.path.join(args.out, IN_PROGRESS))
        sys.exit("error: the text gave no full window; add text or lower --context-length")
    if acts is not None:
        close_shard()
    print(file=sys.stderr)

    manifest = manifest_of()
    write_json_atomic(os.path.join(args.out, "manifest.json"), manifest)
    os.remove(os.path.join(args.out, IN_PROGRESS))
    print(f"wrote {total} rows x {d_model} ({args.dtype}) in {len(shards)} shard(s) to {args.out}", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
