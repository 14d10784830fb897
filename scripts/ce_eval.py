#!/usr/bin/env python3
"""Language-model scores of an SAE: splice its reconstruction into the causal LM at the hook its
activations were harvested from, and compare next-token losses (SAEBench "core" metrics).

    CE loss score = (H_zero - H_sae) / (H_zero - H_clean)       (SAEBench ce_loss_score)
    KL score      = (KL_zero - KL_sae) / KL_zero                (SAEBench kl_div_score)

H_clean: mean next-token cross-entropy of the unmodified model; H_sae: with the activations at
the hook replaced by the SAE's reconstruction; H_zero: with them zero-ablated (every position, as
SAEBench). KL_*: mean per-position KL(p_clean || p_patched) of the next-token distributions. As
SAEBench with exclude_special_tokens_from_reconstruction, positions holding a BOS, EOS or pad
token keep their clean activations in the SAE splice and are left out of every mean (for the CE
terms: the position whose token is the input of the prediction). Also reported, beyond SAEBench:
the same two scores against mean ablation (every position replaced by the mean clean activation
at the hook over the evaluated non-special positions), `*_mean_ablation`.

Tokens: the harvester's token windows of --tokens (default: cfg.json metadata.dataset_path), a
harvested directory (manifest.json shards[].tokens_file, else tokens/windows_*.npy; layout in
scripts/saetrain_hooks.py) or one (windows, context) int .npy file; at most --max-tokens positions.
With --held-out (what `sae eval RUN --model` passes for a run trained on those windows' shards),
only the windows whose activation rows all lie in the run's held-out split: text the SAE was not
trained on (runs since 2026-12-07 hold out whole windows). When no window does (an older run's
blocks of 256 held-out rows hold no window longer than 257 tokens; a run that held out nothing),
every window is used and the result says so
(`windows_from`: "held_out", "all" = in-sample, or "given" without --held-out).

Hook: --hook NAME, else --layer L (= blocks.L.hook_resid_pre, harvest.py's default), else
cfg.json metadata.hook_name, which `sae train` copies from the shards' manifest: the SAE is
spliced where it was harvested. Model: --model, else metadata.model_name (an id, a directory or
a .gguf file).

--replay-acts: instead of an SAE, splice the harvested activations themselves back in (position
0, whose activation the harvester does not store, keeps its clean value). H_sae must then equal
H_clean: a check that harvest and splice use the same hook point, tokens and model (exact for
float32 shards up to float rounding, ~1e-6).

The SAE is read from a run directory or an exported checkpoint: SAELens layout (`cfg.json` +
`sae_weights.safetensors`, normalisation already folded in) or sparsify layout (`cfg.json` +
`sae.safetensors`). It runs in float32.

Writes ce_eval.json (default: into the SAE directory, where `sae eval` picks it up).
Needs torch, transformers, safetensors and numpy (gguf + accelerate for .gguf models); prints
"skipped" and exits 0 without torch.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import saetrain_hooks as hooks  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", help="run directory or SAE checkpoint directory")
    p.add_argument("--replay-acts", action="store_true",
                   help="splice the harvested activations of --tokens back instead of an SAE (identity check)")
    p.add_argument("--tokens", help="harvested directory or windows .npy (default: cfg metadata.dataset_path)")
    p.add_argument("--model", help="Hugging Face id, local directory or .gguf file (default: cfg metadata.model_name)")
    p.add_argument("--hook", help="blocks.L.hook_resid_pre | blocks.L.hook_resid_post | layers.L (default: cfg)")
    p.add_argument("--layer", type=int, help=f"shorthand for --hook blocks.L.hook_{hooks.DEFAULT_KIND}")
    p.add_argument("--max-tokens", type=int, default=65536, help="stop after this many token positions")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--out", help="output file (default: SAE_DIR/ce_eval.json; with --replay-acts and no --sae: none)")
    p.add_argument("--held-out", metavar="FILE",
                   help="JSON {shards: [{file, rows, held_out: [[start, rows], ...]}]}: only the windows whose "
                        "activation rows all lie in those segments (a run's held-out split; `sae eval --model` "
                        "writes it); when none does, every window, marked in-sample")
    args = p.parse_args(argv)
    if not args.sae and not args.replay_acts:
        p.error("give --sae DIR (or --replay-acts)")
    return args


def load_sae(path, torch):
    """Return (encode_decode(x) -> x_hat, cfg dict, layout) for a checkpoint directory."""
    from safetensors.torch import load_file

    d = path if os.path.isdir(path) else os.path.dirname(path)
    with open(os.path.join(d, "cfg.json")) as f:
        cfg = json.load(f)
    if os.path.exists(os.path.join(d, "sae_weights.safetensors")):
        t = {k: v.float() for k, v in load_file(os.path.join(d, "sae_weights.safetensors")).items()}
        w_enc = t["W_enc"].T.contiguous()  # [d_sae, d_in]
        b_enc, w_dec, b_dec = t["b_enc"], t["W_dec"], t["b_dec"]
        arch = cfg.get("architecture", "standard")
        threshold = t.get("threshold")
        k = cfg.get("k")
        if not cfg.get("apply_b_dec_to_input", True):
            b_enc = b_enc + w_enc @ b_dec
        if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
            n = w_dec.norm(dim=-1)
            w_dec = w_dec / n[:, None]
            w_enc = w_enc * n[:, None]
            b_enc = b_enc * n
        norm = cfg.get("normalize_activations", "none")
        if norm not in ("none", "expected_average_only_in", "layer_norm"):
            raise SystemExit(f"{d}: normalize_activations {norm!r} is not supported")
        if norm == "layer_norm":
            # SAELens: (x - mean) / (std + 1e-5), unbiased std; saetrain's per-token exports are
            # their training rule exactly, i.e. eps 0 (export/saelens.rs).
            ln_eps = 0.0 if "per_token_normalize" in (cfg.get("saetrain") or {}) else 1e-5
        layout = "saelens"
    elif os.path.exists(os.path.join(d, "sae.safetensors")):
        t = {k: v.float() for k, v in load_file(os.path.join(d, "sae.safetensors")).items()}
        w_enc, b_enc, w_dec, b_dec = t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"]
        arch, threshold, k = "topk", None, cfg["k"]
        norm = "none"
        layout = "sparsify"
    else:
        raise SystemExit(f"{d}: no sae_weights.safetensors or sae.safetensors")
    if arch not in ("standard", "topk", "batchtopk", "jumprelu"):
        raise SystemExit(f"{d}: unknown architecture {arch!r}")
    if arch == "jumprelu" and threshold is None:
        raise SystemExit(f"{d}: jumprelu SAE without a threshold tensor")
    k = int(k) if k is not None else None

    def encode_decode(x):
        dev = x.device
        we, be, wd, bd = (v.to(dev) for v in (w_enc, b_enc, w_dec, b_dec))
        xf = x.float()
        if norm == "layer_norm":
            mu = xf.mean(dim=-1, keepdim=True)
            std = (xf - mu).std(dim=-1, keepdim=True)
            den = std + ln_eps
            xf = torch.where(den > 0, (xf - mu) / den.clamp_min(1e-30), torch.zeros_like(xf))
        pre = (xf - bd) @ we.T + be
        act = torch.relu(pre)
        if arch == "jumprelu" or (arch == "batchtopk" and threshold is not None):
            act = act * (pre > threshold.to(dev))
        elif arch == "topk":
            vals, idx = act.topk(k, dim=-1)
            act = torch.zeros_like(act).scatter_(-1, idx, vals)
        elif arch == "batchtopk":
            flat = act.flatten()
            vals, idx = flat.topk(min(k * act.shape[0], flat.numel()))
            act = torch.zeros_like(flat).scatter_(0, idx, vals).view_as(act)
        out = act @ wd + bd
        if norm == "layer_norm":
            out = out * std + mu
        return out.to(x.dtype)

    return encode_decode, cfg, layout


def load_acts(path, np, torch):
    """An activation shard as a float32 tensor (bfloat16 `<V2` shards widened)."""
    a = np.load(path, mmap_mode="r")
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(a, dtype=np.float32))


def held_out_windows(held_out, shards, np):
    """Per shard, the indices of the windows whose activation rows (ctx - 1 a window, the BOS
    position not stored) all lie in the held-out segments of `held_out` (the JSON of --held-out),
    or None when `held_out` is None. Raises when a shard's rows do not match its windows."""
    if held_out is None:
        return None
    segs = {os.path.realpath(s["file"]): s for s in held_out.get("shards", [])}
    picked = []
    for acts_path, tok_path in shards:
        s = segs.get(os.path.realpath(acts_path)) if acts_path else None
        if s is None:
            picked.append([])
            continue
        n, ctx = np.load(tok_path, mmap_mode="r").shape
        per = ctx - 1
        if s["rows"] != n * per:
            raise SystemExit(f"{acts_path}: {s['rows']} rows but {tok_path} has {n} windows of {per}: "
                             "cannot tell which windows are held out")
        idx = []
        for start, rows in s["held_out"]:
            idx.extend(range(-(-start // per), (start + rows) // per))
        picked.append(idx)
    return picked


def load_windows(tokens, max_tokens, replay, np, torch, held_out=None):
    """(windows [n, ctx] int64, stored activations [n, ctx-1, d] or None, files used, whether the
    windows are the held-out ones: None without --held-out)."""
    shards = hooks.harvested_shards(tokens)
    picked = held_out_windows(held_out, shards, np)
    from_held_out = picked is not None and any(picked)
    if picked is not None and not from_held_out:
        print("note: no token window lies wholly in the run's held-out rows (a run from before 2026-12-07 "
              "holds out blocks of 256 rows; or none held out): evaluating on every window, text the SAE was "
              "trained on (in-sample)", file=sys.stderr)
    wins, acts, used, total = [], [], [], 0
    for i, (acts_path, tok_path) in enumerate(shards):
        w = np.load(tok_path, mmap_mode="r")
        if w.ndim != 2:
            raise SystemExit(f"{tok_path}: expected (windows, context), found shape {w.shape}")
        idx = np.asarray(picked[i] if from_held_out else range(w.shape[0]), dtype=np.int64)
        if len(idx) == 0:
            continue
        take = min(len(idx), -(-(max_tokens - total) // w.shape[1]))
        idx = idx[:take]
        wins.append(torch.from_numpy(np.asarray(w[idx], dtype=np.int64)))
        used.append(tok_path)
        if replay:
            if acts_path is None:
                raise SystemExit(f"--replay-acts: {tokens} has no manifest.json naming the activation shards")
            x = load_acts(acts_path, np, torch)
            per = w.shape[1] - 1
            if x.shape[0] != w.shape[0] * per:
                raise SystemExit(f"{acts_path}: {x.shape[0]} rows but {tok_path} has {w.shape[0]} windows of {per}")
            acts.append(x.reshape(w.shape[0], per, -1)[torch.from_numpy(idx)])
        total += take * w.shape[1]
        if total >= max_tokens:
            break
    return torch.cat(wins), (torch.cat(acts) if replay else None), used, (from_held_out if picked is not None else None)


def main(argv=None):
    args = parse_args(argv)
    try:
        import numpy as np
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"skipped: {e.name} is not installed (needs torch, transformers, safetensors, numpy)")
        return 0

    if args.sae:
        encode_decode, cfg, layout = load_sae(args.sae, torch)
    else:
        encode_decode, cfg, layout = None, {}, "replay"
    md = cfg.get("metadata") or {}
    tokens = args.tokens or md.get("dataset_path")
    if not tokens or tokens == "synthetic" or not os.path.exists(tokens):
        raise SystemExit(f"no token windows: give --tokens DIR (cfg.json metadata.dataset_path is {tokens!r})")
    man = hooks.read_manifest(tokens) if os.path.isdir(tokens) else {}
    model_name = args.model or md.get("model_name") or man.get("model")
    if not model_name or model_name == "synthetic":
        raise SystemExit("no model: give --model (cfg.json metadata.model_name is empty)")
    if args.hook:
        hook = args.hook
    elif args.layer is not None:
        hook = hooks.hook_name(args.layer, hooks.DEFAULT_KIND)
    else:
        hook = md.get("hook_name") or man.get("hook")
    if not hook:
        raise SystemExit("no hook: give --hook or --layer (cfg.json metadata.hook_name is empty)")
    hooks.parse_hook(hook)
    harvested = man.get("hook")
    if harvested and hooks.parse_hook(harvested) != hooks.parse_hook(hook):
        print(f"warning: splicing at {hook} but {tokens} was harvested at {harvested}", file=sys.stderr)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = hooks.load_model(model_name, getattr(torch, args.dtype), device)
    tok = hooks.load_tokenizer(model_name)
    special = sorted({t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None})
    held_out = None
    if args.held_out:
        with open(args.held_out) as f:
            held_out = json.load(f)
    windows, stored, files, from_held_out = load_windows(
        tokens, args.max_tokens, args.replay_acts, np, torch, held_out)

    state = {"mode": None}

    class Captured(Exception):
        pass

    def patch(h):
        mode = state["mode"]
        if mode == "capture":
            state["h"] = h
            raise Captured
        if mode == "sae":
            flat = h.reshape(-1, h.shape[-1])
            rec = encode_decode(flat).reshape(h.shape)
            return torch.where(state["keep"][..., None], rec, h)
        if mode == "replay":
            out = h.clone()
            out[:, 1:] = state["stored"].to(h.dtype)
            return out
        if mode == "zero":
            return torch.zeros_like(h)
        if mode == "mean":
            return state["mean"].to(h.dtype).expand_as(h).clone()
        return h

    handle = hooks.attach(model, hook, patch)
    batches = [(i, min(i + args.batch_size, len(windows))) for i in range(0, len(windows), args.batch_size)]

    def keep_mask(ids):
        keep = torch.ones_like(ids, dtype=torch.bool)
        for t in special:
            keep &= ids != t
        return keep

    with torch.no_grad():
        # Pass 1: the mean clean activation at the hook over non-special positions.
        acc, count = None, 0
        state["mode"] = "capture"
        for a, b in batches:
            ids = windows[a:b].to(device)
            try:
                model(ids)
            except Captured:
                pass
            h, keep = state.pop("h").float(), keep_mask(ids)
            s_ = h[keep].sum(0)
            acc = s_ if acc is None else acc + s_
            count += int(keep.sum())
        if count == 0:
            raise SystemExit("no token positions left after excluding special tokens")
        state["mean"] = acc / count

        modes = ["sae" if encode_decode else "replay", "zero", "mean"]
        sums = {k: 0.0 for k in ["ce_clean"] + [f"ce_{m}" for m in modes] + [f"kl_{m}" for m in modes]}
        n_ce = n_kl = 0
        for a, b in batches:
            ids = windows[a:b].to(device)
            keep = keep_mask(ids)
            state["keep"] = keep
            if stored is not None:
                state["stored"] = stored[a:b].to(device)
            target, ce_mask = ids[:, 1:], keep[:, :-1]

            def ce_and_logp(mode):
                state["mode"] = mode
                logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
                nll = -logp[:, :-1].gather(-1, target[..., None]).squeeze(-1)
                return nll[ce_mask].sum().item(), logp

            ce, logp_clean = ce_and_logp(None)
            sums["ce_clean"] += ce
            p_clean = logp_clean.exp()
            for mode in modes:
                ce, logp = ce_and_logp(mode)
                sums[f"ce_{mode}"] += ce
                kl = (p_clean * (logp_clean - logp)).sum(-1)
                sums[f"kl_{mode}"] += kl[keep].sum().item()
                del logp
            state["mode"] = None
            n_ce += int(ce_mask.sum())
            n_kl += int(keep.sum())
    handle.remove()

    ce = {m: sums[f"ce_{m}"] / n_ce for m in ["clean"] + modes}
    kl = {m: sums[f"kl_{m}"] / n_kl for m in modes}
    spliced = modes[0]

    def score(h_abl, h, h0):
        return (h_abl - h) / (h_abl - h0) if h_abl != h0 else None

    result = {
        "ce_loss_score": score(ce["zero"], ce[spliced], ce["clean"]),
        "kl_div_score": (kl["zero"] - kl[spliced]) / kl["zero"] if kl["zero"] > 0 else None,
        "ce_loss_without_sae": ce["clean"],
        "ce_loss_with_sae": ce[spliced],
        "ce_loss_with_ablation": ce["zero"],
        "kl_div_with_sae": kl[spliced],
        "kl_div_with_ablation": kl["zero"],
        "ce_loss_score_mean_ablation": score(ce["mean"], ce[spliced], ce["clean"]),
        "kl_div_score_mean_ablation": (kl["mean"] - kl[spliced]) / kl["mean"] if kl["mean"] > 0 else None,
        "ce_loss_with_mean_ablation": ce["mean"],
        "kl_div_with_mean_ablation": kl["mean"],
        "tokens_ce": n_ce,
        "tokens_kl": n_kl,
        "sequences": len(windows),
        "context_size": int(windows.shape[1]),
        "model": model_name,
        "hook": hook,
        "sae": os.path.abspath(args.sae) if args.sae else None,
        "sae_layout": layout,
        "tokens": os.path.abspath(tokens),
        "token_files": len(files),
        # "held_out": only windows of the run's held-out rows; "all": every window (with
        # --held-out: none was held out whole, so in-sample); "given": no --held-out.
        "windows_from": {True: "held_out", False: "all", None: "given"}[from_held_out],
        "excluded_token_ids": special,
        "dtype": args.dtype,
        "definitions": "SAEBench core: ce_loss_score = (H_zero - H_sae) / (H_zero - H_clean), kl_div_score = "
        "(KL_zero - KL_sae) / KL_zero, KL(p_clean || p_patched) per position; *_mean_ablation: the same "
        "against mean ablation (docs/eval.md)",
    }
    out = args.out
    if out is None and args.sae:
        out = os.path.join(args.sae if os.path.isdir(args.sae) else os.path.dirname(args.sae), "ce_eval.json")
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, out)
    what = "replayed activations" if args.replay_acts else "SAE"
    print(
        f"{hook}: CE clean {ce['clean']:.6f}, with {what} {ce[spliced]:.6f}, zero-ablated {ce['zero']:.6f}, "
        f"mean-ablated {ce['mean']:.6f}; CE loss score {result['ce_loss_score']}, KL score {result['kl_div_score']} "
        f"over {n_ce} tokens" + (f" -> {out}" if out else "")
    )
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
