"""What harvest.py and ce_eval.py share: hook names, the hook point itself, model loading and the
layout of a harvested directory. One definition, so that an SAE is spliced exactly where its
activations were read.

Hook names are TransformerLens / SAELens names of the residual stream:

    blocks.L.hook_resid_pre    the input of block L   = HF hidden_states[L]
    blocks.L.hook_resid_post   the output of block L  = HF hidden_states[L + 1]
                               (= blocks.(L+1).hook_resid_pre)

with `output_hidden_states=True` giving hidden_states[0] = the embeddings. One exception: many HF
models (Llama, GPT-2, ...) return the *final-norm* output as their last hidden state, so for the
last block resid_post is not hidden_states[L + 1]. Both scripts therefore read and write the
residual stream with forward hooks on the block module itself (a pre-hook on block L's input for
resid_pre, a hook on its output for resid_post), never through hidden_states.
`layers.L` (sparsify's name for the output of layer L) is read as blocks.L.hook_resid_post.

Harvested directory (harvest.py writes it, ce_eval.py and `sae train --data` read it):

    manifest.json               shards[i] = {file: acts_NNNNN.npy, rows, tokens_file: tokens/windows_NNNNN.npy}
    acts_NNNNN.npy              (rows, d_model): row r = window r // (ctx - 1), position 1 + r % (ctx - 1)
    tokens/windows_NNNNN.npy    (windows, ctx) int32, BOS first (its activation is not stored)

A model is a Hugging Face id, a local model directory, or a `.gguf` file (loaded by transformers
with `gguf_file=`, tokenizer included; transformers de-quantises it to float).
"""

import glob
import json
import os
import re

TOKENS_DIR = "tokens"
DEFAULT_KIND = "resid_pre"  # harvest.py --hook and ce_eval.py --layer without --hook
MANIFEST = "manifest.json"


def acts_file(i):
    return f"acts_{i:05d}.npy"


def tokens_file(i):
    return f"{TOKENS_DIR}/windows_{i:05d}.npy"


def hook_name(layer, kind):
    """`blocks.{layer}.hook_resid_{kind}`, kind `pre` or `post` (also `resid_pre` / `resid_post`)."""
    kind = kind.removeprefix("resid_")
    if kind not in ("pre", "post"):
        raise ValueError(f"hook kind {kind!r}: use resid_pre or resid_post")
    return f"blocks.{int(layer)}.hook_resid_{kind}"


def parse_hook(hook):
    """(layer, 'pre' | 'post') of a hook name; SystemExit naming the accepted forms otherwise."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook or "")
    if m:
        return int(m.group(1)), m.group(2)
    m = re.fullmatch(r"(?:model\.)?(?:layers|h|transformer\.h|gpt_neox\.layers)\.(\d+)", hook or "")
    if m:
        return int(m.group(1)), "post"
    raise SystemExit(f"unsupported hook {hook!r}: use blocks.L.hook_resid_pre, blocks.L.hook_resid_post or layers.L")


def hidden_states_index(layer, kind):
    """The HF `hidden_states` index of a hook (documentation; see the module note on the last block)."""
    return layer if kind.removeprefix("resid_") == "pre" else layer + 1


def model_source(model):
    """(path or id for from_pretrained, extra kwargs): a `.gguf` file becomes (its dir, gguf_file=name)."""
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise SystemExit(f"--model {model}: no such GGUF file")
        d, f = os.path.split(os.path.abspath(model))
        return d, {"gguf_file": f}
    return model, {}


def model_record(model):
    """How the model is recorded in manifest.json / cfg.json: local paths made absolute, ids as given."""
    return os.path.abspath(model) if os.path.exists(model) else model


def load_model(model, dtype, device):
    """The causal LM (eval mode, on device) of an id, a directory or a .gguf file."""
    import transformers

    src, kw = model_source(model)
    return transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw).to(device).eval()


def load_tokenizer(model):
    """The tokenizer of an id, a directory or a .gguf file."""
    import transformers

    src, kw = model_source(model)
    return transformers.AutoTokenizer.from_pretrained(src, **kw)


def find_blocks(model):
    """The model's transformer blocks: the shallowest ModuleList with num_hidden_layers entries."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    best = None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and (n is None or len(m) == n):
            if best is None or name.count(".") < best[0].count("."):
                best = (name, m)
    if best is None:
        raise SystemExit("cannot find the model's transformer blocks")
    return best[1]


def attach(model, hook, fn):
    """Call `fn(h) -> h'` on the residual stream at `hook` in every forward pass (`h` is
    [batch, seq, d_model]; return it unchanged to only read it). Returns the handle (`.remove()`)."""
    layer, kind = parse_hook(hook)
    blocks = find_blocks(model)
    if not 0 <= layer < len(blocks):
        raise SystemExit(f"hook {hook}: the model has blocks 0..{len(blocks) - 1}")
    if kind == "post":

        def post_hook(_module, _inputs, output):
            if isinstance(output, tuple):
                return (fn(output[0]),) + tuple(output[1:])
            return fn(output)

        return blocks[layer].register_forward_hook(post_hook)

    def pre_hook(_module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)


def harvested_shards(path):
    """[(acts path or None, tokens path)] of a harvested directory, in shard order: from its
    manifest.json (`shards[].file`, `shards[].tokens_file`), else every tokens/windows_*.npy.
    `path` may also be one windows .npy file."""
    if os.path.isfile(path):
        return [(None, path)]
    mp = os.path.join(path, MANIFEST)
    if os.path.isfile(mp):
        with open(mp) as f:
            man = json.load(f)
        out = [
            (os.path.join(path, s["file"]), os.path.join(path, s["tokens_file"]))
            for s in man.get("shards", [])
            if s.get("tokens_file")
        ]
        if out:
            return out
    files = sorted(glob.glob(os.path.join(path, TOKENS_DIR, "windows_*.npy")))
    if not files:
        raise SystemExit(f"{path}: no token windows (manifest.json shards[].tokens_file or {TOKENS_DIR}/windows_*.npy)")
    return [(None, f) for f in files]


def read_manifest(path):
    mp = os.path.join(path, MANIFEST)
    if not os.path.isfile(mp):
        return {}
    with open(mp) as f:
        return json.load(f)
