#!/usr/bin/env python3
"""The checkpoints we write, loaded by the libraries our users load them with.

    SAE_BIN=target/release/sae CE_PY scripts/test_interop.py --saetrain-python PY [--keep DIR]

CE_PY: a python with torch, sae-lens, eai-sparsify and dictionary-learning
(`scripts/install-ce-deps.sh` pins them);
PY: a python with the `saetrain` package (`pip install ./python`; CI's target/py-ci-venv).

Trains a small SAE with every sparsifier (and topk with each input normalisation, wta with Zipf
budgets, aligned topk) on the built-in synthetic data, exports each with `sae export --format
saelens`, `--format dictionary-learning` (and `--format sparsify` where that layout holds it),
then loads each file with `sae_lens.SAE.load_from_disk` / `sparsify.Sae.load_from_disk` /
`dictionary_learning.utils.load_dictionary` and checks that their codes and reconstructions are
saetrain's own (`saetrain.load(dir).encode / reconstruct`; dictionary_learning's codes times each
latent's decoder row norm, its layout's unit-norm convention), on synthetic rows with a row of 300x the usual norm and a zero row added. Also that SAELens loads a run directory
as it stands and a checkpoint kept during training (`--keep-checkpoints`), and that it reads the
metadata (`hook_name` ...) saetrain wrote. And the other way: SAEs that SAELens (`save_model`:
topk, topk with rescale_acts_by_decoder_norm, jumprelu, standard with apply_b_dec_to_input false),
sparsify (`save_to_disk`) and dictionary_learning (`torch.save` of a state dict, as its trainers
save: AutoEncoderTopK, also in float16, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder,
AutoEncoder) wrote, with random weights, read by `saetrain.load`, give their libraries' codes (as
`load_dictionary` loads them: AutoEncoder's decoder normalised).

Codes must agree on their support except at near-ties (at most 1 entry in 2,000: two libraries'
GEMMs sum in different orders, so a value within a rounding of the k-th largest or of a threshold
may fall either side) and in value to 1e-4 relative (of 1% of the row's largest code, for the
smaller entries); reconstructions to 1e-4 of each row's norm.

One known difference, checked rather than hidden: hybrid's per-token cap (`per_token_cap` in
cfg.json) is not expressible in SAELens's jumprelu, which ignores it. SAELens's codes must equal
saetrain's without the cap, and the script prints how much the cap changes (the share of tokens
it cuts).

Prints one line per check and "N passed, 0 failed"; exit status 1 on any failure.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np

CASES = {  # name: extra `sae train` flags
    "topk": ["--sparsifier", "topk"],
    "topk_global": ["--sparsifier", "topk", "--normalize", "global"],
    "topk_per_token": ["--sparsifier", "topk", "--normalize", "per-token"],
    "topk_aligned": ["--sparsifier", "topk", "--aligned"],
    "batchtopk": ["--sparsifier", "batchtopk", "--keep-checkpoints", "100"],
    "mutual_choice": ["--sparsifier", "mutual_choice"],
    "wta": ["--sparsifier", "wta"],
    "wta_zipf": ["--sparsifier", "wta", "--budget", "zipf"],
    "hybrid": ["--sparsifier", "hybrid"],
    "relu": ["--sparsifier", "relu"],
}
SPARSIFY = {  # export name: (run, extra `sae export` flags)
    "topk": ("topk", []),
    "topk_global": ("topk_global", []),
    "batchtopk_as_topk": ("batchtopk", ["--k", "8"]),
}
SAELENS_CLASS = {"topk": "TopKSAE", "relu": "StandardSAE"}  # the rest: JumpReLUSAE
DL_CLASS = {"topk": "AutoEncoderTopK", "relu": "AutoEncoder"}  # the rest: JumpReluAutoEncoder
DL_REFUSED = {"topk_per_token": "--format saelens (layer_norm)"}  # no run-time normalisation there
MAX_TIE_SHARE = 1 / 2000

SAETRAIN_SIDE = r"""
import json, sys, numpy as np, saetrain
x = np.load(sys.argv[1]); out = {}
for d in json.loads(sys.argv[3]):
    r = saetrain.load(d)
    out[d + ":codes"] = r.encode(x).toarray()
    out[d + ":xhat"] = r.reconstruct(x)
