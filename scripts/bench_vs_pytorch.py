#!/usr/bin/env python3
"""saetrain's training step next to what a user would run instead, at the same shapes and thread
count: SAELens's TopK / BatchTopK training SAEs and a plain hand-sparse PyTorch TopK step.

    python3 scripts/bench_vs_pytorch.py [--d-in 576 --d-sae 4608 --batch 4096 --k 32]
                                        [--threads N] [--steps 5] [--device cpu|cuda]

The saetrain row comes from `sae bench step --json` (the binary is run and its JSON parsed; build
it with `cargo build --release`, or pass --sae PATH). The PyTorch rows run only where `torch`
imports, the SAELens rows only where `sae_lens` also imports; otherwise they are skipped with a
message. Not part of CI (torch is a large download).

What each row times, per step, after one warm-up step (best-effort like-for-like):
  * saetrain: `sae bench step` (whole step: encode, select, decode, backward, Adam, decoder
    renormalisation, aux loss when latents are dead).
  * hand-sparse PyTorch: relu(addmm) encoder, topk (per row, or over the batch for batchtopk),
    decode by gathering the kept decoder rows (`embedding_bag` with per-sample weights, no dense
    B x F product), MSE, autograd backward (dense through the encoder), Adam, decoder rows
    renormalised. No aux loss.
  * SAELens: `TopKTrainingSAE` / `BatchTopKTrainingSAE.training_forward_pass`, backward, Adam;
    no dead latents (so no aux loss), as in the first steps of training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--sparsifiers", default="topk,batchtopk", help="comma-separated: topk, batchtopk")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: saetrain --backend cpu and torch on the CPU; cuda: both on the GPU")
    p.add_argument("--sae", default=str(ROOT / "target" / "release" / "sae"), help="the sae binary")
    p.add_argument("--json", help="also write the table as JSON here (a new file, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    a = p.parse_args()
    # Refused before minutes of timing, not after; the file is written whole (temporary, rename).
    if a.json and os.path.lexists(a.json) and not a.overwrite:
        p.error(f"--json {a.json}: the file exists; add --overwrite to replace it")
    a.sparsifiers = [s.strip() for s in a.sparsifiers.split(",") if s.strip()]
    for s in a.sparsifiers:
        if s not in ("topk", "batchtopk"):
            p.error(f"--sparsifiers: {s!r} (only topk and batchtopk have counterparts in SAELens)")
    return a


# ---- saetrain: run the binary, parse its JSON


def saetrain_rows(a: argparse.Namespace) -> tuple[list[dict], dict]:
    sae = Path(a.sae)
    if not sae.exists():
        sys.exit(f"bench_vs_pytorch: {sae} not found: build it with `cargo build --release` or pass --sae PATH")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        cmd = [str(sae), "bench", "step", "--backend", a.device, "--d-in", str(a.d_in), "--d-sae", str(a.d_sae),
               "--batch", str(a.batch), "--k", str(a.k), "--steps", str(a.steps), "--threads", str(a.threads),
               "--sparsifier", ",".join(a.sparsifiers), "--json", str(out)]
        print("$ " + " ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"bench_vs_pytorch: sae bench step failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        report = json.loads(out.read_text())
    rows = []
    for row in report["rows"]:
        if row["sparsifier"] not in a.sparsifiers:
            continue
        # On CUDA there is one row per encoder (the ratios use the fastest per sparsifier).
        impl = "saetrain" + (f" ({row['encoder']})" if "encoder" in row else "")
        rows.append({"impl": impl, "sparsifier": row["sparsifier"], "step_ms": row["step_ms"],
                     "tokens_per_s": row["tokens_per_s"]})
    return rows, report


# ---- PyTorch


def torch_or_none():
    try:
        import torch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return None, f"{type(e).__name__}: {e}"
    return torch, None


def time_steps(torch, device: str, step, batches) -> float:
    """Seconds per step over batches[1:] after a warm-up step on batches[0]."""
    step(batches[0])
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for x in batches[1:]:
        step(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / (len(batches) - 1)


def hand_sparse_step(torch, sparsifier: str, d_in: int, d_sae: int, batch: int, k: int, device: str):
    """A plain PyTorch TopK / BatchTopK training step with a sparse (gathering) decoder."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w_dec = w_dec.to(device).requires_grad_()
    w_enc = w_dec.detach().clone().requires_grad_()  # tied init, [d_sae, d_in] like saetrain
    b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
    b_dec = torch.zeros(d_in, device=device, requires_grad=True)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-4)

    def step(x):
        pre = torch.relu(torch.addmm(b_enc, x - b_dec, w_enc.t()))
        if sparsifier == "topk":
            vals, idx = pre.topk(k, dim=1, sorted=False)
            x_hat = F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum") + b_dec
        else:  # batchtopk: the batch's k * B largest, handed to their rows
            vals, flat = pre.flatten().topk(k * batch, sorted=False)
            rows = torch.div(flat, d_sae, rounding_mode="floor")
            order = rows.argsort()
            rows, cols, vals = rows[order], (flat % d_sae)[order], vals[order]
            counts = torch.bincount(rows, minlength=batch)
            offsets = torch.cumsum(counts, 0) - counts
            x_hat = F.embedding_bag(cols, w_dec, offsets, per_sample_weights=vals, mode="sum") + b_dec
        loss = (x_hat - x).pow(2).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            # In place through a method call: `w_dec /= ...` here would make w_dec a local of step.
            w_dec.div_(w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    return step


def build_dataclass(cls, **values):
    """cls(**values) keeping only the fields this version of the class has."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def saelens_step(torch, sae_lens, sparsifier: str, d_in: int, d_sae: int, k: int, device: str):
    """SAELens's own training forward pass, backward and Adam (its trainer's inner step)."""
    from sae_lens.saes.sae import TrainStepInput

    if sparsifier == "topk":
        from sae_lens import TopKTrainingSAE as Sae, TopKTrainingSAEConfig as Cfg
    else:
        from sae_lens import BatchTopKTrainingSAE as Sae, BatchTopKTrainingSAEConfig as Cfg
    cfg = build_dataclass(Cfg, d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device=device)
    sae = Sae(cfg)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
    coefficients = sae.get_coefficients() if hasattr(sae, "get_coefficients") else {}
    coefficients = {name: (c.value if hasattr(c, "value") else c) for name, c in coefficients.items()}

    def step(x):
        inp = build_dataclass(TrainStepInput, sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                              n_training_steps=0, current_l1_coefficient=0.0, labels=None)
        out = sae.training_forward_pass(inp)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step, getattr(sae_lens, "__version__", "?")


def pytorch_rows(a: argparse.Namespace) -> tuple[list[dict], list[str]]:
    notes = []
    torch, err = torch_or_none()
    if torch is None:
        notes.append(f"hand-sparse PyTorch and SAELens: skipped, torch does not import ({err}); "
                     "`pip install torch sae-lens` to compare")
        return [], notes
    if a.device == "cuda" and not torch.cuda.is_available():
        notes.append("PyTorch rows: skipped, torch.cuda.is_available() is False")
        return [], notes
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(a.batch, a.d_in, generator=g).to(a.device) for _ in range(a.steps + 1)]
    rows = []
    ver = torch.__version__.split("+")[0]
    for s in a.sparsifiers:
        step = hand_sparse_step(torch, s, a.d_in, a.d_sae, a.batch, a.k, a.device)
        sec = time_steps(torch, a.device, step, batches)
        rows.append({"impl": f"hand-sparse PyTorch {ver}", "sparsifier": s, "step_ms": sec * 1e3,
                     "tokens_per_s": a.batch / sec})
    try:
        import sae_lens
    except Exception as e:
        notes.append(f"SAELens: skipped, sae_lens does not import ({type(e).__name__}: {e}); `pip install sae-lens`")
        return rows, notes
    for s in a.sparsifiers:
        try:
            step, sl_ver = saelens_step(torch, sae_lens, s, a.d_in, a.d_sae, a.k, a.device)
            sec = time_steps(torch, a.device, step, batches)
        except Exception as e:  # the API moves between versions: say so instead of crashing
            notes.append(f"SAELens {s}: failed with this sae_lens version ({type(e).__name__}: {e})")
            continue
        rows.append({"impl": f"SAELens {sl_ver}", "sparsifier": s, "step_ms": sec * 1e3,
                     "tokens_per_s": a.batch / sec})
    return rows, notes


# ---- the table


def print_table(rows: list[dict], report: dict, a: argparse.Namespace, notes: list[str]) -> None:
    print()
    print(f"d_in={a.d_in} d_sae={a.d_sae} batch={a.batch} k={a.k}, {a.threads} thread(s), device {a.device}, "
          f"{a.steps} timed steps after one warm-up")
    if "gemm_ms" in report:
        line = f"saetrain's encoder GEMM alone: {report['gemm_ms']:.2f} ms = {report['gemm_gflops']:.0f} GFLOP/s"
        if report.get("gemm_frac_peak") is not None:
            line += f" = {100 * report['gemm_frac_peak']:.0f}% of the measured FMA peak ({report['fma_peak']['gflops']:.0f} GFLOP/s)"
        print(line)
    elif report.get("encoders"):
        print("saetrain's encoder product: " + ", ".join(f"{e['encoder']} {e['ms']:.3f} ms" for e in report["encoders"]))
    best = {}
    for r in rows:
        if r["impl"].startswith("saetrain"):
            best[r["sparsifier"]] = max(best.get(r["sparsifier"], 0.0), r["tokens_per_s"])
    w = max(len("implementation"), *(len(r["impl"]) for r in rows))
    print(f"{'implementation':<{w}}  {'sparsifier':<10} {'step ms':>10} {'tokens/s':>11} {'saetrain / this':>16}")
    for r in rows:
        ratio = best.get(r["sparsifier"], float("nan")) / r["tokens_per_s"]
        r["saetrain_over_this"] = ratio
        print(f"{r['impl']:<{w}}  {r['sparsifier']:<10} {r['step_ms']:>10.2f} {r['tokens_per_s']:>11.0f} {ratio:>15.2f}x")
    for n in notes:
        print("note: " + n)


def main() -> None:
    a = parse_args()
    rows, report = saetrain_rows(a)
    more, notes = pytorch_rows(a)
    rows += more
    print_table(rows, report, a, notes)
    if a.json:
        target = Path(a.json)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"args": vars(a), "rows": rows, "notes": notes}, indent=2))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
