#!/usr/bin/env python3
"""Language-model scores of an SAE: splice its reconstruction into a causal LM at the hooked
layer and compare next-token losses (SAEBench "core" reconstruction metrics).

    CE loss score = (H_0 - H*) / (H_0 - H_orig)
    KL score      = 1 - KL_sae / KL_zero

H_orig: cross-entropy of the unmodified model; H*: with the activations at the hook replaced by
the SAE's reconstruction; H_0: with them zero-ablated. KL_sae / KL_zero: mean per-token
KL(p_orig || p_patched) for the SAE splice / the zero ablation. As in SAEBench (with
exclude_special_tokens_from_reconstruction), positions holding a BOS, EOS or pad token keep their
original activations in the SAE splice and are left out of every mean (for the CE terms, the
position whose token is the input of the prediction).

Token ids come from the harvester's shards: every `tokens.npy` under --tokens (a directory),
sorted by path; each is [sequences, context] or flat (then cut into --context long rows).

The SAE is read from a run directory or an exported checkpoint: SAELens layout (`cfg.json` +
`sae_weights.safetensors`, normalisation already folded in) or sparsify layout (`cfg.json` +
`sae.safetensors`). Model and hook default to cfg.json's `metadata.model_name` /
`metadata.hook_name` (`blocks.L.hook_resid_post`, `blocks.L.hook_resid_pre`, or sparsify's
`layers.L`).

Writes ce_eval.json (default: into the SAE directory, where `sae eval` picks it up).
Needs torch, transformers, safetensors and numpy; prints "skipped" and exits 0 without torch.
"""

import argparse
import glob
import json
import os
import re
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="run directory or SAE checkpoint directory")
    p.add_argument("--tokens", required=True, help="harvester shards directory (tokens.npy per shard)")
    p.add_argument("--model", help="Hugging Face model id or local path (default: cfg metadata.model_name)")
    p.add_argument("--hook", help="blocks.L.hook_resid_post | blocks.L.hook_resid_pre | layers.L (default: cfg)")
    p.add_argument("--layer", type=int, help="shorthand for --hook blocks.L.hook_resid_post")
    p.add_argument("--context", type=int, default=128, help="row length when tokens.npy is flat")
    p.add_argument("--max-tokens", type=int, default=65536, help="stop after this many token positions")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--out", help="output file (default: SAE_DIR/ce_eval.json)")
    return p.parse_args(argv)


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


