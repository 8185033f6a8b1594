"""QAT vs llama.cpp's own PTQ on the default model, all measured in llama.cpp.

Runs the `qatkit run` pipeline (float teacher F32 GGUF; llama.cpp's Q4_0 quantization of it; a
QAT student trained for the same per-tensor policy and exported by qatkit) and prints, for each
domain of the held-out suite: perplexity, mean KLD to the teacher and same-top-token rate of the
three files, the gap closure (PPL_ptq - PPL_qat) / (PPL_ptq - PPL_teacher), their mean over the
held-out domains, and the export gap of the trained file (llama.cpp vs the student's own forward).

    python benchmarks/qat_vs_ptq.py [--steps 150] [--lr 1e-5] [--out runs/qat_vs_ptq]
                                    [--faithful] [--teacher-topk K]
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
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--kl-positions", type=float, default=0.25)
    ap.add_argument("--learn-scales", action="store_true")
    ap.add_argument("--faithful", action="store_true", help="train the student with llama.cpp's activation rounding")
    ap.add_argument("--teacher-topk", type=int, default=0, help="teacher top-k from the disk cache (0: the full teacher every step)")
    ap.add_argument("--chunks", type=int, default=4, help="chunks of 512 tokens scored per held-out domain")
    ap.add_argument("--data", nargs="*", default=[], help="training text (default: pydoc + code)")
    ap.add_argument("--data-free", type=float, default=None, help="share of sequences sampled from the teacher (default: qatkit run's)")
    ap.add_argument("--model", default="gemma3-270m", help="the default model, or a GGUF file / Hugging Face directory")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between held-out KL evaluations")
    ap.add_argument("--ckpt-every", type=int, default=25, help="steps between checkpoints (each ~1.2 GB for the default model)")
    ap.add_argument("--out", type=Path, default=Path("runs/qat_vs_ptq"))
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    train = TrainConfig(steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, kl_positions=args.kl_positions, eval_every=args.eval_every, ckpt_every=args.ckpt_every, faithful=args.faithful, teacher_topk=args.teacher_topk)
    from qatkit.config import DEFAULT_DATA_FREE

    free = args.data_free if args.data_free is not None else (0.0 if args.data else DEFAULT_DATA_FREE)
    cfg = RunConfig(model=args.model, data=args.data, data_free=free, qat=QATConfig(learn_scales=args.learn_scales), train=train)
    r = run(cfg, args.out, load_suite(), args.chunks, resume=args.resume)
    f = r["files"]
    print(f"\n{args.model}, Q4_0 (llama.cpp's default mix), {r['steps']} steps x {args.batch_size * args.grad_accum} x {args.seq_len} tokens ({r['tokens_seen']:,} tokens) in {r['train_seconds']:.0f} s of training, {r['wall_s']:.0f} s in all")
    print("\n".join(domain_lines(r, plain=True)))
    print("files (PPL: geometric mean over the held-out domains; KLD, same top: their mean)")
    print(f"{'file':<26} {'PPL':>8} {'KLD':>8} {'same top':>9} {'MB':>7}")
    for key, label in (("teacher", "float teacher (F32)"), ("ptq", "llama.cpp PTQ Q4_0"), ("qat", "qatkit QAT Q4_0")):
        print(f"{label:<26} {f[key]['ppl']:8.3f} {f[key]['kld']:8.4f} {f[key]['same_top']:8.2f}% {f[key]['file_bytes'] / 1e6:7.1f}")
    for mode in ("plain", "faithful"):
        g = r["export_gap"][mode]
        print(f"export gap (llama.cpp vs trained student, {mode}): mean KLD {g['kld']:.2e}, same top {g['same_top']:.2f}%")


if __name__ == "__main__":
    main()