np.savez(sys.argv[2], **out)
"""


def write_foreign(root, d):
    """SAEs written by SAELens (`save_model`) and sparsify (`save_to_disk`) with random weights:
    decoder rows of unequal norms, a non-zero b_dec, positive thresholds, and the options our
    loader folds into the weights (`rescale_acts_by_decoder_norm`, `apply_b_dec_to_input: false`).
    Returns {directory: (kind, the module)}."""
    import torch
    from sae_lens import (JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE,
                          TopKSAEConfig)
    from sparsify import Sae as SparsifySae, SaeConfig
    from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.utils import load_dictionary

    torch.manual_seed(0)
    f = 384
    made = {
        "saelens_topk": TopKSAE(TopKSAEConfig(d_in=d, d_sae=f, k=8)),
        "saelens_topk_rescaled": TopKSAE(TopKSAEConfig(d_in=d, d_sae=f, k=8, rescale_acts_by_decoder_norm=True)),
        "saelens_jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=f)),
        "saelens_standard_no_b_dec_in": StandardSAE(StandardSAEConfig(d_in=d, d_sae=f, apply_b_dec_to_input=False)),
        "sparsify_topk": SparsifySae(d, SaeConfig(num_latents=f, k=8)),
        "dl_topk": AutoEncoderTopK(d, f, 8),
        "dl_topk_f16": AutoEncoderTopK(d, f, 8),
        "dl_batchtopk": BatchTopKSAE(d, f, 8),
        "dl_matryoshka": MatryoshkaBatchTopKSAE(d, f, 8, [f // 4, f - f // 4]),
        "dl_jumprelu": JumpReluAutoEncoder(d, f),
        "dl_standard": AutoEncoder(d, f),
    }
    out = {}
    for name, m in made.items():
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if pname == "W_dec":
                    p.copy_(torch.randn_like(p) * torch.rand(p.shape[0], 1) / d**0.5)
                elif pname == "decoder.weight":  # nn.Linear(F, d): latents are columns
                    p.copy_(torch.randn_like(p) * torch.rand(1, p.shape[1]) / d**0.5)
                elif pname in ("W_enc", "encoder.weight"):
                    p.copy_(torch.randn_like(p) / d**0.5)
                elif pname == "threshold":
                    p.copy_(torch.rand_like(p) * 0.3)
                else:  # biases
                    p.copy_(torch.randn_like(p) * 0.1)
            if hasattr(m, "threshold") and m.threshold.dim() == 0:  # BatchTopK's, as training estimates it
                m.threshold.fill_(0.15)
        path = os.path.join(root, name)
        if name.startswith("sparsify"):
            m.save_to_disk(path)
            out[path] = ("sparsify", m)
        elif name.startswith("dl_"):
            # as dictionary_learning's trainers save: torch.save of the state dict, config.json
            os.makedirs(path)
            sd = {k: (v.half() if name.endswith("f16") and v.is_floating_point() else v) for k, v in m.state_dict().items()}
            torch.save(sd, os.path.join(path, "ae.pt"))
            json.dump({"trainer": {"dict_class": type(m).__name__, "k": 8, "activation_dim": d, "dict_size": f}},
                      open(os.path.join(path, "config.json"), "w"))
            out[path] = ("dictionary_learning", load_dictionary(path, "cpu")[0])  # as its users load it
        else:
            m.save_model(path)
            out[path] = ("saelens", m)
    return out


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--saetrain-python", required=True, help="a python that imports saetrain")
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    a = ap.parse_args()
    sae = os.environ.get("SAE_BIN", "target/release/sae")
    tmp = a.keep or tempfile.mkdtemp(prefix="sae-interop-")
    os.makedirs(tmp, exist_ok=True)
    try:
        return check_all(sae, a.saetrain_python, tmp)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def check_all(sae, st_py, tmp):
    warnings.filterwarnings("ignore")
    import torch
    from sae_lens import SAE, __version__ as sl_version
    import sparsify
    import sparsify.sparse_coder
    import sparsify.utils
    from sparsify import Sae as SparsifySae

    j = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    common = ["--k", "8", "--d-sae", "512", "--steps", "150", "--batch-size", "256", "--eval-tokens", "2048",
              "--quiet", "--backend", "cpu", "--overwrite"]
    for name, flags in CASES.items():
        run([sae, "train", "--out", j("runs", name), *common, *flags])
        run([sae, "export", j("runs", name), "--format", "saelens", "--out", j("saelens", name)])
    for name, (src, flags) in SPARSIFY.items():
        run([sae, "export", j("runs", src), "--format", "sparsify", "--out", j("sparsify", name), *flags])
    dl_refusals = {}
    for name in CASES:
        cmd = [sae, "export", j("runs", name), "--format", "dictionary-learning", "--out", j("dl", name)]
        if name in DL_REFUSED:
            p = subprocess.run(cmd, capture_output=True, text=True)
            dl_refusals[name] = (p.returncode, p.stderr.strip())
        else:
            run(cmd)
    # hybrid as SAELens runs it: the same file without the cap
    shutil.copytree(j("saelens", "hybrid"), j("saelens_hybrid_uncapped"))
    cfg_path = j("saelens_hybrid_uncapped", "cfg.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("per_token_cap")
    json.dump(cfg, open(cfg_path, "w"))

    run([sae, "data", "synth", "--out", j("data"), "--tokens", "3000"])
    x = np.load(j("data", "acts_00000.npy")).astype(np.float32)
    x[5] *= 300.0  # a row of huge norm, as real residual streams have
    x[7] = 0.0
    np.save(j("x.npy"), x)
    # a checkpoint kept during training (its thresholds are still the EMA's)
    kept = j("runs", "batchtopk", "checkpoints", "step_000100")
    foreign = write_foreign(j("foreign"), x.shape[1])
    dirs = ([j("saelens", n) for n in CASES] + [j("sparsify", n) for n in SPARSIFY]
            + [j("saelens_hybrid_uncapped"), kept] + list(foreign))
    run([st_py, "-c", SAETRAIN_SIDE, j("x.npy"), j("saetrain.npz"), json.dumps(dirs)])
    ref = np.load(j("saetrain.npz"))
    xt = torch.from_numpy(x)

    passed = failed = 0

    def check(name, ok, detail):
        nonlocal passed, failed
        print(("ok   " if ok else "FAIL ") + name + ": " + detail)
        passed += bool(ok)
        failed += not ok

    # SAELens's layer_norm divides by std + 1e-5 where saetrain's rule has no 1e-5 (docs/SPEC.md
    # "Normalisation"): a relative difference of 1e-5 sqrt(d - 1) / ||x - mean(x)|| per row.
    xc_norm = np.linalg.norm(x - x.mean(1, keepdims=True), axis=1)
    eps_gap = np.where(xc_norm > 0, 1e-5 * np.sqrt(x.shape[1] - 1) / np.maximum(xc_norm, 1e-30), 0.0)

    def agree(codes, xhat, want_codes, want_xhat, per_token=False):
        """Rows whose supports differ (near-ties) are bounded in number, the others compared."""
        tol = 1e-4 + (2 * eps_gap if per_token else np.zeros(len(x)))  # per row
        same = ((codes != 0) == (want_codes != 0)).all(1)
        ties = int(((codes != 0) != (want_codes != 0)).sum())
        kept = max(int((want_codes != 0).sum()), 1)
        # Relative to the entry, or for entries under 1% of their row's largest to 1% of that (a
        # bias folded in another order cancels differently near 0).
        row_max = np.abs(want_codes).max(1, keepdims=True)
        rel_v = np.abs(codes - want_codes) / (1e-6 + np.maximum(np.abs(want_codes), 1e-2 * row_max))
        rel_v = np.where(want_codes != 0, rel_v, 0.0)[same].max(1) / tol[same]
        norms = np.linalg.norm(want_xhat, axis=1) + 1e-6
        rel_x = (np.linalg.norm(xhat - want_xhat, axis=1) / norms)[same] / tol[same]
        ok = ties <= MAX_TIE_SHARE * kept and rel_v.max() <= 1 and rel_x.max() <= 1
        return ok, (f"{ties} of {kept} kept entries differ in support ({(~same).sum()} rows); elsewhere values "
                    f"and x_hat within {rel_v.max():.2f} and {rel_x.max():.2f} of the tolerance "
                    f"({'1e-4 + 2e-5 sqrt(d-1) / ||x - mean||' if per_token else '1e-4'} relative)")

    print(f"sae_lens {sl_version}, sparsify {getattr(sparsify, '__version__', '?')}, torch {torch.__version__}")
    for name in CASES:
        for where, d in (("export", j("saelens", name)), ("run directory", j("runs", name))):
            sl = SAE.load_from_disk(d)
            with torch.no_grad():
                codes = sl.encode(xt)
                xhat = sl.decode(codes).numpy()
                codes = codes.numpy()
            want = "saelens_hybrid_uncapped" if name == "hybrid" else os.path.join("saelens", name)
            ok, detail = agree(codes, xhat, ref[j(want) + ":codes"], ref[j(want) + ":xhat"], name.endswith("per_token"))
            cls = type(sl).__name__
            expect_cls = SAELENS_CLASS.get(name.split("_")[0], "JumpReLUSAE")
            check(f"saelens_{name}_{where.replace(' ', '_')}", ok and cls == expect_cls,
                  f"{cls} (expected {expect_cls}); {detail}" + (" (hybrid: against saetrain without the cap)"
                                                                 if name == "hybrid" else ""))

    sl = SAE.load_from_disk(kept)
    with torch.no_grad():
        codes = sl.encode(xt)
        xhat = sl.decode(codes).numpy()
    ok, detail = agree(codes.numpy(), xhat, ref[kept + ":codes"], ref[kept + ":xhat"])
    check("saelens_kept_checkpoint", ok and type(sl).__name__ == "JumpReLUSAE", f"{type(sl).__name__}; {detail}")

    capped, uncapped = ref[j("saelens", "hybrid") + ":codes"], ref[j("saelens_hybrid_uncapped") + ":codes"]
    cap = json.load(open(j("saelens", "hybrid", "cfg.json")))["per_token_cap"]
    over = (uncapped != 0).sum(1) > cap
    check("hybrid_cap_is_the_only_difference",
          np.array_equal(capped[~over], uncapped[~over]) and ((capped != 0).sum(1) <= cap).all(),
          f"per_token_cap {cap}: without it (as in SAELens) {over.mean():.1%} of tokens exceed it, "
          f"L0 {(uncapped != 0).sum(1).mean():.2f} against {(capped != 0).sum(1).mean():.2f} with it")

    # sparsify's decode goes through a Triton kernel whenever triton imports, and Triton has no
    # CPU driver: on a machine without a GPU use its eager path (sparsify's own fallback).
    sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode
    for name in SPARSIFY:
        d = j("sparsify", name)
        sp = SparsifySae.load_from_disk(d)
        with torch.no_grad():
            enc = sp.encode(xt)
            codes = torch.zeros(x.shape[0], sp.num_latents).scatter_(1, enc.top_indices, enc.top_acts).numpy()
            xhat = sp(xt).sae_out.numpy()
        ok, detail = agree(codes, xhat, ref[d + ":codes"], ref[d + ":xhat"])
        check(f"sparsify_{name}", ok, detail)

    # dictionary_learning (its own loader, `load_dictionary`): codes are saetrain's times each
    # latent's decoder row norm (one factor, the mean norm, for TopK and hybrid), as the export says. The
    # norms are those of the SAELens export's W_dec (saetrain's weights, any scale folded in).
    from safetensors.numpy import load_file
    from dictionary_learning.utils import load_dictionary

    def check_dl(name, dl_dir, saelens_dir, want, topk, expect_cls, note=""):
        ae, cfg = load_dictionary(dl_dir, "cpu")
        with torch.no_grad():
            c = ae.encode(xt)
            xhat, codes = ae.decode(c).numpy(), c.numpy()
        norms = np.linalg.norm(load_file(os.path.join(saelens_dir, "sae_weights.safetensors"))["W_dec"].astype(np.float64), axis=1)
        norms = np.where(norms > 0, norms, 1.0)
        factor = np.full_like(norms, norms.mean()) if topk else norms
        ok, detail = agree(codes, xhat, ref[want + ":codes"] * factor, ref[want + ":xhat"])
        cls = type(ae).__name__
        check(f"dictionary_learning_{name}", ok and cls == expect_cls and cfg["trainer"]["dict_class"] == cls,
              f"{cls} (expected {expect_cls}), decoder row factors {factor.min():.4g}-{factor.max():.4g}; {detail}{note}")

    for name in CASES:
        if name in DL_REFUSED:
            rc, err = dl_refusals[name]
            check(f"dictionary_learning_{name}_refused", rc != 0 and DL_REFUSED[name] in err, f"exit {rc}: {err[-160:]}")
            continue
        want = j("saelens_hybrid_uncapped") if name == "hybrid" else j("saelens", name)
        check_dl(name, j("dl", name), j("saelens", name), want, name.startswith("topk") or name == "hybrid",
                 DL_CLASS.get(name.split("_")[0], "JumpReluAutoEncoder"),
                 " (hybrid: against saetrain without the cap)" if name == "hybrid" else "")
    # SAELens files with decoder rows of unequal norm, converted: the factors differ per latent.
    for d, (kind, _) in foreign.items():
        if kind != "saelens":
            continue
        base = os.path.basename(d)
        run([sae, "export", d, "--format", "saelens", "--out", j("converted", base)])
        run([sae, "export", d, "--format", "dictionary-learning", "--out", j("dl_converted", base)])
        arch = base.split("_")[1]
        check_dl(f"converted_{base}", j("dl_converted", base), j("converted", base), d, arch == "topk",
                 DL_CLASS.get(arch.replace("standard", "relu"), "JumpReluAutoEncoder"))

    # The other direction: SAEs that SAELens and sparsify wrote, read by saetrain.
    for d, (kind, model) in foreign.items():
        with torch.no_grad():
            if kind == "sparsify":
                enc = model.encode(xt)
                codes = torch.zeros(x.shape[0], model.num_latents).scatter_(1, enc.top_indices, enc.top_acts).numpy()
                xhat = model(xt).sae_out.numpy()
            else:
                c = model.encode(xt)
                xhat, codes = model.decode(c).numpy(), c.numpy()
        # saetrain's values against theirs (the reverse of the checks above)
        ok, detail = agree(ref[d + ":codes"], ref[d + ":xhat"], codes, xhat)
        check(f"saetrain_reads_{os.path.basename(d)}", ok, detail)

    # What SAELens reads of the metadata (a synthetic run has no model or hook: null).
    md = SAE.load_from_disk(j("runs", "topk")).cfg.metadata
    check("saelens_reads_the_metadata", getattr(md, "hook_name", "missing") is None
          and getattr(md, "dataset_path", None) == "synthetic",
          f"hook_name {getattr(md, 'hook_name', 'missing')!r}, dataset_path {getattr(md, 'dataset_path', None)!r}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