def token_rows(tokens_dir, context, max_tokens, np):
    files = sorted(glob.glob(os.path.join(tokens_dir, "**", "tokens.npy"), recursive=True))
    if not files:
        raise SystemExit(f"{tokens_dir}: no tokens.npy found")
    rows, total = [], 0
    for f in files:
        a = np.load(f, mmap_mode="r")
        if a.ndim == 1:
            n = (a.shape[0] // context) * context
            a = a[:n].reshape(-1, context)
        elif a.ndim != 2:
            raise SystemExit(f"{f}: expected a 1-D or 2-D array, found shape {a.shape}")
        for r in a:
            rows.append(np.asarray(r, dtype=np.int64))
            total += r.shape[0]
            if total >= max_tokens:
                return rows, files
    return rows, files


def find_blocks(model, torch):
    """The model's list of transformer blocks (the ModuleList with num_hidden_layers entries)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    best = None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and (n is None or len(m) == n):
            if best is None or name.count(".") < best[0].count("."):
                best = (name, m)
    if best is None:
        raise SystemExit("cannot find the model's transformer blocks")
    return best[1]


def parse_hook(hook):
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook or "")
    if m:
        return int(m.group(1)), m.group(2)
    m = re.fullmatch(r"(?:model\.)?(?:layers|h|transformer\.h|gpt_neox\.layers)\.(\d+)", hook or "")
    if m:
        return int(m.group(1)), "post"
    raise SystemExit(f"unsupported hook {hook!r}: use blocks.L.hook_resid_post, blocks.L.hook_resid_pre or layers.L")


def main(argv=None):
    args = parse_args(argv)
    try:
        import numpy as np
        import torch
        import transformers
    except ImportError as e:
        print(f"skipped: {e.name} is not installed (needs torch, transformers, safetensors, numpy)")
        return 0

    encode_decode, cfg, layout = load_sae(args.sae, torch)
    md = cfg.get("metadata") or {}
    model_name = args.model or md.get("model_name")
    if not model_name:
        raise SystemExit("no model: give --model (cfg.json metadata.model_name is empty)")
    hook = f"blocks.{args.layer}.hook_resid_post" if args.layer is not None else (args.hook or md.get("hook_name"))
    if not hook:
        raise SystemExit("no hook: give --layer or --hook (cfg.json metadata.hook_name is empty)")
    layer, where = parse_hook(hook)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    tok = transformers.AutoTokenizer.from_pretrained(model_name)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_name, torch_dtype=dtype).to(device).eval()
    blocks = find_blocks(model, torch)
    if layer >= len(blocks):
        raise SystemExit(f"hook {hook}: the model has {len(blocks)} blocks")
    special = sorted({t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None})

    state = {"mode": None, "mask": None}

    def patch(h):
        if state["mode"] == "sae":
            flat = h.reshape(-1, h.shape[-1])
            rec = encode_decode(flat).reshape(h.shape)
            return torch.where(state["mask"][..., None], rec, h)
        if state["mode"] == "zero":
            return torch.zeros_like(h)
        return h

    def post_hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (patch(output[0]),) + tuple(output[1:])
        return patch(output)

    def pre_hook(_module, args_, kwargs):
        if args_:
            return (patch(args_[0]),) + tuple(args_[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = patch(kwargs["hidden_states"])
        return args_, kwargs

    if where == "post":
        handle = blocks[layer].register_forward_hook(post_hook)
    else:
        handle = blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)

    rows, files = token_rows(args.tokens, args.context, args.max_tokens, np)
    sums = {k: 0.0 for k in ("ce_orig", "ce_sae", "ce_zero", "kl_sae", "kl_zero")}
    n_ce = n_kl = 0
    with torch.no_grad():
        for i in range(0, len(rows), args.batch_size):
            chunk = rows[i : i + args.batch_size]
            width = min(len(r) for r in chunk)
            ids = torch.tensor(np.stack([r[:width] for r in chunk]), device=device)
            keep = torch.ones_like(ids, dtype=torch.bool)
            for t in special:
                keep &= ids != t
            state["mask"] = keep
            logp = {}
            for mode in ("orig", "sae", "zero"):
                state["mode"] = None if mode == "orig" else mode
                logits = model(ids).logits.float()
                logp[mode] = torch.log_softmax(logits, dim=-1)
            state["mode"] = None
            target = ids[:, 1:]
            ce_mask = keep[:, :-1]
            for mode in ("orig", "sae", "zero"):
                nll = -logp[mode][:, :-1].gather(-1, target[..., None]).squeeze(-1)
                sums[f"ce_{mode}"] += nll[ce_mask].sum().item()
            p = logp["orig"].exp()
            for mode in ("sae", "zero"):
                kl = (p * (logp["orig"] - logp[mode])).sum(-1)
                sums[f"kl_{mode}"] += kl[keep].sum().item()
            n_ce += int(ce_mask.sum().item())
            n_kl += int(keep.sum().item())
    handle.remove()
    if n_ce == 0:
        raise SystemExit("no token positions left after excluding special tokens")

    h_orig, h_sae, h_zero = (sums[k] / n_ce for k in ("ce_orig", "ce_sae", "ce_zero"))
    kl_sae, kl_zero = sums["kl_sae"] / n_kl, sums["kl_zero"] / n_kl
    result = {
        "ce_loss_score": (h_zero - h_sae) / (h_zero - h_orig) if h_zero != h_orig else None,
        "kl_div_score": 1.0 - kl_sae / kl_zero if kl_zero > 0 else None,
        "ce_loss_without_sae": h_orig,
        "ce_loss_with_sae": h_sae,
        "ce_loss_with_ablation": h_zero,
        "kl_div_with_sae": kl_sae,
        "kl_div_with_ablation": kl_zero,
        "tokens_ce": n_ce,
        "tokens_kl": n_kl,
        "sequences": len(rows),
        "model": model_name,
        "hook": hook,
        "sae": os.path.abspath(args.sae),
        "sae_layout": layout,
        "token_files": len(files),
        "excluded_token_ids": special,
        "dtype": args.dtype,
    }
    out = args.out or os.path.join(args.sae if os.path.isdir(args.sae) else os.path.dirname(args.sae), "ce_eval.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    print(f"CE loss score {result['ce_loss_score']}, KL score {result['kl_div_score']} over {n_ce} tokens -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
