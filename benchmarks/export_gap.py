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

from qatkit.export.gguf import export_model, load_gguf_weights
from qatkit.models.load import load, resolve
from qatkit.targets.gguf import export_gap
from qatkit.train.data import default_eval_text


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
        t = time.time()
        types = load_gguf_weights(model, source.arch, path)  # in place: the teacher is not needed again
        gap = export_gap(model, types, path, default_eval_text(), args.tokens)
    print(f"Gemma 3 270M, qatkit {args.format} file, {gap['tokens']} tokens of held-out prose (BOS first), {time.time() - t:.0f} s")
    for name in ("plain", "faithful"):
        r = gap[name]
        print(f"  llama.cpp vs {name + ' torch':<15} mean KLD {r['kld']:.3e}  same top {r['same_top']:6.2f}%  max |dlogit| {r['max_dlogit']:.3e}")


if __name__ == "__main__":
    main()
