"""Export gap on the default model: llama.cpp's logits on qatkit's Q4_0 file vs the torch model
carrying the very same dequantized weights, with and without the runtime-faithful mode.

A gap of zero means llama.cpp computes what torch computes. Plain torch keeps activations in
float; llama.cpp rounds them (Q8_0 before Q4_0/Q8_0 products, f16 KV cache, f16 GELU table),
which the faithful mode models.

    python benchmarks/export_gap.py [--tokens 512] [--format q4_0]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from qatkit.train.data import default_eval_text
from qatkit.eval.faithful import llamacpp_faithful
from qatkit.eval.llama import adds_bos, chunk_logits, open_model, tokenize
from qatkit.export.gguf import load_gguf_weights
from qatkit.export.model import export_model
from qatkit.models.load import load, resolve


def compare(ref: np.ndarray, logits: np.ndarray, rows: int = 64) -> dict:
    """mean KL(llama.cpp || torch) in float64, same-top-token %, max |dlogit|; row blocks keep
    a 262k-wide vocabulary within memory."""
    kl, same, maxd = 0.0, 0, 0.0
    for i in range(0, len(ref), rows):
        p = torch.log_softmax(torch.from_numpy(ref[i : i + rows]).double(), -1)
        q = torch.log_softmax(torch.from_numpy(logits[i : i + rows]).double(), -1)
        kl += float((p.exp() * (p - q)).sum())
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        maxd = max(maxd, float(np.abs(ref[i : i + rows] - logits[i : i + rows]).max()))
    return {"kld": kl / len(ref), "same_top": 100.0 * same / len(ref), "max_dlogit": maxd}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--format", default="q4_0", choices=["q4_0", "q8_0"])
    args = ap.parse_args()
    source = resolve("gemma3-270m")
    model, tokenizer = load(source)
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/model.gguf"
        export_model(model, tokenizer, source, path, args.format, progress=False)
        llm = open_model(path, n_ctx=args.tokens)
        ids = ([llm.token_bos()] if adds_bos(llm) else []) + tokenize(llm, default_eval_text())
        ids = ids[: args.tokens]
        t = time.time()
        ref = chunk_logits(llm, ids)
        t_llama = time.time() - t
        del llm
        types = load_gguf_weights(model, source.arch, path)  # the file's exact values, in place
    x = torch.tensor([ids])
    with torch.no_grad():
        t = time.time()
        plain = model(x).logits[0].float().numpy()
        t_plain = time.time() - t
        with llamacpp_faithful(model, types):
            t = time.time()
            faithful = model(x).logits[0].float().numpy()
            t_faithful = time.time() - t
    print(f"Gemma 3 270M, qatkit {args.format} file, {len(ids)} tokens of held-out prose (BOS first); llama.cpp {t_llama:.1f} s, torch plain {t_plain:.1f} s, faithful {t_faithful:.1f} s")
    for name, logits in (("plain torch", plain), ("faithful torch", faithful)):
        r = compare(ref, logits)
        print(f"  llama.cpp vs {name:<15} mean KLD {r['kld']:.3e}  same top {r['same_top']:6.2f}%  max |dlogit| {r['max_dlogit']:.3e}")


if __name__ == "__main__":
    main()
