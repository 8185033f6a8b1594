"""The mobile format on the default model, measured in the ExecuTorch runtime (XNNPACK, CPU).

PTQ (the format without training: searched bf16 channel scales) vs QAT (the same plan trained
with the same distillation as the GGUF path), both written as .pte programs with a KV cache and
scored in ExecuTorch the way llama-perplexity scores a GGUF: perplexity, mean KL to the float
teacher (computed in torch, the same chunks and positions), same top token, gap closure, the
.pte size, and prefill/decode tokens/s through ExecuTorch's own LLM runner. The export gap of
the trained file (ExecuTorch vs the student's own forward) is printed too. This is
`qatkit run --format mobile --learn-scales` (qatkit.pipeline.run with the ExecuTorch target) with a printed table.

    python benchmarks/mobile.py [--steps 150] [--int2 '*.mlp.down_proj'] [--activations static]
                                [--embedding int4] [--out runs/mobile]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qatkit.eval.suite import load_suite
from qatkit.pipeline import run
from qatkit.prepare import QATConfig
from qatkit.report import domain_lines
from qatkit.train.loop import TrainConfig
from qatkit.train.run import RunConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--int2", nargs="*", default=[])
    ap.add_argument("--embedding", default="int8")
    ap.add_argument("--activations", default="dynamic", choices=["dynamic", "static"])
    ap.add_argument("--chunks", type=int, default=4, help="chunks of 512 tokens scored per held-out domain")
    ap.add_argument("--out", type=Path, default=Path("runs/mobile"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    qat = QATConfig(fmt="mobile", mobile_weights=args.weights, int2=tuple(args.int2), embedding=args.embedding, learn_scales=True, activations=args.activations)
    train = TrainConfig(steps=args.steps, lr=args.lr, eval_every=25, ckpt_every=25)
    r = run(RunConfig(model="gemma3-270m", qat=qat, train=train), args.out, load_suite(), args.chunks, resume=True)
    rows = r["files"]
    acts = "static int8 activations (per tensor, learned)" if args.activations == "static" else "int8 activations per token"
    print(f"\nGemma 3 270M, mobile format ({args.weights} Linears, int2: {args.int2 or 'none'}, embedding {args.embedding} per row), {acts}")
    print(f"{args.steps} QAT steps in {r['train_seconds']:.0f} s; scored in ExecuTorch (teacher in torch) on each held-out domain")
    print("\n".join(domain_lines(r, plain=True)))
    print("files (PPL: geometric mean over the held-out domains; KLD, same top: their mean)")
    print(f"{'file':<24} {'PPL':>8} {'KLD':>8} {'same top':>9} {'MB':>7} {'prefill t/s':>12} {'decode t/s':>11}")
    for key, label in (("teacher", "float teacher (torch)"), ("ptq", "PTQ .pte"), ("qat", "QAT .pte")):
        f = rows[key]
        kld = "-" if key == "teacher" else f"{f['kld']:.4f}"
        top = "-" if key == "teacher" else f"{f['same_top']:.2f}%"
        mb = f"{f['file_bytes'] / 1e6:.1f}" if "file_bytes" in f else "-"
        pf = f"{f['prefill_tps']:.1f}" if f.get("prefill_tps") else "-"
        dc = f"{f['decode_tps']:.1f}" if f.get("decode_tps") else "-"
        print(f"{label:<24} {f['ppl']:8.3f} {kld:>8} {top:>9} {mb:>7} {pf:>12} {dc:>11}")
    print(f"export gap (ExecuTorch vs the trained student): mean KLD {r['export_gap']['kld']:.2e}, same top {r['export_gap']['same_top']:.2f}%")


if __name__ == "__main__":
    main()
